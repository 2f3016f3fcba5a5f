"""``bench throughput``: requests/s, tokens/s, request latency, KV usage and memory bandwidth.

Achieved bandwidth (CUDA only) is the bytes the run had to read divided by its wall time:

- every step reads every weight once (the decoder's linears and norms, and the whole LM head),
  whatever the batch: ``weight_bytes * steps``;
- every decode token reads its sequence's KV cache: per layer ``2 * kv_size * kv_itemsize``
  bytes per token of context, sliding layers only their window's worth.

Prefill steps are compute-bound and their time is in the denominator too, so on prompt-heavy
workloads the figure understates what decode alone achieves. The peak comes from a table of
datasheet HBM bandwidths keyed by device name (``TRT_GEMMA_PEAK_TBS`` overrides it).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from trt_gemma.bench.peaks import peak_tbs
from trt_gemma.bench.runner import Trace, summary
from trt_gemma.bench.workload import BenchRequest

def _nbytes(obj: Any, seen: set[int]) -> int:
    """Bytes of the tensors in a weight (dense, packed or quantized), each tensor once."""
    if obj is None or id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o, seen) for o in obj)
    if dataclasses.is_dataclass(obj):
        return sum(_nbytes(getattr(obj, f.name), seen) for f in dataclasses.fields(obj))
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):  # packed_linear.PackedLinearWeight
        return int(torch.Size(obj.shape).numel()) * obj.dtype.itemsize
    return 0


def weight_bytes_per_step(model) -> int:
    """Weights one step reads: decoder layers, final norm and the full LM head (the embedding
    table itself only for the batch's rows, left out)."""
    seen: set[int] = set()
    return (sum(_nbytes(w, seen) for w in model.layers) + _nbytes(model.final_norm, seen)
            + _nbytes(model.lm_head, seen))


def _sum_min(a: int, b: int, window: int | None) -> int:
    """sum(min(c, window) for c in a..b), in closed form (0 when b < a)."""
    if b < a:
        return 0
    if window is None or b <= window:
        return (a + b) * (b - a + 1) // 2
    low = 0 if a > window else (a + window) * (window - a + 1) // 2
    return low + (b - max(a - 1, window)) * window


def kv_bytes_read(config, kv_itemsize: int, requests: list[BenchRequest]) -> int:
    """KV-cache bytes the decode steps of ``requests`` read (the first token is the prefill's;
    token k > 0 attends over prompt + k tokens)."""
    per_token_layer = 2 * config.kv_size * kv_itemsize
    windows = [config.layer_window(i) for i in range(config.num_hidden_layers)]
    total = 0
    for r in requests:
        a, b = r.input_len + 1, r.input_len + r.output_len - 1
        total += sum(_sum_min(a, b, w) for w in windows)
    return per_token_layer * total


def bandwidth(model, kv_itemsize: int, requests: list[BenchRequest], trace: Trace) -> dict:
    weights = weight_bytes_per_step(model)
    read = weights * trace.num_steps + kv_bytes_read(model.config, kv_itemsize, requests)
    out = {"weight_bytes_per_step": weights, "bytes_read": read,
           "bytes_per_step_mean": read / max(trace.num_steps, 1),
           "achieved_gbs": None, "peak_gbs": None, "fraction_of_peak": None, "why": None}
    if model.device.type != "cuda":
        out["why"] = (f"device is {model.device.type}: bandwidth is measured against a GPU's "
                      "HBM peak on CUDA only")
        return out
    name = torch.cuda.get_device_name(model.device)
    out["achieved_gbs"] = read / trace.elapsed_s / 1e9
    peak = peak_tbs(name)
    if peak is None:
        out["why"] = f"no peak bandwidth known for {name!r}: set TRT_GEMMA_PEAK_TBS"
        return out
    out["peak_gbs"] = peak * 1e3
    out["fraction_of_peak"] = out["achieved_gbs"] / out["peak_gbs"]
    return out


def results(model, kv_itemsize: int, requests: list[BenchRequest], trace: Trace,
            num_kv_blocks: tuple[int, ...]) -> dict:
    """The throughput figures of one run, as the JSON stores them."""
    t = trace.elapsed_s
    inputs = sum(r.input_len for r in requests)
    outputs = trace.output_tokens
    return {
        "num_requests": len(requests), "input_tokens": inputs, "output_tokens": outputs,
        "expected_output_tokens": sum(r.output_len for r in requests),
        "output_tokens_per_request": [len(v) for v in trace.token_times.values()],
        "elapsed_s": t, "steps": trace.num_steps,
        "requests_per_s": len(requests) / t, "output_tokens_per_s": outputs / t,
        "total_tokens_per_s": (inputs + outputs) / t,
        "latency_s": summary(trace.latencies()), "ttft_s": summary(trace.ttfts()),
        "peak_kv_cache_usage": trace.peak_kv_cache_usage, "num_kv_blocks": list(num_kv_blocks),
        "preemptions": trace.num_preemptions,
        "bandwidth": bandwidth(model, kv_itemsize, requests, trace),
    }
