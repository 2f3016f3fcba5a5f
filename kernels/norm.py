"""Triton RMSNorm kernels of the decode step: ``rms_norm`` and ``add_rms_norm`` (residual add with
Gemma 2/3's post-norm before it and the next sublayer's norm after it, in one pass over the row).

Semantics are those of ``rms_norm_ref`` / ``add_rms_norm_ref`` in ``kernels/reference.py``
(gemma_pytorch's numerics): normalise in fp32, multiply by the fp32 ``scale = 1 + w`` that the
caller made once (``ops.norm_scale``), round to the activation dtype.

One program per row, the whole row in registers (``BLOCK = next_pow2(D)``; wide rows get more
warps), so each row is read once and written once. What matches the reference bit for bit:
``new_residual`` without ``pre_scale`` (one fp32 add, rounded once, as torch's ``residual + h``).
Within one ulp of the activation dtype: the normed outputs (the kernel sums squares in another
order and uses the hardware's approximate rsqrt).

Also home of the helpers the other fused kernels share (``_check``, ``_round``, ``_inv_rms``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import check_tensor as _check
from .compile_spec import KernelSpec

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# Hidden sizes of the Gemma models we ship recipes for (gemma-3-270m .. gemma-3-27b).
HIDDEN_SIZES = (640, 1152, 2048, 2304, 2560, 3072, 3584, 3840, 4608, 5376)


def _check_eps(eps) -> None:
    if not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps: expected a float >= 0, got {eps!r}")


@triton.jit
def _round(x, dtype: tl.constexpr):
    # fp32 x rounded to dtype, to nearest, ties to even. bf16 is rounded here with integer ops
    # (then the cast is exact): the Triton interpreter's fp32 -> bf16 cast truncates, and the GPU's
    # rounds; this gives the GPU's bits on both, so CPU tests can assert exact equality.
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        x = tl.where(x == x, bits.to(tl.float32, bitcast=True), x)  # NaN stays NaN
    return x.to(dtype)


@triton.jit
def _inv_rms(x, n, eps, AXIS: tl.constexpr):
    # x: fp32 with zeros in the padding; n: the true length of AXIS -> 1 / sqrt(mean(x^2) + eps)
    return tl.math.rsqrt(tl.sum(x * x, axis=AXIS) / n + eps)


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [T, D]
    scale_ptr,  # [D] fp32
    out_ptr,  # [T, D]
    n_cols, eps, stride_x, stride_o,
    BLOCK: tl.constexpr,  # next_pow2(D)
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + offs, mask=mask, other=0.0)
    y = x * _inv_rms(x, n_cols, eps, 0) * scale
    tl.store(out_ptr + row * stride_o + offs, _round(y, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_rms_norm_kernel(
    h_ptr,  # [T, D]
    res_ptr,  # [T, D]
    pre_scale_ptr,  # [D] fp32, read only when HAS_PRE_NORM
    scale_ptr,  # [D] fp32, read only when HAS_NORM
    res_out_ptr,  # [T, D], may be res_ptr: each row is read whole before it is written
    out_ptr,  # [T, D], written only when HAS_NORM
    n_cols, eps, stride_h, stride_r, stride_ro, stride_o,
    BLOCK: tl.constexpr, HAS_PRE_NORM: tl.constexpr, HAS_NORM: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    dtype = res_out_ptr.dtype.element_ty
    h = tl.load(h_ptr + row * stride_h + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_PRE_NORM:
        pre = tl.load(pre_scale_ptr + offs, mask=mask, other=0.0)
        h = _round(h * _inv_rms(h, n_cols, eps, 0) * pre, dtype).to(tl.float32)
    res = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
    new = _round(res + h, dtype)
    tl.store(res_out_ptr + row * stride_ro + offs, new, mask=mask)
    if HAS_NORM:
        x = new.to(tl.float32)
        scale = tl.load(scale_ptr + offs, mask=mask, other=0.0)
        y = x * _inv_rms(x, n_cols, eps, 0) * scale
        tl.store(out_ptr + row * stride_o + offs, _round(y, dtype), mask=mask)


def row_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a whole-row kernel: ~8-16 elements per thread (one or two 16-byte
    vectors of bf16), so 16 warps at gemma-3-27b's 5376 (BLOCK 8192)."""
    block = triton.next_power_of_2(max(1, n_cols))
    return block, min(16, max(4, block // 512))


def _check_scale(name: str, scale, d: int, device) -> None:
    _check(name, scale, "[D] fp32 (1 + w)", (d,), (torch.float32,), device)


def _check_out(name: str, out, like: torch.Tensor, desc: str) -> torch.Tensor:
    if out is None:
        return torch.empty(like.shape, dtype=like.dtype, device=like.device)
    _check(name, out, desc, tuple(like.shape), (like.dtype,), like.device)
    return out


def rms_norm(
    x: torch.Tensor,  # [T, D] (row stride free, last dim contiguous)
    scale: torch.Tensor,  # [D] fp32
    eps: float,
    *,
    out: torch.Tensor | None = None,  # [T, D] in x.dtype
) -> torch.Tensor:  # [T, D] in x.dtype
    """Gemma RMSNorm of each row; see ``rms_norm_ref``."""
    _check("x", x, "[T, D]", (None, None), _FLOAT_DTYPES, None)
    t, d = x.shape
    _check_scale("scale", scale, d, x.device)
    _check_eps(eps)
    out = _check_out("out", out, x, "[T, D] in x.dtype")
    if t == 0 or d == 0:
        return out
    block, warps = row_config(d)
    _rms_norm_kernel[(t,)](
        x, scale, out, d, float(eps), x.stride(0), out.stride(0), BLOCK=block, num_warps=warps
    )
    return out


def add_rms_norm(
    h: torch.Tensor,  # [T, D]
    residual: torch.Tensor,  # [T, D], h's dtype
    scale: torch.Tensor | None,  # [D] fp32, or None: no norm after the add
    eps: float,
    *,
    pre_scale: torch.Tensor | None = None,  # [D] fp32: post-norm h first (Gemma 2/3)
    out: torch.Tensor | None = None,  # [T, D] for normed; must not alias the inputs
    residual_out: torch.Tensor | None = None,  # [T, D] for new_residual; may be `residual`
) -> tuple[torch.Tensor, torch.Tensor | None]:  # (new_residual, normed or None)
    """``new_residual = residual + (rms_norm(h, pre_scale) or h)``, then ``rms_norm(new_residual,
    scale)``; see ``add_rms_norm_ref``. Passing ``residual_out=residual`` updates it in place."""
    _check("h", h, "[T, D]", (None, None), _FLOAT_DTYPES, None)
    t, d = h.shape
    _check("residual", residual, "[T, D]", (t, d), (h.dtype,), h.device)
    if scale is not None:
        _check_scale("scale", scale, d, h.device)
    if pre_scale is not None:
        _check_scale("pre_scale", pre_scale, d, h.device)
    _check_eps(eps)
    residual_out = _check_out("residual_out", residual_out, h, "[T, D] in h.dtype")
    if scale is None:
        if out is not None:
            raise ValueError("out: given, but scale is None (there is no normed output)")
    else:
        out = _check_out("out", out, h, "[T, D] in h.dtype")
        if out.numel() and any(
            out.data_ptr() == o.data_ptr() for o in (h, residual, residual_out)
        ):
            raise ValueError("out: must not alias h, residual or residual_out")
    if t == 0 or d == 0:
        return residual_out, out
    block, warps = row_config(d)
    _add_rms_norm_kernel[(t,)](
        h, residual, h if pre_scale is None else pre_scale, h if scale is None else scale,
        residual_out, residual_out if out is None else out,
        d, float(eps), h.stride(0), residual.stride(0), residual_out.stride(0),
        0 if out is None else out.stride(0),
        BLOCK=block, HAS_PRE_NORM=pre_scale is not None, HAS_NORM=scale is not None,
        num_warps=warps,
    )  # fmt: skip
    return residual_out, out


def compile_specs(cc: tuple[int, int]) -> list[KernelSpec]:
    """Every (dtype, BLOCK, flags) the launchers choose for the real hidden sizes (D itself is a
    runtime argument, so hidden sizes sharing a BLOCK share a compiled kernel)."""
    del cc  # nothing here depends on the architecture
    specs: dict[str, KernelSpec] = {}
    for dtype, block_warps in (
        (ty, row_config(d)) for ty in TRITON_TYPES.values() for d in HIDDEN_SIZES
    ):
        block, warps = block_warps
        p, s = f"*{dtype}", "*fp32"
        scalars = {"n_cols": "i32", "eps": "fp32"}
        specs.setdefault(f"rms_norm[{dtype},B{block}]", KernelSpec(
            f"rms_norm[{dtype},B{block}]", _rms_norm_kernel,
            {"x_ptr": p, "scale_ptr": s, "out_ptr": p, **scalars,
             "stride_x": "i32", "stride_o": "i32"},
            {"BLOCK": block}, num_warps=warps))  # fmt: skip
        for pre in (False, True):
            for norm in (True, False):
                flags = ",pre" * pre + ",norm" * norm
                name = f"add_rms_norm[{dtype},B{block}{flags}]"
                specs.setdefault(name, KernelSpec(
                    name, _add_rms_norm_kernel,
                    {"h_ptr": p, "res_ptr": p, "pre_scale_ptr": s if pre else p,
                     "scale_ptr": s if norm else p, "res_out_ptr": p, "out_ptr": p, **scalars,
                     "stride_h": "i32", "stride_r": "i32", "stride_ro": "i32", "stride_o": "i32"},
                    {"BLOCK": block, "HAS_PRE_NORM": pre, "HAS_NORM": norm},
                    num_warps=warps))  # fmt: skip
    return list(specs.values())
