"""CUDA graphs for decode steps: capture the model's forward once per batch size.

A decode-only step of B sequences replays the graph of the smallest captured size >= B, with its
inputs copied into static buffers; the padding rows write to slot -1 (skipped) and see no keys
(context length 0 gives a zero row), so they change nothing. The Triton decode and KV-write
kernels take every size from tensor shapes, not values, so they need no host sync inside a graph.
The LM head stays outside the graph: one large GEMM gains nothing from replay, and keeping it out
spares a [batch, vocab] static output per captured size.

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


class CudaGraphRunner:
    def __init__(self, model, kv_cache: KVCache, num_groups: int, batch_sizes: tuple[int, ...],
                 max_blocks_per_seq: int):
        self.model = model
        self.kv_cache = kv_cache
        self.batch_sizes = sorted(batch_sizes)
        self.max_batch = self.batch_sizes[-1]
        dev, b = model.device, self.max_batch
        self.input_ids = torch.zeros(b, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(b, dtype=torch.int64, device=dev)
        self.slot_mapping = [torch.full((b,), -1, dtype=torch.int64, device=dev)
                             for _ in range(num_groups)]
        self.block_tables = [torch.zeros(b, max_blocks_per_seq, dtype=torch.int32, device=dev)
                             for _ in range(num_groups)]
        self.context_lens = [torch.zeros(b, dtype=torch.int32, device=dev)
                             for _ in range(num_groups)]
        self.empty_cu = torch.zeros(1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.hidden: dict[int, torch.Tensor] = {}  # [size, hidden] static output per graph
        self.pool = None

    def _meta(self, size: int) -> AttentionMetadata:
        groups = [
            GroupMetadata(self.slot_mapping[g][:size], self.block_tables[g][:size],
                          self.context_lens[g][:size], None, None)
            for g in range(len(self.slot_mapping))
        ]
        return AttentionMetadata(size, self.empty_cu, groups)

    def _forward(self, size: int) -> torch.Tensor:
        backend = PagedAttention(self.kv_cache, self._meta(size))
        return self.model.forward(self.input_ids[:size], self.positions[:size], backend)

    @torch.inference_mode()
    def capture(self) -> None:
        # Largest first, so smaller graphs reuse its memory pool.
        for size in reversed(self.batch_sizes):
            self._forward(size)  # warm-up: Triton compiles/autotunes outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.hidden[size] = self._forward(size)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()

    def can_run(self, batch) -> bool:
        n = batch.input_ids.shape[0]
        return batch.meta.num_decodes == n and 0 < n <= self.max_batch and (
            batch.logits_indices.shape[0] == n
        ) and all(gm.block_tables.shape[1] <= self.block_tables[0].shape[1]
                  for gm in batch.meta.groups)

    @torch.inference_mode()
    def run(self, batch) -> torch.Tensor:  # [num_decodes, hidden] final hidden states
        n = batch.input_ids.shape[0]
        size = next(s for s in self.batch_sizes if s >= n)
        self.input_ids[:n].copy_(batch.input_ids)
        self.input_ids[n:size].zero_()
        self.positions[:n].copy_(batch.positions)
        self.positions[n:size].zero_()
        for g, gm in enumerate(batch.meta.groups):
            self.slot_mapping[g][:n].copy_(gm.slot_mapping)
            self.slot_mapping[g][n:size].fill_(-1)
            width = gm.block_tables.shape[1]
            self.block_tables[g][:n, :width].copy_(gm.block_tables)
            self.context_lens[g][:n].copy_(gm.context_lens)
            self.context_lens[g][n:size].zero_()
        self.graphs[size].replay()
        return self.hidden[size][:n].clone()
