"""Make quantized weights fit the device they will run on, once, at load time.

``Int4Weight.linear`` and ``Fp8Weight.linear`` work anywhere, but off their fast path they
dequantize the whole weight on every call: on CPU that costs a full ``[out, in]`` fp32 weight
build per linear per token. Where no quantized kernel exists for a format the loader should call
``prepare_for_device`` and keep a dense weight instead:

- ``Int4Weight``: the Triton W4A16 kernel runs on CUDA; on CPU it is dequantized.
- ``Fp8Weight``: FP8 tensor cores need CUDA compute capability 8.9+ (Ada, Hopper). Elsewhere
  ``fp8_linear`` falls back to W8A16 by dequantizing per call, so the weight is dequantized here.

Measured on a shared 2-core CPU (gemma-3-270m INT4-AWQ engine, fp32, benchmarks/quant_quality.py):
a 1-token decode step takes 0.044 s dequantized at load vs 0.194 s dequantizing per call (4.4x), a
128-token prefill 0.34 s vs 0.50 s. torch's CPU int4 matmuls were not tried: a dense fp32 GEMM is
what the reference path computes anyway. A dequantized weight is numerically the
weight the quantized GEMM multiplies by (the INT4 grid times ``pre_quant_scale``; FP8 codes times
their scales), so perplexity measured on CPU is the quantized model's, except that FP8 activations
are not rounded to e4m3 (W8A16 rather than W8A8).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from trt_gemma.kernels.gemm_fp8 import Fp8Weight
from trt_gemma.kernels.gemm_w4a16 import Int4Weight


def has_fp8_tensor_cores(device: torch.device | str) -> bool:
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(dev.index or 0) >= (8, 9)


def prepare_for_device(weights: Mapping[str, Any], device: torch.device | str,
                       dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The same weights, with formats the device has no kernel for dequantized to ``dtype``.

    Plain tensors (and the fp32 KV-cache scales) pass through untouched; so do quantized weights
    that have a kernel on the device.
    """
    dev = torch.device(device)
    fp8_ok = has_fp8_tensor_cores(dev)
    out: dict[str, Any] = {}
    for name, w in weights.items():
        no_kernel = (isinstance(w, Int4Weight) and dev.type != "cuda") or (
            isinstance(w, Fp8Weight) and not fp8_ok)
        out[name] = w.dequantize(dtype) if no_kernel else w
    return out
