"""FP8 (E4M3) linear layers: the FP8 weight format and the GEMM that runs it.

Format of a linear layer ``y = x @ W.T``, ``W`` ``[out, in]`` (the convention of
``kernels/reference.py``: stored = real / scale, real = stored * scale):

- ``weight`` float8_e4m3fn ``[out, in]``: ``W / weight_scale`` clamped to +-448.
- ``weight_scale`` fp32 ``[out]`` (per output channel) or ``[]`` (per tensor): ``amax / 448``.
- ``input_scale`` fp32 ``[]`` or None: the static per-tensor activation scale from calibration
  (``amax(|x|) / 448``); None means dynamic (computed from each x). TensorRT-LLM names these
  ``weights_scaling_factor`` and ``activation_scaling_factor``.

Which runs where (``fp8_linear``):

- CUDA, compute capability 8.9+ (Ada, Hopper), in/out multiples of 16, fp16/bf16 x: FP8 x FP8 on
  tensor cores through ``torch._scaled_mm``; x is quantized per tensor with ``input_scale`` (static,
  values beyond 448 * input_scale saturate) or its own amax (dynamic, no host sync). Per-channel
  weight scales are applied to the fp32 output (``_scaled_mm`` gets a unit weight scale).
- Anywhere else (CPU, Ampere and older): the weight is dequantized to x's dtype and x is *not*
  quantized (W8A16). That costs a dequantization per call: callers on such devices should
  dequantize once at load (``Fp8Weight.dequantize``) and keep a dense weight.

``kernels/reference_gemm.py`` holds ``fp8_linear_ref``, the definition of correct for both paths.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trt_gemma.kernels.reference import FP8_DTYPE, FP8_MAX
from trt_gemma.kernels.reference import quantize_fp8 as cast_to_fp8

_SCALE_FLOOR = 1e-12  # an all-zero x or weight still gets a positive (harmless) scale


@dataclass(frozen=True)
class Fp8Weight:
    """An FP8 E4M3 linear weight with per-channel or per-tensor scales."""

    weight: torch.Tensor  # float8_e4m3fn [out, in]: W / weight_scale
    weight_scale: torch.Tensor  # fp32 [out] (per channel) or [] (per tensor)
    input_scale: torch.Tensor | None = None  # fp32 [] static activation scale; None = dynamic

    def __post_init__(self) -> None:
        if self.weight.dtype != FP8_DTYPE or self.weight.dim() != 2:
            raise ValueError(
                f"Fp8Weight.weight must be float8_e4m3fn [out, in], got {self.weight.dtype} "
                f"{list(self.weight.shape)}"
            )
        ws = self.weight_scale
        if ws.dtype != torch.float32 or tuple(ws.shape) not in ((), (self.out_features,)):
            raise ValueError(
                f"Fp8Weight.weight_scale must be fp32 [{self.out_features}] or [], got {ws.dtype} "
                f"{list(ws.shape)}"
            )
        xs = self.input_scale
        if xs is not None and (xs.dtype != torch.float32 or xs.dim() != 0):
            raise ValueError(
                f"Fp8Weight.input_scale must be an fp32 scalar tensor, got {xs.dtype} "
                f"{list(xs.shape)}"
            )

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def per_channel(self) -> bool:
        return self.weight_scale.dim() == 1

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def tensors(self) -> dict[str, torch.Tensor]:
        """The non-None tensors by field name (what the engine directory stores)."""
        names = ("weight", "weight_scale", "input_scale")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def to(self, device: torch.device | str) -> Fp8Weight:
        moved = {n: t.to(device) for n, t in self.tensors().items()}
        return dataclasses.replace(self, **moved)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``fp8_linear(x, self)`` (what ``ops.linear`` calls)."""
        return fp8_linear(x, self)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:  # [out, in]
        """``weight * weight_scale`` computed in fp32, then cast to dtype."""
        scale = self.weight_scale[:, None] if self.per_channel else self.weight_scale
        return (self.weight.float() * scale).to(dtype)


def activation_scale(x: torch.Tensor, input_scale: torch.Tensor | None) -> torch.Tensor:
    """The per-tensor fp32 scale x is quantized with: the static one, else amax(|x|) / 448."""
    if input_scale is not None:
        return input_scale.float()
    return (x.abs().amax().float() / FP8_MAX).clamp(min=_SCALE_FLOOR)


@functools.cache
def _has_fp8_tensor_cores(device_index: int) -> bool:
    return hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability(device_index) >= (8, 9)


def uses_scaled_mm(x: torch.Tensor, w: Fp8Weight) -> bool:
    """Whether ``fp8_linear(x, w)`` runs FP8 x FP8 (``torch._scaled_mm``) rather than W8A16."""
    return (
        x.is_cuda
        and x.dtype in (torch.float16, torch.bfloat16)
        and w.in_features % 16 == 0
        and w.out_features % 16 == 0
        and _has_fp8_tensor_cores(x.device.index if x.device.index is not None else 0)
    )


def fp8_linear(x: torch.Tensor, w: Fp8Weight) -> torch.Tensor:
    """``y = x @ W.T``; x ``[..., in]`` -> y ``[..., out]`` in x's dtype (see module docstring)."""
    if not isinstance(w, Fp8Weight):
        raise TypeError(f"fp8_linear: w must be an Fp8Weight, got {type(w).__name__}")
    if not x.is_floating_point() or x.dtype == FP8_DTYPE:
        raise ValueError(f"fp8_linear: x must be fp16, bf16 or fp32, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != w.in_features:
        raise ValueError(
            f"fp8_linear: x must be [..., {w.in_features}] (w.in_features), got {list(x.shape)}"
        )
    if x.device != w.device:
        raise ValueError(f"fp8_linear: x is on {x.device} but w is on {w.device}")
    if not uses_scaled_mm(x, w):
        return F.linear(x, w.dequantize(x.dtype))
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.in_features)
    x_scale = activation_scale(x2, w.input_scale)
    xq = cast_to_fp8(x2, x_scale)  # [M, in] e4m3
    # _scaled_mm wants the second operand column-major: W.T of a row-major W is exactly that.
    if w.per_channel:
        one = torch.ones((), dtype=torch.float32, device=x.device)
        y = torch._scaled_mm(
            xq, w.weight.t(), scale_a=x_scale, scale_b=one, out_dtype=torch.float32
        )
        y = (y * w.weight_scale).to(x.dtype)
    else:
        y = torch._scaled_mm(
            xq, w.weight.t(), scale_a=x_scale, scale_b=w.weight_scale, out_dtype=x.dtype
        )
    return y.reshape(*lead, w.out_features)
