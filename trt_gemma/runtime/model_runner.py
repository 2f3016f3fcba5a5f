"""ModelRunner: turns a SchedulerOutput into tensors, runs the model, returns the logits to sample.

Nothing is wasted on CPU: tokens are packed without padding, and only the hidden states of the
last token of sequences that sample this step come back (the 262144-wide LM head is most of Gemma 3
270M's FLOPs): never rows of prefill chunks that end mid-prompt.

Inputs are written in place into persistent buffers (runtime/step_inputs.py) and reach the device
in one copy per step; decode block tables are kept per sequence across steps and only their
changes are written. CUDA-graph steps fill the graph's own input buffer, which the captured graphs
read directly.

With tensor parallelism (``model.tp.size > 1``) every rank has a ModelRunner over its shard and
its heads' share of the KV cache: rank 0's ``run`` first sends the step to the others
(runtime/step_sync.py), which ``follow`` it: same buffer layout, same forward, same tail
collective.
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import torch

from trt_gemma import ops
from trt_gemma.kernels.reference import FP8_DTYPE
from trt_gemma.model import GemmaModel
from trt_gemma.runtime import int8_decode
from trt_gemma.runtime.block_manager import BlockManager
from trt_gemma.runtime.cpu_threads import ThreadChooser
from trt_gemma.runtime.paged_attention import (
    AttentionMetadata,
    GroupMetadata,
    KVCache,
    PagedAttention,
    cpu_decode_keys,
)
from trt_gemma.runtime.scheduler import SchedulerOutput
from trt_gemma.runtime.sequence import Sequence
from trt_gemma.runtime.step_sync import OP_GREEDY, OP_LOGITS, OP_STOP, StepHeader, StepSync
from trt_gemma.runtime.step_inputs import (
    BlockTableRows,
    StepBuffer,
    StepFields,
    TokenReadback,
    reserve_step,
)


class Batch:
    """The model inputs of one step (host-built, moved to the device once). The tensors are views
    of the runner's step buffers: valid until the next ``prepare``."""

    def __init__(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                 logits_indices: torch.Tensor, sample_seqs: list[Sequence], graph_size: int = 0):
        self.input_ids = input_ids  # [num_tokens]
        self.positions = positions  # [num_tokens]
        self.meta = meta
        self.logits_indices = logits_indices  # [num_samples] rows of the hidden states to sample
        self.sample_seqs = sample_seqs  # the sequence of each of those rows
        self.graph_size = graph_size  # > 0: a decode step whose inputs fill that CUDA graph's
        # Tensor parallelism: the sizes the other ranks lay the step out from, and the words of
        # the step buffer to send them (set by ModelRunner.prepare on rank 0 only)
        self.header: StepHeader | None = None
        self.words: torch.Tensor | None = None


