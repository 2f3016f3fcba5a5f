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
  tensor cores. x is quantized to e4m3 by ONE Triton launch (``quantize_activation``): divided by
  the static ``input_scale`` (values beyond 448 * input_scale saturate) or, when dynamic, by its
  own per-token scale ``amax(|x[m, :]|) / 448`` (each row of the batch its own scale, so one
  sequence's outlier token no longer coarsens every other row; a change from the per-tensor
  dynamic scale of earlier versions, and ``fp8_linear_ref`` follows it). The rounding is
  ``reference.quantize_fp8``'s, bit for bit (correctly rounded division, clamp, round to nearest
  even). Then ``torch._scaled_mm``:

  - row-wise (bf16 x, per-channel weight, sm89 or sm90): activation scales ``[M, 1]`` and weight
    scales ``[1, N]`` fp32 go into the GEMM's epilogue, bf16 out: 2 launches per linear. torch's
    rules for row-wise scales: fp32 contiguous scales of exactly those shapes, x row-major and W
    column-major, K and N multiples of 16, bf16 output (fp16/fp32 output only on some
    torch/CUDA/arch combinations: not relied on), and only sm89 (CUTLASS) and sm90 (CUTLASS or
    cuBLAS); cuBLAS has no row-wise scaling on sm100+.
  - otherwise (fp16 x, per-tensor weight, other FP8 GPUs): unit scales, fp32 out, then
    ``* x_scale * weight_scale`` and a cast (the earlier path, now with per-token x scales).
- Anywhere else (CPU, Ampere and older): the weight is dequantized to x's dtype and x is *not*
  quantized (W8A16). That costs a dequantization per call: callers on such devices should
  dequantize once at load (``Fp8Weight.dequantize``; ``quant/runtime.prepare_for_device`` does,
  and says so once per process).

