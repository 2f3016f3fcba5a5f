"""Plain-PyTorch references of the quantized GEMMs: the definition of correct.

The kernels in ``gemm_w4a16.py`` and ``gemm_fp8.py`` are tested against these. Both compute in fp32
and return x's dtype; the weight formats (and their dequantization) are defined beside the kernels,
so the math of a format lives in one place. No Triton import here.
"""

from __future__ import annotations

import torch

from trt_gemma.kernels.gemm_fp8 import Fp8Weight, activation_scale
from trt_gemma.kernels.gemm_w4a16 import Int4Weight
from trt_gemma.kernels.reference import quantize_fp8 as cast_to_fp8


def w4a16_linear_ref(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """``y = (x * pre_quant_scale) @ ((q - zero) * scale).T``; x ``[..., in]`` -> ``[..., out]``.

    x times ``pre_quant_scale`` is rounded to x's dtype first, as the kernel feeds its tensor cores.
    """
    if w.pre_quant_scale is not None:
        x = (x.float() * w.pre_quant_scale.float()).to(x.dtype)
    grid = w.dequantize(torch.float32, apply_pre_quant_scale=False)  # [out, in]
    return (x.float() @ grid.T).to(x.dtype)


def fp8_linear_ref(x: torch.Tensor, w: Fp8Weight, *, quantize_input: bool = True) -> torch.Tensor:
    """``y = x @ (weight * weight_scale).T``; x ``[..., in]`` -> ``[..., out]``.

    ``quantize_input=True`` is the FP8 x FP8 path: x first goes through e4m3 at ``w.input_scale``
    (static, one scale for the tensor) or, dynamic, at each token's own ``amax(|x[t, :]|) / 448``
    (per-token scales since the row-wise ``_scaled_mm`` path; earlier versions used one amax for
    the whole tensor). False is the W8A16 fallback (x kept as is).
    """
    xf = x.float()
    if quantize_input:
        scale = activation_scale(xf, w.input_scale)  # [] static or [..., 1] per token
        xf = cast_to_fp8(xf, scale).float() * scale
    return (xf @ w.dequantize(torch.float32).T).to(x.dtype)
