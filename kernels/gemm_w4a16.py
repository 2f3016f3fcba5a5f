"""INT4 weight-only GEMM (W4A16): the packed INT4 weight format and its Triton kernel.

The format defined here is the contract between the converter (``trt_gemma.quant`` produces it, the
engine directory stores it) and the runtime (this kernel, or ``Int4Weight.dequantize`` on CPU).

Format of a linear layer ``y = x @ W.T`` with ``W`` ``[out, in]``, quantized in groups of
``group_size`` consecutive input channels of one output row:

- ``qweight`` uint8 ``[out, in // 2]``: unsigned 4-bit codes ``q`` in 0..15, two per byte along the
  input dimension. Byte ``j`` of a row holds input channel ``2j`` in its LOW nibble and ``2j + 1``
  in its HIGH nibble: ``byte = q[2j] | q[2j + 1] << 4``. Packing along ``in`` keeps a row's bytes
  contiguous, which is what the kernel's K loop streams.
- ``scales`` ``[out, ceil(in / group_size)]`` (fp32, bf16 or fp16); the last group may be partial.
- ``zeros`` uint8 ``[out, ceil(in / group_size)]`` (asymmetric only, unpacked: it is 1/256 of the
  weight) or None, meaning symmetric with the implicit zero point 8 (signed int4 ``q - 8`` in
  -8..7; a TensorRT-LLM exporter gets its two's-complement nibble as ``q ^ 8``).
- ``pre_quant_scale`` ``[in]`` or None: AWQ's per-input-channel factor, applied to x before the
  product (``1 / s`` of the AWQ search; TensorRT-LLM calls it ``prequant_scaling_factor``).

Real weight: ``W[n, k] = (q[n, k] - zero[n, g]) * scales[n, g] * pre_quant_scale[k]`` with
``g = k // group_size``; the kernel applies ``pre_quant_scale`` to x instead, which is the same
product.

Which runs where: ``w4a16_linear`` launches the Triton kernel (CUDA, or CPU tensors under
``TRITON_INTERPRET=1`` for tests). On CPU the runtime dequantizes once at load
(``Int4Weight.dequantize``) and uses a dense matmul. ``kernels/reference_gemm.py`` holds
``w4a16_linear_ref``, the definition of correct.

Importing this module never imports Triton: the kernel is built on first launch, so CPU-only
installs work and ``TRITON_INTERPRET`` is honoured whenever it is set before that launch.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

import torch

SYMMETRIC_ZERO = 8  # implicit zero point of symmetric weights: q - 8 is signed int4
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[..., k]`` in 0..15 (k even) -> uint8 ``[..., k // 2]``, low nibble first."""
    if q.dtype != torch.uint8:
        raise ValueError(f"pack_int4: q must be uint8, got {q.dtype}")
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4: last dimension of q must be even, got {tuple(q.shape)}")
    if q.numel() and int(q.max()) > 15:
        raise ValueError(f"pack_int4: q holds {int(q.max())}; 4-bit codes are 0..15")
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., k // 2]`` -> uint8 codes ``[..., k]``; the exact inverse of ``pack_int4``."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4: packed must be uint8, got {packed.dtype}")
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


