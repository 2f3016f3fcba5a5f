"""Make quantized weights fit the device they will run on, once, at load time.

``Int4Weight.linear`` and ``Fp8Weight.linear`` work anywhere, but off their fast path they
dequantize the whole weight on every call: on CPU that costs a full ``[out, in]`` fp32 weight
build per linear per token. Where no quantized kernel exists for a format the loader should call
``prepare_for_device`` and keep a dense weight instead:

- ``Int4Weight``: the Triton W4A16 kernels run on CUDA compute capability 8.0+ (their 16-bit
  tensor-core dots); on CPU and older GPUs it is dequantized.
- ``Fp8Weight``: FP8 tensor cores (and the Triton activation-quantization kernel that feeds
  them) need CUDA compute capability 8.9+ (Ada, Hopper). Elsewhere ``fp8_linear`` would fall
  back to W8A16 by dequantizing per call, so the weight is dequantized here.

On a GPU without the kernel, one warning per process names the GPU's compute capability and the
path taken (dense weights in the model's dtype: never a compile error at the first forward).

Measured on a shared 2-core CPU (gemma-3-270m INT4-AWQ engine, fp32, benchmarks/quant_quality.py):
a 1-token decode step takes 0.044 s dequantized at load vs 0.194 s dequantizing per call (4.4x), a
128-token prefill 0.34 s vs 0.50 s. torch's CPU int4 matmuls were not tried: a dense fp32 GEMM is
what the reference path computes anyway. A dequantized weight is numerically the
weight the quantized GEMM multiplies by (the INT4 grid times ``pre_quant_scale``; FP8 codes times
their scales), so perplexity measured on CPU is the quantized model's, except that FP8 activations
are not rounded to e4m3 (W8A16 rather than W8A8).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from typing import Any

import torch

from trt_gemma.kernels.gemm_fp8 import Fp8Weight
from trt_gemma.kernels.gemm_w4a16 import Int4Weight

_log = logging.getLogger(__name__)
FP8_MIN_CC = (8, 9)  # FP8 tensor cores: Ada, Hopper
INT4_MIN_CC = (8, 0)  # bf16/fp16 tensor-core dots of the W4A16 kernels: Ampere


def device_capability(device: torch.device | str) -> tuple[int, int] | None:
    """The CUDA compute capability of device, or None for a non-CUDA device."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(dev.index or 0))


def has_fp8_tensor_cores(device: torch.device | str) -> bool:
    cc = device_capability(device)
    return cc is not None and cc >= FP8_MIN_CC


@functools.cache
def _warn_dequantized(fmt: str, cc: tuple[int, int], dtype: torch.dtype) -> None:
    """Logged once per process (per format and GPU): the hot path never logs."""
    need = ".".join(map(str, FP8_MIN_CC if fmt == "FP8" else INT4_MIN_CC))
    _log.warning(
        "%s weights: this GPU (compute capability %d.%d) has no %s GEMM kernel (needs %s+); "
        "dequantizing them once at load and running %s linears",
        fmt, cc[0], cc[1], fmt, need, str(dtype).removeprefix("torch."),
    )


def prepare_for_device(weights: Mapping[str, Any], device: torch.device | str,
                       dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The same weights, with formats the device has no kernel for dequantized to ``dtype``
    (default: bfloat16 on CUDA, float32 elsewhere, the model's default dtype there).

    Plain tensors (and the fp32 KV-cache scales) pass through untouched; so do quantized weights
    that have a kernel on the device.
    """
    dev = torch.device(device)
    cc = device_capability(dev)
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    out: dict[str, Any] = {}
    for name, w in weights.items():
        fmt = "FP8" if isinstance(w, Fp8Weight) else "INT4" if isinstance(w, Int4Weight) else None
        need = FP8_MIN_CC if fmt == "FP8" else INT4_MIN_CC
        if fmt is None or (cc is not None and cc >= need):
            out[name] = w
            continue
        if cc is not None:  # a GPU without the kernel; on CPU dequantizing is the plan, no news
            _warn_dequantized(fmt, cc, dtype)
        out[name] = w.dequantize(dtype)
    return out
