"""GPTQ error-compensated rounding (Frantar et al. 2022) on a fixed group-wise INT4 grid.

Round-to-nearest picks each weight's code alone. But the layer's output error on inputs X is
``||X (W - Q).T||^2 = sum_rows (w - q) H (w - q).T`` with ``H = X.T X``: when input channels are
correlated (they are, in every transformer), rounding one column up can be compensated by nudging
later columns of the same row the other way. GPTQ (the OBS update applied column by column) does
exactly that: quantize column j, then add ``-(w_j - q_j) / [H^-1]_jj * [H^-1]_j,j+1:`` to the
not-yet-quantized columns, which is the least-squares optimal correction given the columns already
fixed. With the upper Cholesky factor ``U`` of ``H^-1`` the rows of U are those updates, so the
algorithm is one Cholesky and a sweep over columns in blocks of ``block_size`` (the lazy batch
update of the paper: within a block columns are updated one at a time, the columns after the block
once per block with a matrix product). ``H`` is dampened by ``damp * mean(diag(H))`` on its
diagonal (the paper's 1%) so that it is well conditioned on a few thousand tokens.

The grid is *static* ("static groups" in the reference code): per-group scales and zero points are
fixed before the sweep, here from the (AWQ-scaled, clipped) weight by the ordinary RTN grid, and
GPTQ only chooses codes in 0..15 on that grid. So the stored format is exactly ``Int4Weight``
(packed codes, scales ``[out, G]``, uint8 zeros, optional ``pre_quant_scale``) and nothing
downstream changes. ``act_order`` visits the columns by descending ``diag(H)`` (the paper's
"act order": the most active inputs first, while there are still many columns left to absorb
their error); since the grid is static each column keeps its own group's step and zero, and the
codes are put back in their original column, so the format still needs no permutation.

With a diagonal ``H`` (uncorrelated inputs) every correction is zero and GPTQ returns RTN's codes
exactly. For AWQ-scaled weights ``W * s`` whose inputs are ``x / s``, use
``scale_hessian(H, s)`` = ``diag(1/s) H diag(1/s)``.
"""

from __future__ import annotations

import dataclasses

import torch

from trt_gemma.kernels.gemm_w4a16 import SYMMETRIC_ZERO, Int4Weight, pack_int4
from trt_gemma.quant.int4 import quantize_int4_codes

DEFAULT_DAMP = 0.01  # fraction of mean(diag(H)) added to the diagonal (GPTQ's percdamp)
DEFAULT_BLOCK = 128  # columns per lazy-batch block (GPTQ's blocksize)


def _check_hessian(hessian: torch.Tensor, in_features: int, fn: str) -> None:
    if hessian.dim() != 2 or tuple(hessian.shape) != (in_features, in_features):
        raise ValueError(f"{fn}: hessian must be [{in_features}, {in_features}] (the weight's "
                         f"input width), got {list(hessian.shape)}")
    if not hessian.is_floating_point() or not bool(torch.isfinite(hessian).all()):
        raise ValueError(f"{fn}: hessian must be a finite float matrix")