@dataclass(frozen=True)
class Int4Weight:
    """A group-wise INT4 linear weight (see the module docstring for the exact layout)."""

    qweight: torch.Tensor  # uint8 [out, in // 2], input channel 2j in the low nibble of byte j
    scales: torch.Tensor  # [out, n_groups] float: real step of each group
    zeros: torch.Tensor | None  # uint8 [out, n_groups] zero points 0..15; None = symmetric (8)
    pre_quant_scale: torch.Tensor | None  # [in] float multiplier of x (AWQ 1/s); None = ones
    group_size: int  # consecutive input channels sharing one scale (last group may be partial)

    def __post_init__(self) -> None:
        # Shape and dtype checks only: no value reads, so building one never syncs a GPU.
        if self.qweight.dtype != torch.uint8 or self.qweight.dim() != 2:
            raise ValueError(
                f"Int4Weight.qweight must be uint8 [out, in // 2], got {self.qweight.dtype} "
                f"{tuple(self.qweight.shape)}"
            )
        if not isinstance(self.group_size, int) or self.group_size <= 0:
            raise ValueError(f"Int4Weight.group_size must be a positive int, got {self.group_size}")
        expected = (self.out_features, self.n_groups)
        if self.scales.dtype not in _FLOAT_DTYPES or tuple(self.scales.shape) != expected:
            raise ValueError(
                f"Int4Weight.scales must be float {list(expected)}, got {self.scales.dtype} "
                f"{list(self.scales.shape)}"
            )
        if self.zeros is not None and (
            self.zeros.dtype != torch.uint8 or tuple(self.zeros.shape) != expected
        ):
            raise ValueError(
                f"Int4Weight.zeros must be uint8 {list(expected)}, got {self.zeros.dtype} "
                f"{list(self.zeros.shape)}"
            )
        pqs = self.pre_quant_scale
        bad_pqs = pqs is not None and (
            pqs.dtype not in _FLOAT_DTYPES or tuple(pqs.shape) != (self.in_features,)
        )
        if bad_pqs:
            raise ValueError(
                f"Int4Weight.pre_quant_scale must be float [{self.in_features}], got {pqs.dtype} "
                f"{list(pqs.shape)}"
            )

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * 2

    @property
    def n_groups(self) -> int:
        return -(-self.in_features // self.group_size)

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def tensors(self) -> dict[str, torch.Tensor]:
        """The non-None tensors by field name (what the engine directory stores)."""
        names = ("qweight", "scales", "zeros", "pre_quant_scale")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def to(self, device: torch.device | str) -> Int4Weight:
        moved = {n: t.to(device) for n, t in self.tensors().items()}
        return dataclasses.replace(self, **moved)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` by the path for x's device (what ``ops.linear`` calls).

        The Triton kernel on CUDA (and on CPU under ``TRITON_INTERPRET=1``); else the reference,
        which dequantizes on every call: CPU runtimes should dequantize once at load instead.
        """
        if x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
            return w4a16_linear(x, self)
        from trt_gemma.kernels.reference_gemm import w4a16_linear_ref

        return w4a16_linear_ref(x, self)

    def dequantize(
        self, dtype: torch.dtype = torch.float32, *, apply_pre_quant_scale: bool = True
    ) -> torch.Tensor:  # [out, in]
        """The dense weight, computed in fp32 then cast: ``F.linear(x, w.dequantize())`` ~ x @ W.T.

        ``apply_pre_quant_scale=False`` gives the stored grid ``(q - zero) * scale`` alone (what
        the kernel multiplies x-after-pre-scaling with).
        """
        def per_channel(t: torch.Tensor) -> torch.Tensor:  # [out, G] -> [out, in] fp32
            return t.float().repeat_interleave(self.group_size, dim=1)[:, : self.in_features]

        q = unpack_int4(self.qweight).float()  # [out, in]
        zero = per_channel(self.zeros) if self.zeros is not None else SYMMETRIC_ZERO
        grid = (q - zero) * per_channel(self.scales)
        if apply_pre_quant_scale and self.pre_quant_scale is not None:
            grid = grid * self.pre_quant_scale.float()[None, :]
        return grid.to(dtype)


# --------------------------------------------------------------------------------------------
# Triton kernel


@functools.cache
def _kernel():
    """Build the kernel on first use (see the module docstring for why it is not module-level)."""
    import triton
    import triton.language as tl

    @triton.jit
    def w4a16_gemm_kernel(
        x_ptr,  # [M, K] activations (fp16 | bf16 | fp32)
        qw_ptr,  # [N, K // 2] uint8, channel 2j in the low nibble of byte j
        scales_ptr,  # [N, G] float group steps
        zeros_ptr,  # [N, G] uint8 zero points (read only when HAS_ZEROS)
        pqs_ptr,  # [K] float pre-quant scale of x (read only when HAS_PRE_SCALE)
        y_ptr,  # [M, N] output, x's dtype
        M, N, K,
        stride_xm, stride_xk, stride_qn, stride_sn, stride_zn, stride_ym,
        GROUP_SIZE: tl.constexpr,
        HAS_ZEROS: tl.constexpr,
        HAS_PRE_SCALE: tl.constexpr,
        # "ieee": exact fp32 products, for fp32 x (no silent tf32) and for the Triton interpreter,
        # which multiplies 16-bit floats as their raw integer bits. Else 16-bit tensor cores.
        DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,  # divides GROUP_SIZE: a K tile never straddles two groups
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        # int64 rows/cols: M * N of a long prefill through a vocabulary-sized layer passes 2**31.
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        offs_b = tl.arange(0, BLOCK_K // 2)  # byte offsets inside a K tile
        mask_m = offs_m < M
        mask_n = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
                mask=mask_m[:, None] & (k[None, :] < K), other=0.0,
            )  # [BLOCK_M, BLOCK_K]
            if HAS_PRE_SCALE:
                pqs = tl.load(pqs_ptr + k, mask=k < K, other=0.0).to(tl.float32)
                x = (x.to(tl.float32) * pqs[None, :]).to(x_ptr.dtype.element_ty)
            b = k0 // 2 + offs_b
            packed = tl.load(
                qw_ptr + offs_n[:, None] * stride_qn + b[None, :],
                mask=mask_n[:, None] & (b[None, :] < K // 2), other=0,
            )  # [BLOCK_N, BLOCK_K // 2] uint8
            q = tl.interleave(packed & 0xF, packed >> 4).to(tl.int32)  # [BLOCK_N, BLOCK_K]
            g = k0 // GROUP_SIZE
            if HAS_ZEROS:
                zero = tl.load(zeros_ptr + offs_n * stride_zn + g, mask=mask_n, other=0)
                q = q - zero.to(tl.int32)[:, None]
            else:
                q = q - 8
            # Small integers are exact in fp16/bf16: the dot runs on tensor cores and the group
            # step is applied once per tile to the fp32 partial sums.
            if DOT_PRECISION == "ieee":
                part = tl.dot(x.to(tl.float32), tl.trans(q.to(tl.float32)), input_precision="ieee")
            else:
                part = tl.dot(x, tl.trans(q.to(x_ptr.dtype.element_ty)))  # [BLOCK_M, BLOCK_N]
            step = tl.load(scales_ptr + offs_n * stride_sn + g, mask=mask_n, other=0.0)
            acc += part * step.to(tl.float32)[None, :]
        tl.store(
            y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
            acc.to(y_ptr.dtype.element_ty),
            mask=mask_m[:, None] & mask_n[None, :],
        )

    return w4a16_gemm_kernel


def _block_k(group_size: int) -> int:
    """Largest power of two <= 128 dividing group_size (>= 16, what tl.dot needs)."""
    block = 128
    while group_size % block:
        block //= 2
    return block


def w4a16_linear(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """``y = x @ W.T`` with W dequantized inside the kernel; x ``[..., in]`` -> y ``[..., out]``.

    fp32 accumulation; output in x's dtype. Any number of rows (M = 1 decode included).
    """
    if not isinstance(w, Int4Weight):
        raise TypeError(f"w4a16_linear: w must be an Int4Weight, got {type(w).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"w4a16_linear: x must be fp16, bf16 or fp32, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != w.in_features:
        raise ValueError(
            f"w4a16_linear: x must be [..., {w.in_features}] (w.in_features), got {list(x.shape)}"
        )
    if x.device != w.device:
        raise ValueError(f"w4a16_linear: x is on {x.device} but w is on {w.device}")
    if w.group_size % 16:
        raise ValueError(f"w4a16_linear: w.group_size must be a multiple of 16, got {w.group_size}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.in_features)
    m, n, k = x2.shape[0], w.out_features, w.in_features
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*lead, n)
    qweight, scales = w.qweight.contiguous(), w.scales.contiguous()
    zeros = w.zeros.contiguous() if w.zeros is not None else scales  # dummy, never read
    pqs = w.pre_quant_scale.contiguous() if w.pre_quant_scale is not None else scales  # dummy
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = 64
    grid = (-(-m // block_m), -(-n // block_n))
    _kernel()[grid](
        x2, qweight, scales, zeros, pqs, y,
        m, n, k,
        x2.stride(0), x2.stride(1), qweight.stride(0), scales.stride(0), zeros.stride(0),
        y.stride(0),
        GROUP_SIZE=w.group_size,
        HAS_ZEROS=w.zeros is not None,
        HAS_PRE_SCALE=w.pre_quant_scale is not None,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 or not x.is_cuda else "fast",
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=_block_k(w.group_size),
        num_warps=4,
        num_stages=3,
    )
    return y.reshape(*lead, n)
