"""ModelRunner: turns a SchedulerOutput into tensors, runs the model, returns the logits to sample.

Nothing is wasted on CPU: tokens are packed without padding, and only the hidden states of the
last token of sequences that sample this step come back (the 262144-wide LM head is most of Gemma 3
270M's FLOPs): never rows of prefill chunks that end mid-prompt.
"""

from __future__ import annotations

import contextlib

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


class Batch:
    """The model inputs of one step (host-built, moved to the device once)."""

    def __init__(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                 logits_indices: torch.Tensor, sample_seqs: list[Sequence]):
        self.input_ids = input_ids  # [num_tokens]
        self.positions = positions  # [num_tokens]
        self.meta = meta
        self.logits_indices = logits_indices  # [num_samples] rows of the hidden states to sample
        self.sample_seqs = sample_seqs  # the sequence of each of those rows


class ModelRunner:
    def __init__(self, model: GemmaModel, block_manager: BlockManager, kv_dtype: torch.dtype,
                 enforce_eager: bool = True, cuda_graph_batch_sizes: tuple[int, ...] = (),
                 max_model_len: int = 0, single_thread_below: int = 0,
                 int8_decode_max_rows: int = 0):
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
        # CPU bf16/fp16: small steps run an INT8 twin of the model (runtime/int8_decode.py)
        self.small_model, self.small_max_rows = None, 0
        if int8_decode_max_rows and int8_decode.available(model):
            self.small_model = int8_decode.int8_twin(model)
            self.small_max_rows = int8_decode_max_rows
        self.threads = None  # CPU: the measured thread count of small steps (cpu_threads.py)
        if self.device.type == "cpu" and single_thread_below:
            self.threads = ThreadChooser(torch.get_num_threads(), single_thread_below)
        self.graphs = None
        if self.device.type == "cuda" and not enforce_eager and cuda_graph_batch_sizes:
            from trt_gemma.runtime.cuda_graph import CudaGraphRunner

            self.graphs = CudaGraphRunner(model, self.kv_cache, len(block_manager.groups),
                                          cuda_graph_batch_sizes,
                                          -(-max_model_len // self.block_size))
            self.graphs.capture()

    # -- inputs ------------------------------------------------------------------------------------
    def prepare(self, out: SchedulerOutput) -> Batch:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[list[int]] = [[] for _ in self.windows]
        logits_indices: list[int] = []
        sample_seqs: list[Sequence] = []
        cu_q = [0]
        # Every prefill chunk starts a sequence: attend over the new keys only. Not with an FP8
        # cache: prefills then read the keys as the cache rounded them, as later steps will, so a
        # prompt's output does not depend on how it was chunked or prefix-cached.
        direct = not self.fp8_kv
        key_slots: list[list[int]] = [[] for _ in self.windows]
        cu_k: list[list[int]] = [[0] for _ in self.windows]
        for idx, (seq, n) in enumerate(zip(out.seqs, out.num_new_tokens, strict=True)):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            for g, table in enumerate(seq.block_tables):
                slots[g].extend(table[p // bs] * bs + p % bs for p in range(start, end))
            if end == seq.num_tokens:
                logits_indices.append(len(input_ids) - 1)
                sample_seqs.append(seq)
            if idx >= out.num_decodes:
                cu_q.append(cu_q[-1] + n)
                direct = direct and start == 0
                for g, (table, window) in enumerate(zip(seq.block_tables, self.windows,
                                                        strict=True)):
                    first = 0 if window is None else max(0, start - window + 1)
                    key_slots[g].extend(table[p // bs] * bs + p % bs for p in range(first, end))
                    cu_k[g].append(cu_k[g][-1] + end - first)
        d = out.num_decodes
        decode_seqs = out.seqs[:d]
        dev = self.device
        groups = []
        context_lens = _tensor([s.num_computed_tokens + 1 for s in decode_seqs], torch.int32, dev)
        for g in range(len(self.windows)):
            tables = [seq.block_tables[g] for seq in decode_seqs]
            width = max((len(t) for t in tables), default=0)
            rows = [[max(b, 0) for b in t] + [0] * (width - len(t)) for t in tables]
            gm = GroupMetadata(
                slot_mapping=_tensor(slots[g], torch.int64, dev),
                block_tables=_tensor(rows, torch.int32, dev).view(d, width),
                context_lens=context_lens,
                prefill_key_slots=None if direct else _tensor(key_slots[g], torch.int64, dev),
                cu_seqlens_k=None if direct else _tensor(cu_k[g], torch.int32, dev),
            )
            if self.cpu_fast_path:
                gm.decode_key_slots, gm.decode_key_mask = cpu_decode_keys(
                    gm.block_tables, context_lens, bs, self.windows[g])
            groups.append(gm)
        meta = AttentionMetadata(d, _tensor(cu_q, torch.int32, dev), groups)
        return Batch(_tensor(input_ids, torch.int64, dev), _tensor(positions, torch.int64, dev),
                     meta, _tensor(logits_indices, torch.int64, dev), sample_seqs)

    # -- run ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, batch: Batch) -> torch.Tensor:  # [num_samples, hidden]
        """The final hidden states of the rows to sample (logits are the caller's choice)."""
        copies = self.block_manager.pending_copies
        if copies:
            self.kv_cache.copy_blocks(copies)
            copies.clear()
        if self.graphs is not None and self.graphs.can_run(batch):
            hidden = self.graphs.run(batch)
        else:
            small = self.small_model is not None and batch.input_ids.numel() <= self.small_max_rows
            model = self.small_model if small else self.model
            hidden = model.forward(batch.input_ids, batch.positions,
                                   PagedAttention(self.kv_cache, batch.meta))
        if batch.logits_indices.numel() < hidden.shape[0]:
            hidden = hidden[batch.logits_indices]
        return hidden

    def threads_for(self, num_tokens: int):
        """Context for a step of num_tokens: on CPU, small steps run on the thread count measured
        fastest (one thread on a busy machine, all of them on an idle one)."""
        if self.threads is None:
            return contextlib.nullcontext()
        return self.threads.step(num_tokens)


def _tensor(data: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.tensor(data, dtype=dtype)
    return t if device.type == "cpu" else t.to(device, non_blocking=True)