def scale_hessian(hessian: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The Hessian of inputs ``x / s`` from that of inputs ``x``: ``H / (s s.T)``."""
    if s.dim() != 1 or hessian.shape != (s.numel(), s.numel()):
        raise ValueError(f"scale_hessian: s must be [{hessian.shape[0]}] to match hessian "
                         f"{list(hessian.shape)}, got {list(s.shape)}")
    inv = 1.0 / s.to(hessian.dtype)
    return hessian * inv[:, None] * inv[None, :]


def _inverse_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, fp64 then fp32."""
    h = hessian.double().clone()
    diag = torch.diagonal(h)
    dead = diag <= 0  # channels never active: any code is exact on them
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    diag[dead] = 1.0
    mean = float(diag.mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(8):  # more damping until positive definite (rank-deficient H)
        lower, info = torch.linalg.cholesky_ex(h + (damp * 10**attempt) * mean * eye)
        if int(info) == 0:
            break
    else:
        raise ValueError("gptq: hessian is not positive semi-definite (Cholesky failed)")
    inv = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(inv, upper=True).float()


@torch.no_grad()
def gptq_codes(
    weight: torch.Tensor,  # [out, in] float: the weight to quantize (AWQ-scaled, clipped)
    hessian: torch.Tensor,  # [in, in]: X.T X of the calibration inputs of this weight
    scales: torch.Tensor,  # [out, G] float: the fixed grid step per group
    zeros: torch.Tensor | None,  # [out, G] uint8 zero points; None = symmetric (zero 8)
    group_size: int,
    *,
    damp: float = DEFAULT_DAMP,
    block_size: int = DEFAULT_BLOCK,
    act_order: bool = False,
) -> torch.Tensor:  # uint8 [out, in] codes in 0..15
    """GPTQ's codes for ``weight`` on the given grid (see the module docstring)."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"gptq_codes: weight must be a float [out, in] matrix, got "
                         f"{weight.dtype} {list(weight.shape)}")
    out, k = weight.shape
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"gptq_codes: group_size must be a positive int, got {group_size!r}")
    n_groups = -(-k // group_size)
    _check_hessian(hessian, k, "gptq_codes")
    if tuple(scales.shape) != (out, n_groups) or not scales.is_floating_point():
        raise ValueError(f"gptq_codes: scales must be float [{out}, {n_groups}], got "
                         f"{scales.dtype} {list(scales.shape)}")
    if zeros is not None and tuple(zeros.shape) != (out, n_groups):
        raise ValueError(f"gptq_codes: zeros must be [{out}, {n_groups}], got "
                         f"{list(zeros.shape)}")
    if not damp > 0:
        raise ValueError(f"gptq_codes: damp must be > 0, got {damp}")
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"gptq_codes: block_size must be a positive int, got {block_size!r}")

    hessian = hessian.to(weight.device)
    w = weight.float().clone()
    # Column order: natural, or descending diag(H) ("act order"). The grid is static and each
    # column keeps its own group's step and zero, so codes go back to their original place and
    # the format needs no permutation.
    order = (torch.argsort(torch.diagonal(hessian), descending=True, stable=True) if act_order
             else torch.arange(k, device=w.device))
    u = _inverse_cholesky(hessian[order][:, order], damp)  # [in, in] upper
    w = w[:, order]
    group_of = (order // group_size).tolist()
    step = scales.float()
    zero = zeros.float() if zeros is not None else torch.full_like(step, float(SYMMETRIC_ZERO))
    codes = torch.empty(out, k, dtype=torch.uint8, device=w.device)
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        wb = w[:, b0:b1].clone()
        errs = torch.empty_like(wb)
        ub = u[b0:b1, b0:b1]
        for j in range(b1 - b0):
            g = group_of[b0 + j]
            col = wb[:, j]
            # The exact expression of the RTN quantizer (int4.py), so equal inputs give equal codes.
            q = ((col / step[:, g]).round() + zero[:, g]).clamp(0, 15)
            codes[:, b0 + j] = q.to(torch.uint8)
            err = (col - (q - zero[:, g]) * step[:, g]) / ub[j, j]
            wb[:, j:] -= err[:, None] * ub[j, j:][None, :]
            errs[:, j] = err
        w[:, b1:] -= errs @ u[b0:b1, b1:]
    unpermuted = torch.empty_like(codes)
    unpermuted[:, order] = codes
    return unpermuted


def quantize_int4_gptq(
    weight: torch.Tensor,  # [out, in] float, in even
    hessian: torch.Tensor,  # [in, in] X.T X of the inputs the weight multiplies
    group_size: int = 128,
    *,
    symmetric: bool = True,
    scale_dtype: torch.dtype | None = None,
    damp: float = DEFAULT_DAMP,
    block_size: int = DEFAULT_BLOCK,
    act_order: bool = False,
) -> Int4Weight:
    """Group-wise INT4 with RTN's grid (scales, zeros from ``weight``) and GPTQ's codes."""
    _, scales, zeros = quantize_int4_codes(weight, group_size, symmetric=symmetric,
                                           scale_dtype=scale_dtype)
    codes = gptq_codes(weight, hessian, scales, zeros, group_size, damp=damp,
                       block_size=block_size, act_order=act_order)
    if codes.shape[1] % 2:
        raise ValueError(f"INT4 packing needs an even input width, got {codes.shape[1]}")
    return Int4Weight(qweight=pack_int4(codes), scales=scales, zeros=zeros, pre_quant_scale=None,
                      group_size=group_size)


def split_int4_rows(weight: Int4Weight, rows: list[int]) -> list[Int4Weight]:
    """Split a stacked ``Int4Weight`` (e.g. q/k/v quantized in one sweep) back by output rows."""
    if sum(rows) != weight.out_features or any(r <= 0 for r in rows):
        raise ValueError(f"split_int4_rows: rows must be positive and sum to "
                         f"{weight.out_features}, got {rows}")
    out, r0 = [], 0
    for r in rows:
        part = {n: t[r0:r0 + r] for n, t in weight.tensors().items() if n != "pre_quant_scale"}
        out.append(dataclasses.replace(weight, **part))
        r0 += r
    return out