``kernels/reference_gemm.py`` holds ``fp8_linear_ref``, the definition of correct for both paths.
Importing this module never imports Triton (the quantization kernel is built on first launch).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trt_gemma.kernels.reference import FP8_DTYPE, FP8_MAX

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
    """The fp32 scale x ``[..., K]`` is quantized with: the static one (``[]``), else per token
    ``amax(|x|) / 448`` over the last dimension (``[..., 1]``), floored at 1e-12."""
    if input_scale is not None:
        return input_scale.float()
    return (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp(min=_SCALE_FLOOR)


# --------------------------------------------------------------------------------------------
# Activation quantization: one Triton launch


def _quant_block(k: int) -> tuple[int, int]:
    """(BLOCK_K, num_warps) of the activation quantization: a row in 1 to 9 steps of 512 to 4096
    channels (Gemma's K: 640 to 36864), 4 to 16 channels per thread."""
    block = min(4096, max(512, 1 << (k - 1).bit_length()))
    return block, 4 if block <= 1024 else 8


@functools.cache
def _quant_kernel():
    """Build the kernel on first use (the module docstring says why it is not module-level)."""
    import triton
    import triton.language as tl

    @triton.jit
    def fp8_quant_kernel(
        x_ptr,  # [M, K] fp16 | bf16 activations, unit column stride
        xq_ptr,  # [M, K] float8_e4m3fn out: x / scale, clamped to +-448, rounded to nearest even
        scale_ptr,  # [M] fp32 out: each row's scale (the static one repeated when STATIC)
        static_ptr,  # [] fp32 static input scale (read only when STATIC)
        K,
        stride_xm, stride_qm,
        STATIC: tl.constexpr,  # divide by *static_ptr; else by the row's amax / 448
        BLOCK_K: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_K)
        x_row = x_ptr + row * stride_xm
        if STATIC:
            scale = tl.load(static_ptr).to(tl.float32)
        else:
            amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0)
                amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
            # Correctly rounded, as torch divides: the scale is bit-identical to the reference's.
            scale = tl.maximum(tl.math.div_rn(tl.max(amax, 0), 448.0), 1e-12)
        tl.store(scale_ptr + row, scale)
        for k0 in range(0, K, BLOCK_K):
            mask = k0 + offs < K
            x = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
            v = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -448.0), 448.0)
            # v -> the nearest e4m3 value (ties to even), still fp32: exact, so the cast below
            # cannot round again, whatever rounding it does (the interpreter's differs from the
            # GPU's). e4m3 keeps 3 fraction bits; below 2**-6 its step is 2**-9.
            a = tl.abs(v)
            ulp_exp = tl.maximum((a.to(tl.int32, bitcast=True) >> 23) - 127, -6) - 3
            up = ((127 - ulp_exp) << 23).to(tl.float32, bitcast=True)  # 2**-ulp_exp
            down = ((127 + ulp_exp) << 23).to(tl.float32, bitcast=True)  # 2**ulp_exp
            r = ((a * up + 8388608.0) - 8388608.0) * down  # a * up < 16 exact; + 2**23: to even
            sign = (v.to(tl.int32, bitcast=True) >> 31) << 31  # -0.0, tiny negatives stay negative
            q = (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
            tl.store(xq_ptr + row * stride_qm + k0 + offs, q.to(xq_ptr.dtype.element_ty),
                     mask=mask)

    return fp8_quant_kernel


def quantize_activation(
    x: torch.Tensor, input_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``[M, K]`` fp16/bf16 -> (e4m3 ``[M, K]``, fp32 scales ``[M, 1]``) in one Triton launch;
    bit-identical to ``reference.quantize_fp8(x, activation_scale(x, input_scale))``."""
    if x.dim() != 2 or x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"quantize_activation: x must be fp16/bf16 [M, K], got {x.dtype} "
                         f"{list(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    xq = torch.empty(m, k, dtype=FP8_DTYPE, device=x.device)
    scales = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m == 0:
        return xq, scales
    static = input_scale is not None
    block, warps = _quant_block(k)
    _quant_kernel()[(m,)](
        x, xq, scales, input_scale if static else scales,
        k, x.stride(0), xq.stride(0),
        STATIC=static, BLOCK_K=block, num_warps=warps,
    )
    return xq, scales


# --------------------------------------------------------------------------------------------
# Dispatch


ROWWISE_CCS = ((8, 9), (9, 0))  # where torch._scaled_mm takes row-wise scales (module docstring)


@functools.cache
def _device_capability(device_index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(device_index))


def _cc(x: torch.Tensor) -> tuple[int, int]:
    return _device_capability(x.device.index if x.device.index is not None else 0)


def fp8_path(cc: tuple[int, int] | None, x_dtype: torch.dtype, w: Fp8Weight) -> str:
    """Which path ``fp8_linear`` takes for x of ``x_dtype`` on a GPU of compute capability ``cc``
    (None: not CUDA): "rowwise", "unit-scales" (both ``_scaled_mm``) or "w8a16"."""
    if (
        cc is None
        or tuple(cc) < (8, 9)
        or x_dtype not in (torch.float16, torch.bfloat16)
        or w.in_features % 16
        or w.out_features % 16
        or not hasattr(torch, "_scaled_mm")
    ):
        return "w8a16"
    if x_dtype == torch.bfloat16 and w.per_channel and tuple(cc) in ROWWISE_CCS:
        return "rowwise"
    return "unit-scales"


def uses_scaled_mm(x: torch.Tensor, w: Fp8Weight) -> bool:
    """Whether ``fp8_linear(x, w)`` runs FP8 x FP8 (``torch._scaled_mm``) rather than W8A16."""
    return x.is_cuda and fp8_path(_cc(x), x.dtype, w) != "w8a16"


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
    path = fp8_path(_cc(x), x.dtype, w) if x.is_cuda else "w8a16"
    if path == "w8a16":
        return F.linear(x, w.dequantize(x.dtype))
    lead = x.shape[:-1]
    y = scaled_mm_linear(x.reshape(-1, w.in_features), w, rowwise=path == "rowwise")
    return y.reshape(*lead, w.out_features)


def scaled_mm_linear(x2: torch.Tensor, w: Fp8Weight, *, rowwise: bool) -> torch.Tensor:
    """The FP8 x FP8 path of ``fp8_linear`` on x ``[M, K]`` (fp16/bf16): ``quantize_activation``
    then ``torch._scaled_mm`` with row-wise scales (bf16 x and per-channel w only) or unit ones."""
    xq, x_scale = quantize_activation(x2, w.input_scale)  # [M, K] e4m3, [M, 1] fp32
    # _scaled_mm wants the second operand column-major: W.T of a row-major W is exactly that.
    if rowwise:
        return torch._scaled_mm(xq, w.weight.t(), scale_a=x_scale,
                                scale_b=w.weight_scale.view(1, w.out_features),
                                out_dtype=torch.bfloat16)  # fmt: skip
    one = torch.ones((), dtype=torch.float32, device=x2.device)
    y = torch._scaled_mm(xq, w.weight.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    return (y * x_scale * w.weight_scale).to(x2.dtype)


# --------------------------------------------------------------------------------------------
# Ahead-of-time compile check


def compile_specs(cc: tuple[int, int]) -> list:
    """The activation quantization's configurations (fp16/bf16 x, static/dynamic, each BLOCK_K
    ``_quant_block`` picks); none below sm89, where the FP8 path never runs. ``_scaled_mm`` is
    torch's own (CUTLASS/cuBLAS) and has no spec."""
    from trt_gemma.kernels.compile_spec import KernelSpec

    if tuple(cc) < (8, 9):
        return []
    specs = []
    for t in ("bf16", "fp16"):
        for static in (False, True):
            for block, warps in sorted({_quant_block(k) for k in (512, 1024, 2048, 4096)}):
                name = f"fp8_quant[{t},{'static' if static else 'dynamic'},B{block}]"
                specs.append(KernelSpec(
                    name, _quant_kernel(),
                    {"x_ptr": f"*{t}", "xq_ptr": "*fp8e4nv", "scale_ptr": "*fp32",
                     "static_ptr": "*fp32", "K": "i32", "stride_xm": "i32", "stride_qm": "i32"},
                    {"STATIC": static, "BLOCK_K": block}, num_warps=warps))  # fmt: skip
    return specs
