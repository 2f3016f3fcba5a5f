"""Triton GeGLU of the decode step: ``gelu_tanh(gate) * up`` in one pass.

Semantics are those of ``gelu_tanh_and_mul_ref`` in ``kernels/reference.py``: torch's op-by-op
``F.gelu(gate, approximate="tanh") * up``, i.e. the gelu is rounded to the activation dtype before
the multiply. gate and up are usually the two halves of the fused gate_up GEMM's output (strided
views); each program reads a ``BLOCK``-wide slice of one row of both and writes one slice.

Numerics: the gelu is computed in fp32 with torch's formula ``0.5 x (1 + tanh(k (x + c x^3)))``,
tanh as ``sign(z) (1 - 2 / (exp(2|z|) + 1))`` (portable: the interpreter has no libdevice tanh).
The product of two values rounded to bf16/fp16 is exact in fp32, so the output is
bit-identical to the reference wherever the rounded gelu is, and within one ulp elsewhere: the
gelu differs from torch's by a few fp32 ulps, which changes its rounding only near a tie. Where
torch's own ``1 + tanh`` cancels (gate below about -5) both are tiny and agree to ~1e-7 absolute,
not in ulps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .compile_spec import KernelSpec
from .norm import _FLOAT_DTYPES, TRITON_TYPES, _check, _round

_BLOCK = 1024  # columns per program: 8 bf16 (one 16-byte vector) per thread at 4 warps
_NUM_WARPS = 4
# Intermediate sizes of the Gemma models we ship recipes for (gemma-3-270m .. gemma-2-27b).
INTERMEDIATE_SIZES = (2048, 6912, 9216, 10240, 14336, 15360, 16384, 21504, 24576, 36864)


@triton.jit
def _gelu_tanh(x):
    # x fp32 -> gelu with the tanh approximation, as torch writes it.
    z = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2 / pi) * (x + c x^3)
    # tanh(|z|) = 1 - 2 / (exp(2|z|) + 1): for z << 0 the small quotient is accurate, so t lands
    # on the same fp32 value next to -1 as torch's tanh and 1 + t cancels the same way. The exp
    # argument is capped where t is already 1 (exp(80) ~ 5e34): exp never overflows.
    t = 1.0 - 2.0 / (tl.exp(tl.minimum(2.0 * tl.abs(z), 80.0)) + 1.0)
    t = tl.where(z < 0, -t, t)
    return 0.5 * x * (1.0 + t)


@triton.jit
def _gelu_tanh_and_mul_kernel(
    gate_ptr,  # [T, I]
    up_ptr,  # [T, I]
    out_ptr,  # [T, I]
    n_cols, stride_g, stride_u, stride_o,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_cols
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(gate_ptr + row * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * stride_u + offs, mask=mask, other=0.0).to(tl.float32)
    g = _round(_gelu_tanh(gate), dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, _round(g * up, dtype), mask=mask)


def gelu_tanh_and_mul(
    gate: torch.Tensor,  # [T, I] (row stride free, last dim contiguous)
    up: torch.Tensor,  # [T, I], gate's dtype
    *,
    out: torch.Tensor | None = None,  # [T, I] in gate.dtype
) -> torch.Tensor:  # [T, I]
    """GeGLU; see ``gelu_tanh_and_mul_ref``."""
    _check("gate", gate, "[T, I]", (None, None), _FLOAT_DTYPES, None)
    t, n = gate.shape
    _check("up", up, "[T, I]", (t, n), (gate.dtype,), gate.device)
    if out is None:
        out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    else:
        _check("out", out, "[T, I] in gate.dtype", (t, n), (gate.dtype,), gate.device)
    if t == 0 or n == 0:
        return out
    _gelu_tanh_and_mul_kernel[(t, triton.cdiv(n, _BLOCK))](
        gate, up, out, n, gate.stride(0), up.stride(0), out.stride(0),
        BLOCK=_BLOCK, num_warps=_NUM_WARPS,
    )  # fmt: skip
    return out


def compile_specs(cc: tuple[int, int]) -> list[KernelSpec]:
    """One kernel per dtype: the width I is a runtime argument and the tile is fixed."""
    del cc
    specs = []
    for ty in TRITON_TYPES.values():
        p = f"*{ty}"
        specs.append(KernelSpec(
            f"gelu_tanh_and_mul[{ty}]", _gelu_tanh_and_mul_kernel,
            {"gate_ptr": p, "up_ptr": p, "out_ptr": p, "n_cols": "i32",
             "stride_g": "i32", "stride_u": "i32", "stride_o": "i32"},
            {"BLOCK": _BLOCK}, num_warps=_NUM_WARPS))  # fmt: skip
    return specs
