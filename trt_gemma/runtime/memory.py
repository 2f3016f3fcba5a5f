"""How many bytes the KV cache may take.

CPU: ``kv_cache_memory`` bytes (default 1.5 GiB). CUDA: ``gpu_memory_utilization`` of the GPU, less
what is already in use (weights, other processes) and the peak of a profiling step with a full token
budget and ``max_num_seqs`` logits rows (activations, logits, sampler temporaries). The CUDA path
is written for H100-class GPUs but has not been run yet (no GPU where it was written).
"""

from __future__ import annotations

import torch

from trt_gemma import ops
from trt_gemma.model import AttentionBackend
from trt_gemma.runtime.config import GiB, EngineConfig

DEFAULT_CPU_KV_BYTES = 3 * GiB // 2  # Gemma 3 270M: a full 32k context fits, with room


class _NoCache(AttentionBackend):
    """Attention backend for profiling: one sequence attending to its own keys, nothing stored."""

    def attend(self, layer, q, k, v, *, scale, sliding_window, softcap):
        cu = torch.tensor([0, q.shape[0]], dtype=torch.int32, device=q.device)
        return ops.prefill_attention(q, k, v, cu, cu, scale=scale, causal=True,
                                     sliding_window=sliding_window, softcap=softcap)


def kv_cache_budget(model, config: EngineConfig) -> int:
    if config.kv_cache_memory is not None:
        return config.kv_cache_memory
    if model.device.type != "cuda":
        return DEFAULT_CPU_KV_BYTES
    return _cuda_budget(model, config)


@torch.inference_mode()
def _cuda_budget(model, config: EngineConfig) -> int:  # unverified: written without a GPU
    device = model.device
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    n = config.max_num_batched_tokens
    ids = torch.zeros(n, dtype=torch.int64, device=device)
    hidden = model.forward(ids, torch.arange(n, device=device), _NoCache())
    rows = hidden[: min(n, config.max_num_seqs)]
    logits = model.compute_logits(rows)
    # The sampler's softmax/noise/sort copies: about three more logits-sized tensors.
    spare = [torch.empty_like(logits) for _ in range(3)]
    del hidden, rows, logits, spare
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    used_elsewhere = total - free
    budget = int(total * config.gpu_memory_utilization) - used_elsewhere - peak
    if budget <= 0:
        raise MemoryError(
            f"no GPU memory left for the KV cache: {total / GiB:.1f} GiB total, "
            f"{used_elsewhere / GiB:.1f} GiB in use, {peak / GiB:.1f} GiB for a step's "
            "activations; "
            "raise gpu_memory_utilization or lower max_num_batched_tokens / max_num_seqs"
        )
    return budget