class ModelRunner:
    def __init__(self, model: GemmaModel, block_manager: BlockManager, kv_dtype: torch.dtype,
                 enforce_eager: bool = True, cuda_graph_batch_sizes: tuple[int, ...] = (),
                 max_model_len: int = 0, single_thread_below: int = 0,
                 int8_decode_max_rows: int = 0, max_num_seqs: int = 0,
                 max_num_batched_tokens: int = 0):
        cfg = model.config
        self.model = model
        self.device = model.device
        self.block_manager = block_manager
        self.block_size = block_manager.block_size
        self.windows = block_manager.windows
        self.fp8_kv = kv_dtype == FP8_DTYPE
        self.kv_cache = KVCache(block_manager.groups, self.block_size, cfg.num_key_value_heads,
                                cfg.head_dim, kv_dtype, model.device,
                                model.kv_scales if self.fp8_kv else None)
        # Batched CPU decode attention where ops would run the per-sequence references.
        self.cpu_fast_path = not ops.use_triton(model.embed) and not self.fp8_kv
        # Tensor parallelism: the per-step message to (rank 0) or from (others) the other ranks
        self.sync = StepSync(model.tp, len(block_manager.windows)) if model.tp.size > 1 else None
        # CPU bf16/fp16: small steps run an INT8 twin of the model (runtime/int8_decode.py); not
        # under tensor parallelism (the twin would be a whole model, without the collectives)
        self.small_model, self.small_max_rows = None, 0
        if int8_decode_max_rows and int8_decode.available(model) and self.sync is None:
            self.small_model = int8_decode.int8_twin(model)
            self.small_max_rows = int8_decode_max_rows
        self.threads = None  # CPU: the measured thread count of small steps (cpu_threads.py)
        # (not under tensor parallelism: ranks must not time steps differently)
        if self.device.type == "cpu" and single_thread_below and self.sync is None:
            self.threads = ThreadChooser(torch.get_num_threads(), single_thread_below)
        # Persistent inputs: one packed buffer (grows if a step needs more), the decodes' block
        # tables, the pinned buffer sampled tokens come back through.
        max_blocks = -(-(max_model_len or cfg.max_position_embeddings) // self.block_size)
        groups = len(self.windows)
        tokens = max_num_batched_tokens or 2048
        self.step_buffer = StepBuffer(self.device, tokens * (3 + groups) + groups * (
            (max_num_seqs or 64) * min(max_blocks, 256)) // 2)
        self.rows = BlockTableRows(groups, max_blocks, max_num_seqs or 64)
        self.read_tokens = TokenReadback(self.device)
        self.graphs = None
        if self.device.type == "cuda" and not enforce_eager and cuda_graph_batch_sizes:
            from trt_gemma.runtime.cuda_graph import CudaGraphRunner

            self.graphs = CudaGraphRunner(model, self.kv_cache, groups, cuda_graph_batch_sizes,
                                          max_blocks)
            self.graphs.capture()

    # -- inputs ------------------------------------------------------------------------------------
    def prepare(self, out: SchedulerOutput) -> Batch:
        d = out.num_decodes
        seqs, counts = out.seqs, out.num_new_tokens
        decodes = seqs[:d]
        # Decode rows: one per decoding sequence, or 1 + K for one that verifies K drafts (each
        # draft position is a decode query of its own, with its own context length).
        decode_counts = counts[:d]
        rows = sum(decode_counts)
        num_tokens = sum(counts)
        # Every prefill chunk starts a sequence: attend over the new keys only. Not with an FP8
        # cache: prefills then read the keys as the cache rounded them, as later steps will, so a
        # prompt's output does not depend on how it was chunked or prefix-cached.
        direct = not self.fp8_kv and all(s.num_computed_tokens == 0 for s in seqs[d:])
        key_counts = None
        if not direct:
            key_counts = [sum(s.num_computed_tokens + n - self._first_key(s, w)
                              for s, n in zip(seqs[d:], counts[d:], strict=True))
                          for w in self.windows]
        num_samples = rows + sum(s.num_computed_tokens + n == s.num_tokens
                                 for s, n in zip(seqs[d:], counts[d:], strict=True))
        widths = [max((len(s.block_tables[g]) for s in decodes), default=0)
                  for g in range(len(self.windows))]
        graph_size = 0
        if self.graphs is not None and d == len(seqs):
            graph_size = self.graphs.size_for(rows, max(widths, default=0))
        if graph_size:
            buf = self.graphs.buffer
            f = self.graphs.fields(graph_size)
        else:
            buf = self.step_buffer
            f = reserve_step(buf, num_tokens, num_samples, rows, len(seqs) - d, key_counts,
                             widths)
        f.cu_seqlens_q[0][0] = 0
        self._fill_decodes(f, decodes, decode_counts, widths)
        sample_seqs = [s for s, n in zip(decodes, decode_counts, strict=True) for _ in range(n)]
        if len(seqs) > d:
            sample_seqs += self._fill_prefills(f, out, key_counts is not None, rows)
        if graph_size:
            self.graphs.pad(f, graph_size, rows)
        buf.upload()
        batch = self._batch(f, rows, num_tokens, len(sample_seqs), sample_seqs, graph_size)
        if self.sync is not None:
            batch.header = StepHeader(
                OP_STOP, graph_size, num_tokens, len(sample_seqs), rows, len(seqs) - d,
                None if key_counts is None else tuple(key_counts), tuple(widths), buf.used)
            batch.words = buf.dev[:buf.used]
        return batch

    def _first_key(self, seq: Sequence, window: int | None) -> int:
        """First key a prefill chunk of seq reads in a group of this window."""
        return 0 if window is None else max(0, seq.num_computed_tokens - window + 1)

    def _fill_decodes(self, f: StepFields, decodes: list[Sequence], counts: list[int],
                      widths: list[int]) -> None:
        d, bs = len(decodes), self.block_size
        if not d:
            return
        start = np.fromiter((s.num_computed_tokens for s in decodes), np.int64, count=d)
        rows = self.rows.update(decodes)
        r = sum(counts)
        if r == d:  # no drafts: one row per sequence
            pos = start
            f.input_ids[0][:d] = [s.token_ids[s.num_computed_tokens] for s in decodes]
        else:  # row j of a sequence's 1 + K: position start + j, its last token then draft j
            repeat = np.asarray(counts, dtype=np.int64)
            first_row = np.cumsum(repeat) - repeat
            pos = np.repeat(start - first_row, repeat) + np.arange(r)
            rows = np.repeat(rows, repeat)
            f.input_ids[0][:r] = [t for s in decodes
                                  for t in (s.token_ids[s.num_computed_tokens], *s.spec_tokens)]
        f.positions[0][:r] = pos
        f.context_lens[0][:r] = pos + 1
        f.logits_indices[0][:r] = np.arange(r)
        block, offset = pos // bs, pos % bs
        for g, width in enumerate(widths):
            blocks = self.rows.tables[g][rows, block].astype(np.int64)
            np.add(blocks * bs, offset, out=f.slot_mapping[g][0][:r])
            self.rows.gather(g, rows, f.block_tables[g][0][:r, :width])

    def _fill_prefills(self, f: StepFields, out: SchedulerOutput, keyed: bool,
                       decode_rows: int) -> list[Sequence]:
        """Prefill chunks after the decode rows; returns the sequences whose chunk samples."""
        bs, d = self.block_size, out.num_decodes
        t = decode_rows  # next token row
        k = [0] * len(self.windows)  # next key slot per group
        cu_q, samples = f.cu_seqlens_q[0], []
        if keyed:
            for cu in f.cu_seqlens_k:
                cu[0][0] = 0
        for i, (seq, n) in enumerate(zip(out.seqs[d:], out.num_new_tokens[d:], strict=True)):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            f.input_ids[0][t:t + n] = seq.token_ids[start:end]
            pos = np.arange(start, end, dtype=np.int64)
            f.positions[0][t:t + n] = pos
            for g, (table, window) in enumerate(zip(seq.block_tables, self.windows,
                                                    strict=True)):
                f.slot_mapping[g][0][t:t + n] = _slots(table, pos, bs)
                if keyed:
                    first = self._first_key(seq, window)
                    keys = np.arange(first, end, dtype=np.int64)
                    f.prefill_key_slots[g][0][k[g]:k[g] + len(keys)] = _slots(table, keys, bs)
                    k[g] += len(keys)
                    f.cu_seqlens_k[g][0][i + 1] = k[g]
            t += n
            cu_q[i + 1] = t - decode_rows
            if end == seq.num_tokens:
                f.logits_indices[0][decode_rows + len(samples)] = t - 1
                samples.append(seq)
        return samples

    def _batch(self, f: StepFields, d: int, num_tokens: int, num_samples: int,
               sample_seqs: list[Sequence], graph_size: int) -> Batch:
        # Eager steps' fields have exactly the step's sizes; a graph step's the graph's (padded):
        # the model sees the real rows here (the graph reads the padded fields it captured).
        def real(t: torch.Tensor, n: int) -> torch.Tensor:
            return t[:n] if graph_size else t

        context_lens = real(f.context_lens[1], d)
        groups = []
        for g, window in enumerate(self.windows):
            gm = GroupMetadata(
                slot_mapping=real(f.slot_mapping[g][1], num_tokens),
                block_tables=real(f.block_tables[g][1], d),
                context_lens=context_lens,
                prefill_key_slots=None if f.prefill_key_slots is None
                else f.prefill_key_slots[g][1],
                cu_seqlens_k=None if f.cu_seqlens_k is None else f.cu_seqlens_k[g][1],
            )
            if self.cpu_fast_path:
                gm.decode_key_slots, gm.decode_key_mask = cpu_decode_keys(
                    gm.block_tables, context_lens, self.block_size, window)
            groups.append(gm)
        meta = AttentionMetadata(d, f.cu_seqlens_q[1], groups)
        return Batch(real(f.input_ids[1], num_tokens), real(f.positions[1], num_tokens), meta,
                     real(f.logits_indices[1], num_samples), sample_seqs, graph_size)

    # -- run ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, batch: Batch, greedy: bool = True) -> torch.Tensor:  # [num_samples, hidden]
        """The final hidden states of the rows to sample. The caller then takes either
        ``greedy_tokens`` (``greedy``) or ``compute_logits`` of them: under tensor parallelism
        the other ranks are told which, as both end in a collective."""
        copies = self.block_manager.pending_copies
        if self.sync is not None:
            op = OP_GREEDY if greedy else OP_LOGITS
            self.sync.send(dataclasses.replace(batch.header, op=op), batch.words, copies)
        if copies:
            self.kv_cache.copy_blocks(copies)
            copies.clear()
        return self._forward(batch)

    def _forward(self, batch: Batch) -> torch.Tensor:
        if batch.graph_size:
            hidden = self.graphs.run(batch)
        else:
            small = self.small_model is not None and batch.input_ids.numel() <= self.small_max_rows
            model = self.small_model if small else self.model
            hidden = model.forward(batch.input_ids, batch.positions,
                                   PagedAttention(self.kv_cache, batch.meta))
        if batch.logits_indices.numel() < hidden.shape[0]:
            hidden = hidden[batch.logits_indices]
        return hidden

    def greedy_tokens(self, hidden: torch.Tensor) -> list[int]:  # hidden: [rows, hidden]
        """The argmax token of each row. On CUDA the ids come back through a pinned buffer (one
        non-blocking copy, one synchronisation) instead of ``.tolist()``'s pageable copy."""
        if self.device.type != "cuda" or self.sync is not None:  # TP: a vocab-parallel argmax
            return self.model.greedy_tokens(hidden)
        return self.read_tokens(ops.linear(hidden, self.model.lm_head).argmax(dim=-1))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [rows, vocab] float32
        return self.model.compute_logits(hidden)

    # -- tensor parallelism: ranks 1..N-1 ----------------------------------------------------------
    @torch.inference_mode()
    def follow(self) -> None:
        """Run the steps rank 0 sends, until it says stop (or dies: RankFailure)."""
        while True:
            h = self.sync.receive()
            if h.op == OP_STOP:
                return
            if h.graph_size:
                buf, f = self.graphs.buffer, self.graphs.fields(h.graph_size)
            else:
                buf = self.step_buffer
                f = reserve_step(buf, h.num_tokens, h.num_samples, h.num_decodes,
                                 h.num_prefills, None if h.key_counts is None
                                 else list(h.key_counts), list(h.widths))
            if buf.used != h.used_words:  # the two sides disagree on the layout: a bug
                raise RuntimeError(f"tensor-parallel rank {self.sync.tp.rank}: step layout of "
                                   f"{buf.used} words, rank 0 sent {h.used_words}")
            copies = self.sync.receive_payload(h, buf.dev[:buf.used])
            if copies:
                self.kv_cache.copy_blocks(copies)
            batch = self._batch(f, h.num_decodes, h.num_tokens, h.num_samples, [],
                                h.graph_size)
            hidden = self._forward(batch)
            if not h.num_samples:  # rank 0 samples nothing either
                continue
            if h.op == OP_GREEDY:
                self.model.greedy_tokens(hidden)
            else:
                self.model.compute_logits(hidden)

    def threads_for(self, num_tokens: int):
        """Context for a step of num_tokens: on CPU, small steps run on the thread count measured
        fastest (one thread on a busy machine, all of them on an idle one)."""
        if self.threads is None:
            return contextlib.nullcontext()
        return self.threads.step(num_tokens)


def _slots(table: list[int], pos: np.ndarray, block_size: int) -> np.ndarray:
    """Flat cache slots of positions pos (ascending, contiguous) of a sequence's block table."""
    first = int(pos[0]) // block_size
    blocks = np.asarray(table[first:int(pos[-1]) // block_size + 1], dtype=np.int64)
    return blocks[pos // block_size - first] * block_size + pos % block_size
