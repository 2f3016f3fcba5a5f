"""CUDA graphs for decode steps: capture the model's forward once per batch size.

A decode-only step of B sequences replays the graph of the smallest captured size >= B. Its inputs
live in one persistent buffer (``step_inputs.StepBuffer``, pinned host + device): the model runner
writes a graph step's inputs straight into the host side at the offsets of that size's layout,
copies them with the step's one host-to-device copy, and the graph reads the device side, which
never moves. The padding rows write to slot -1 (skipped) and see no keys (context length 0 gives
a zero row), so they change nothing; they are written when the size changes or the batch shrinks,
not every step. Block tables are captured at the full ``max_blocks`` width: a step writes only
its rows' used blocks (the rest is never read past the context length). The Triton decode and
KV-write kernels take every size from tensor shapes, not values, so they need no host sync inside
a graph. The LM head stays outside the graph: one large GEMM gains nothing from replay, and
keeping it out spares a [batch, vocab] static output per captured size.

UNVERIFIED: written without a GPU. ModelRunner uses it only on CUDA and only when
``EngineConfig.enforce_eager`` is False; set ``enforce_eager=True`` to rule it out.
"""

from __future__ import annotations

import torch

from trt_gemma.runtime.paged_attention import (
    AttentionMetadata,
    GroupMetadata,
    KVCache,
    PagedAttention,
)
from trt_gemma.runtime.step_inputs import StepBuffer, StepFields, reserve_step, step_words


class CudaGraphRunner:
    def __init__(self, model, kv_cache: KVCache, num_groups: int, batch_sizes: tuple[int, ...],
                 max_blocks_per_seq: int):
        self.model = model
        self.kv_cache = kv_cache
        self.batch_sizes = sorted(batch_sizes)
        self.max_batch = self.batch_sizes[-1]
        self.num_groups = num_groups
        self.max_blocks = max_blocks_per_seq
        b = self.max_batch
        words = step_words(b, b, b, 0, None, [max_blocks_per_seq] * num_groups)
        self.buffer = StepBuffer(model.device, words, growable=False)
        self.filled = (0, 0)  # (size, rows) of the last graph step: padding is valid past rows
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.hidden: dict[int, torch.Tensor] = {}  # [size, hidden] static output per graph
        self.pool = None

    def size_for(self, num_decodes: int, width: int) -> int:
        """The captured size a decode-only step of num_decodes rows replays; 0: run eagerly."""
        if not 0 < num_decodes <= self.max_batch or width > self.max_blocks:
            return 0
        return next(s for s in self.batch_sizes if s >= num_decodes)

    def fields(self, size: int) -> StepFields:
        """Start a graph step of this size: its layout in the buffer (the captured one)."""
        return reserve_step(self.buffer, size, size, size, 0, None,
                            [self.max_blocks] * self.num_groups)

    def pad(self, f: StepFields, size: int, rows: int) -> None:
        """Padding rows rows..size of the host side, where a previous step left real ones."""
        last_size, last_rows = self.filled
        end = size if last_size != size else max(last_rows, rows)
        if end > rows:
            f.input_ids[0][rows:end] = 0
            f.positions[0][rows:end] = 0
            f.context_lens[0][rows:end] = 0
            for slots in f.slot_mapping:
                slots[0][rows:end] = -1
        self.filled = (size, rows)

    def _meta(self, size: int, f: StepFields) -> AttentionMetadata:
        groups = [GroupMetadata(f.slot_mapping[g][1], f.block_tables[g][1], f.context_lens[1],
                                None, None)
                  for g in range(self.num_groups)]
        return AttentionMetadata(size, f.cu_seqlens_q[1], groups)

    def _forward(self, size: int, f: StepFields) -> torch.Tensor:
        backend = PagedAttention(self.kv_cache, self._meta(size, f))
        return self.model.forward(f.input_ids[1], f.positions[1], backend)

    @torch.inference_mode()
    def capture(self) -> None:
        # Largest first, so smaller graphs reuse its memory pool.
        for size in reversed(self.batch_sizes):
            f = self.fields(size)
            f.cu_seqlens_q[0][:] = 0
            for table in f.block_tables:
                table[0][:] = 0
            self.filled = (0, 0)
            self.pad(f, size, 0)  # every row a padding row
            self.buffer.upload()
            self._forward(size, f)  # warm-up: Triton compiles/autotunes outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.hidden[size] = self._forward(size, f)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()
        self.filled = (0, 0)

    @torch.inference_mode()
    def run(self, batch) -> torch.Tensor:  # [num_decodes, hidden] final hidden states
        """Replay the graph whose inputs ModelRunner.prepare wrote (and copied) for this step."""
        n = batch.meta.num_decodes
        self.graphs[batch.graph_size].replay()
        return self.hidden[batch.graph_size][:n].clone()
