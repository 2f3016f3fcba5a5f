"""Group-wise INT4 round-to-nearest (RTN) weight quantization: the baseline AWQ must beat.

Produces ``Int4Weight`` (format defined in ``kernels/gemm_w4a16.py``). Symmetric: step =
amax / 7 per group, codes ``round(w / step)`` in -8..7 stored as ``q + 8``. Asymmetric: step =
(max - min) / 15, zero point ``round(-min / step)`` in 0..15, codes ``round(w / step) + zero``.
Every element is then within step / 2 of its original value. Scales are rounded (up) to their
storage dtype *before* the codes are computed, so codes and stored scales agree exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trt_gemma.kernels.gemm_w4a16 import SYMMETRIC_ZERO, Int4Weight, pack_int4

_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _scale_dtype(weight: torch.Tensor, scale_dtype: torch.dtype | None) -> torch.dtype:
    """Default: the weight's own dtype when it is fp16/bf16 (the activation dtype), else fp32."""
    dtype = scale_dtype or (weight.dtype if weight.dtype in _SCALE_DTYPES else torch.float32)
    if dtype not in _SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be fp32, bf16 or fp16, got {dtype}")
    return dtype


def _scales_in(step: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 steps stored in dtype, rounded *up*: the grid then still spans the group's range, so
    no value is clipped by more than half a step. A zero step becomes the dtype's tiny."""
    stored = step.to(dtype)
    up = torch.nextafter(stored, stored.new_tensor(float("inf")))
    stored = torch.where(stored.float() < step, up, stored)
    return stored.clamp(min=torch.finfo(dtype).tiny)


def quantize_int4_codes(
    weight: torch.Tensor,  # [out, in] float
    group_size: int,
    *,
    symmetric: bool = True,
    scale_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """-> (codes uint8 [out, in] in 0..15, scales [out, G], zeros uint8 [out, G] or None)."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a float [out, in] matrix, got {weight.dtype} "
                         f"{list(weight.shape)}")
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    dtype = _scale_dtype(weight, scale_dtype)
    out, k = weight.shape
    n_groups = -(-k // group_size)
    # A partial last group is padded by repeating its last column: min and max stay the same.
    w = F.pad(weight.float()[:, None, :], (0, n_groups * group_size - k), mode="replicate")
    w = w.view(out, n_groups, group_size)
    if symmetric:
        scales = _scales_in(w.abs().amax(dim=-1) / 7, dtype)  # [out, G]
        q = (w / scales.float()[..., None]).round().clamp(-8, 7) + SYMMETRIC_ZERO
        zeros = None
    else:
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)
        scales = _scales_in((hi - lo) / 15, dtype)
        zeros_f = (-lo / scales.float()).round().clamp(0, 15)
        q = ((w / scales.float()[..., None]).round() + zeros_f[..., None]).clamp(0, 15)
        zeros = zeros_f.to(torch.uint8)
    codes = q.view(out, n_groups * group_size)[:, :k].to(torch.uint8)
    return codes, scales, zeros


def quantize_int4_rtn(
    weight: torch.Tensor,  # [out, in] float, in even
    group_size: int = 128,
    *,
    symmetric: bool = True,
    scale_dtype: torch.dtype | None = None,
) -> Int4Weight:
    """Plain round-to-nearest group-wise INT4 (weight-only)."""
    codes, scales, zeros = quantize_int4_codes(
        weight, group_size, symmetric=symmetric, scale_dtype=scale_dtype
    )
    if codes.shape[1] % 2:
        raise ValueError(f"INT4 packing needs an even input width, got {codes.shape[1]}")
    return Int4Weight(qweight=pack_int4(codes), scales=scales, zeros=zeros, pre_quant_scale=None,
                      group_size=group_size)


def fake_quantize_int4(
    weight: torch.Tensor,  # [out, in] float
    group_size: int,
    *,
    symmetric: bool = True,
    scale_dtype: torch.dtype | None = None,
) -> torch.Tensor:  # [out, in] fp32
    """Quantize then dequantize: the weight the runtime will effectively multiply by."""
    rtn = quantize_int4_rtn(weight, group_size, symmetric=symmetric, scale_dtype=scale_dtype)
    return rtn.dequantize(torch.float32)
