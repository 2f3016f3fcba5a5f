"""FP8 (E4M3) quantization: weight scales, static activation scales, KV-cache scales.

Every scale follows the convention of ``kernels/reference.py``: stored = real / scale, and a scale
is ``amax / 448`` so the largest magnitude seen maps onto the largest finite e4m3 value. Pure tensor
functions; collecting the amax values (calibration) happens elsewhere.
"""

from __future__ import annotations

import math

import torch

from trt_gemma.kernels.gemm_fp8 import Fp8Weight
from trt_gemma.kernels.reference import FP8_MAX
from trt_gemma.kernels.reference import quantize_fp8 as cast_to_fp8

_SCALE_FLOOR = 1e-12  # an all-zero weight row still gets a positive scale (its codes are all 0)


def quantize_fp8(
    weight: torch.Tensor,  # [out, in] float
    per_channel: bool = True,
    *,
    input_scale: float | None = None,
) -> Fp8Weight:
    """Round-to-nearest FP8 with one scale per output row (or one per tensor).

    ``input_scale`` (from ``fp8_activation_scale``) makes the activation scale static; None leaves
    it dynamic. Per-channel costs nothing at run time and keeps a row with small weights from losing
    its precision to another row's outlier.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"quantize_fp8: weight must be a float [out, in] matrix, got "
                         f"{weight.dtype} {list(weight.shape)}")
    w = weight.float()
    amax = w.abs().amax(dim=1) if per_channel else w.abs().amax()  # [out] or []
    scale = (amax / FP8_MAX).clamp(min=_SCALE_FLOOR)
    q = cast_to_fp8(w, scale[:, None] if per_channel else scale)
    xs = None if input_scale is None else torch.tensor(float(input_scale), dtype=torch.float32,
                                                       device=weight.device)
    return Fp8Weight(weight=q, weight_scale=scale, input_scale=xs)


def _amax_to_scale(amax: float | torch.Tensor, what: str) -> float | torch.Tensor:
    """amax / 448, elementwise; an amax of 0 (a channel never activated) gets the neutral 1.0."""
    if isinstance(amax, torch.Tensor):
        a = amax.detach().float()
        if not torch.isfinite(a).all() or (a < 0).any():
            raise ValueError(f"{what}: amax must be finite and >= 0, got {a.tolist()}")
        return torch.where(a > 0, a / FP8_MAX, torch.ones_like(a))
    a = float(amax)
    if not math.isfinite(a) or a < 0:
        raise ValueError(f"{what}: amax must be finite and >= 0, got {a}")
    return a / FP8_MAX if a > 0 else 1.0


def fp8_activation_scale(amax: float | torch.Tensor) -> float:
    """Static per-tensor activation scale of a linear's input from its calibrated amax(|x|)."""
    if isinstance(amax, torch.Tensor):
        if amax.numel() != 1:
            raise ValueError(f"fp8_activation_scale: amax must be a scalar, got {list(amax.shape)}")
        amax = float(amax)
    return float(_amax_to_scale(amax, "fp8_activation_scale"))


def kv_cache_scale(amax: float | torch.Tensor) -> float | torch.Tensor:
    """FP8 KV-cache scale(s) from calibrated amax of keys or values: a float, or ``[num_layers]``.

    One scale per layer and per K/V (Gemma's keys after QK-norm and rope have a very different
    range from its values); the cache stores ``k / k_scale`` as in ``write_kv_cache_ref``.
    """
    return _amax_to_scale(amax, "kv_cache_scale")
