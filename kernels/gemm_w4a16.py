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

Which runs where: ``w4a16_linear`` runs on CUDA (or on CPU tensors under ``TRITON_INTERPRET=1``
for tests). On CPU the runtime dequantizes once at load (``Int4Weight.dequantize``) and uses a
dense matmul. ``kernels/reference_gemm.py`` holds ``w4a16_linear_ref``, the definition of correct.

Launch configurations: ``choose_config(m, n, k, group_size, dtype, cc, num_sms)`` is what the
launcher calls (``compile_specs`` enumerates its outcomes). The fused kernel computes the product
transposed, ``y.T = W @ x.T``: W's tile is the MMA's wide A operand and the few rows of x its
small B operand, so a 1-row decode does not waste a 16-row MMA dimension on W. Its K step
``block_k`` divides the group (one scale per row per step, applied to the fp32 partial sums: the
4-bit codes enter the tensor cores exactly) and is <= 64 (<= 32 for fp32 x, whose "ieee" dots
take twice the registers); the low and high nibbles of a byte meet x's even and odd channels in
two dots, so the packed bytes are never interleaved in registers.

- small M (``m <= 16``, decode): a 16-row tile of x against 64-column tiles of W (32 for fp32).
  Gemma's decode shapes often leave ``n / 64`` tiles short of the ~4 programs per SM that hide
  memory latency (gemma-2-2b's down projection: 36 tiles, k 9216), so K is split in ``split_k``
  parts (power of two <= 16, each >= 512 channels, whole K steps) until ``tiles * split_k``
  reaches 4 per SM. Split programs store fp32 partial tiles in a scratch buffer (``torch.empty``:
  no launch) and count their arrival on a per-tile int32 counter; the last to arrive sums the
  partials in split order (deterministic, unlike atomic adds), writes y in x's dtype and resets
  its counter. So a decode GEMM is ONE launch, split or not; the counters are zeroed once per
  device and stream when first needed (warm up before capturing a CUDA graph).
- mid M (``16 < m < 256``): the same fused kernel, 64-row tiles of x (8 warps; fp32: 32 or 64
  rows), no split: still bound by reading the 4-bit weight, which this path reads once.
- large M (``m >= 256``, prefill), and shapes the fused kernel does not take (k not a multiple
  of its K step, a group not a multiple of 32, offsets past int32): a Triton kernel dequantizes W
  (``Int4Weight.dequantize``'s fp32 math, ``pre_quant_scale`` folded into W) into a dense buffer
  of x's dtype, at most 64 MiB of it at a time, and cuBLAS (``torch.mm``) multiplies each chunk
  straight into its columns of y: ``2 * ceil(n * k * 2 B / 64 MiB)`` launches in bf16 (2 for a
  gemma-2-2b projection, 4 for gemma-2-9b's 14336 x 3584). Here the GEMM is compute-bound and
  cuBLAS's dense GEMM outruns a mixed-input Triton GEMM; the dequantization's extra ~4.5 bytes
  per weight cost less than the GEMM from roughly m = 256 on an H100 (989 TFLOP/s over
  3.35 TB/s; a paper estimate, to be re-measured on the GPU).

Importing this module never imports Triton: the kernels are built on first launch, so CPU-only
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
# Launch configurations


LARGE_M = 256  # rows from which the dequantize + cuBLAS path runs (see the module docstring)
SMALL_M = 16  # rows up to which one 16-row tile covers x (decode)
_SPLIT_K_MIN_CHANNELS = 512  # a split streams at least this many input channels per program
_SPLIT_K_MAX = 16
_PROGRAMS_PER_SM = 4  # resident programs per SM a decode GEMM aims for (latency hiding)
# Output tiles of a split launch at most (the counters' length): splits only happen when tiles
# are few, and a launch with more tiles runs unsplit.
_MAX_SPLIT_TILES = 1 << 16
_DEQUANT_CHUNK_BYTES = 64 << 20  # dense weight rows dequantized per cuBLAS call, at most
# SM count by compute capability when no device is at hand (compile checks): A100, L40S, H100.
_DEFAULT_SMS = {(8, 0): 108, (8, 6): 84, (8, 9): 142, (9, 0): 132}


@dataclass(frozen=True)
class W4A16Config:
    """One way to run a W4A16 GEMM; ``choose_config`` picks it, the launcher follows it."""

    path: str  # "fused": the Triton GEMM; "dequant": Triton dequantization + cuBLAS
    block_m: int  # rows of x per program (fused)
    block_n: int  # output channels per program (fused) or dequantized rows per program
    block_k: int  # input channels per step: divides the group, so one scale per row per step
    split_k: int  # programs sharing one output tile along K (fused; 1 = no split)
    num_warps: int
    num_stages: int


def _block_k(group_size: int) -> int:
    """Largest power of two <= 128 dividing group_size (>= 16, what tl.dot needs)."""
    block = 128
    while group_size % block:
        block //= 2
    return block


def _split_k(tiles: int, k: int, block_k: int, num_sms: int) -> int:
    """Splits of K so that ``tiles * split`` programs reach ~4 per SM, each split >= 512 channels
    (and a whole number of K tiles, so no split straddles a group)."""
    split = 1
    while (
        tiles * split < _PROGRAMS_PER_SM * num_sms
        and split < _SPLIT_K_MAX
        and k // (2 * split) >= max(_SPLIT_K_MIN_CHANNELS, block_k)
    ):
        split *= 2
    return split


def _fused_fits(m: int, n: int, k: int, group_size: int, block_k: int) -> bool:
    """The fused kernel's preconditions: whole K steps inside one group, two dots of >= 16
    channels each, and int32 offsets."""
    return (block_k >= 32 and k % block_k == 0 and group_size % block_k == 0
            and n * k // 2 < 2**31 and m * max(n, k) < 2**31)


def choose_config(
    m: int, n: int, k: int, group_size: int, dtype: torch.dtype, cc: tuple[int, int],
    num_sms: int | None = None,
) -> W4A16Config:
    """The configuration of a ``[m, k] x [n, k].T`` GEMM (module docstring: small, mid, large M).

    ``cc`` supplies the SM count when ``num_sms`` (the device's own) is not given.
    """
    sms = num_sms or _DEFAULT_SMS.get(tuple(cc), 108)
    fp32 = dtype == torch.float32
    # Fused K step: two dots over its even and odd halves, each >= 16 channels (what tl.dot
    # needs); fp32 ("ieee") operands take twice the registers of 16-bit ones.
    block_k = min(_block_k(group_size), 32 if fp32 else 64)
    if m >= LARGE_M or not _fused_fits(m, n, k, group_size, block_k):
        return _dequant_config(group_size)
    block_n = 32 if fp32 else 64
    if m <= SMALL_M:
        split = _split_k(-(-n // block_n), k, block_k, sms)
        return W4A16Config("fused", 16, block_n, block_k, split, 4, 4)
    if not fp32:
        # One 64-row tile, 8 warps, for all mid M: a 32-row tile (4 or 8 warps) spilled a few
        # bytes in the compile check on sm80/sm89 with some flag sets, and the wider MMA costs
        # nothing while the weight's bytes bound the time.
        return W4A16Config("fused", 64, block_n, block_k, 1, 8, 3)
    block_m = 32 if m <= 32 else 64
    return W4A16Config("fused", block_m, block_n, block_k, 1, 4 if block_m == 32 else 8, 3)


def _dequant_config(group_size: int) -> W4A16Config:
    # 64 rows x one K step per program; 8 warps (4 spill on sm90 at K step 32).
    return W4A16Config("dequant", 0, 64, _block_k(group_size), 1, 8, 1)


# --------------------------------------------------------------------------------------------
# Triton kernels


@functools.cache
def _kernel():
    """Build the fused GEMM on first use (the module docstring says why it is not module-level)."""
    import triton
    import triton.language as tl

    @triton.jit
    def w4a16_gemm_kernel(
        x_ptr,  # [M, K] activations (fp16 | bf16 | fp32), row stride stride_xm, unit column stride
        qw_ptr,  # [N, K // 2] uint8, channel 2j in the low nibble of byte j
        scales_ptr,  # [N, G] float group steps
        zeros_ptr,  # [N, G] uint8 zero points (read only when HAS_ZEROS)
        pqs_ptr,  # [K] float pre-quant scale of x (read only when HAS_PRE_SCALE)
        y_ptr,  # [M, N] output, x's dtype
        part_ptr,  # [split_k, M, N] fp32 partial sums (only when SPLIT)
        count_ptr,  # [tiles] int32 arrival counters, zero before and after a launch (SPLIT)
        M, N, K,  # K a multiple of BLOCK_K (the launcher routes other shapes elsewhere)
        k_per_split,  # input channels per split, a multiple of BLOCK_K (K when not SPLIT)
        split_k,  # programs per output tile along K (grid axis 1)
        stride_xm, stride_qn, stride_sn, stride_zn, stride_ym,
        GROUP_SIZE: tl.constexpr,
        HAS_ZEROS: tl.constexpr,
        HAS_PRE_SCALE: tl.constexpr,
        # "ieee": exact fp32 products, for fp32 x (no silent tf32) and for the Triton interpreter,
        # which multiplies 16-bit floats as their raw integer bits. Else 16-bit tensor cores.
        DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,  # divides GROUP_SIZE: a K tile never straddles two groups
        SPLIT: tl.constexpr,  # split_k > 1: partial sums, reduced by the last split to arrive
    ):
        # The product is computed transposed, y.T tile [BLOCK_N, BLOCK_M] = W tile @ x.T tile: the
        # weight tile is the MMA's A operand (its rows spread over the warps, as wide as an MMA
        # wants even when M is 1) and the few rows of x the small B operand. The packed bytes are
        # never interleaved: the low nibbles (even channels) meet x's even channels in one dot,
        # the high nibbles the odd ones in a second. Offsets are int32: the launcher checks that
        # N * K / 2, M * K and M * N fit.
        tile = tl.program_id(0)
        pid_k = tl.program_id(1)
        tiles_n = tl.cdiv(N, BLOCK_N)
        pid_m = tile // tiles_n
        pid_n = tile % tiles_n
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_j = tl.arange(0, BLOCK_K // 2)  # byte j of a K tile: channels 2j and 2j + 1
        mask_m = offs_m < M
        mask_n = offs_n < N
        x_cols = x_ptr + offs_m[None, :] * tl.multiple_of(stride_xm, 16)  # [1, BLOCK_M]
        q_rows = qw_ptr + offs_n[:, None] * tl.multiple_of(stride_qn, 16)  # [BLOCK_N, 1]
        dt = x_ptr.dtype.element_ty
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        k_start = pid_k * k_per_split
        k_stop = tl.minimum(K, k_start + k_per_split)
        for k0 in range(k_start, k_stop, BLOCK_K):
            j = tl.max_contiguous(tl.multiple_of(k0 // 2 + offs_j, BLOCK_K // 2), BLOCK_K // 2)
            x_even = tl.load(x_cols + 2 * j[:, None], mask=mask_m[None, :], other=0.0)
            x_odd = tl.load(x_cols + 2 * j[:, None] + 1, mask=mask_m[None, :], other=0.0)
            if HAS_PRE_SCALE:  # [BLOCK_K // 2, BLOCK_M] each, rounded to x's dtype
                x_even = (x_even.to(tl.float32) * tl.load(pqs_ptr + 2 * j).to(tl.float32)[:, None]
                          ).to(dt)
                x_odd = (x_odd.to(tl.float32) * tl.load(pqs_ptr + 2 * j + 1).to(tl.float32)[:, None]
                         ).to(dt)
            packed = tl.load(q_rows + j[None, :], mask=mask_n[:, None], other=0)  # [BN, BK // 2]
            g = k0 // GROUP_SIZE
            if HAS_ZEROS:
                zero = tl.load(zeros_ptr + offs_n * stride_zn + g, mask=mask_n, other=0)
                zero = zero.to(tl.int32)[:, None]
            else:
                zero = 8
            # Small integers are exact in fp16/bf16: the dots run on tensor cores and the group
            # step is applied once per tile to the fp32 partial sums.
            w_even = (packed & 0xF).to(tl.int32) - zero  # [BLOCK_N, BLOCK_K // 2]
            w_odd = (packed >> 4).to(tl.int32) - zero
            if DOT_PRECISION == "ieee":  # (the interpreter cannot convert int to bf16 either)
                part = tl.dot(w_even.to(tl.float32), x_even.to(tl.float32), input_precision="ieee")
                part = tl.dot(w_odd.to(tl.float32), x_odd.to(tl.float32), part,
                              input_precision="ieee")
            else:
                part = tl.dot(w_even.to(dt), x_even)
                part = tl.dot(w_odd.to(dt), x_odd, part)  # [BLOCK_N, BLOCK_M]
            step = tl.load(scales_ptr + offs_n * stride_sn + g, mask=mask_n, other=0.0)
            acc += part * step.to(tl.float32)[:, None]
        mask = mask_n[:, None] & mask_m[None, :]
        y_ptrs = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None]
        if SPLIT:
            # Partial tile -> scratch; the barrier makes every thread's stores precede the
            # release of the arrival, so the last split (acquire) reads them all. It sums the
            # splits in index order: the result does not depend on arrival order.
            mn = offs_m[None, :] * N + offs_n[:, None]  # [BLOCK_N, BLOCK_M]
            tl.store(part_ptr + pid_k * M * N + mn, acc, mask=mask)
            tl.debug_barrier()
            arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if arrived == split_k - 1:
                total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                for s in range(0, split_k):
                    # .cg: from L2, never a stale L1 line of an earlier launch's partials.
                    total += tl.load(part_ptr + s * M * N + mn, mask=mask, other=0.0,
                                     cache_modifier=".cg")
                tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=mask)
                tl.store(count_ptr + tile, 0)  # ready for the next launch
        else:
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)

    return w4a16_gemm_kernel


@functools.cache
def _dequant_kernel():
    """Build the dequantization kernel of the large-M path on first use."""
    import triton
    import triton.language as tl

    @triton.jit
    def w4a16_dequant_kernel(
        qw_ptr,  # [N, K // 2] uint8, channel 2j in the low nibble of byte j
        scales_ptr,  # [N, G] float group steps
        zeros_ptr,  # [N, G] uint8 zero points (read only when HAS_ZEROS)
        pqs_ptr,  # [K] float pre-quant scale (read only when HAS_PRE_SCALE)
        w_ptr,  # [rows, K] dense weight out (fp16 | bf16 | fp32): rows row0 .. row0 + rows - 1
        row0, rows, K,
        stride_qn, stride_sn, stride_zn, stride_wn,
        GROUP_SIZE: tl.constexpr,
        HAS_ZEROS: tl.constexpr,
        HAS_PRE_SCALE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,  # divides GROUP_SIZE
    ):
        offs_r = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # dense row
        k0 = tl.program_id(1) * BLOCK_K
        j = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # byte j holds channels 2j, 2j + 1
        n = (row0 + offs_r).to(tl.int64)  # weight row
        mask_r = offs_r < rows
        mask = mask_r[:, None] & (j[None, :] < K // 2)
        packed = tl.load(qw_ptr + n[:, None] * stride_qn + j[None, :], mask=mask, other=0)
        g = k0 // GROUP_SIZE
        if HAS_ZEROS:
            zero = tl.load(zeros_ptr + n * stride_zn + g, mask=mask_r, other=0).to(tl.float32)
            zero = zero[:, None]
        else:
            zero = 8.0
        # Int4Weight.dequantize's order of fp32 operations: (q - zero) * scale, then * pqs.
        step = tl.load(scales_ptr + n * stride_sn + g, mask=mask_r, other=0.0).to(tl.float32)
        w_even = ((packed & 0xF).to(tl.float32) - zero) * step[:, None]
        w_odd = ((packed >> 4).to(tl.float32) - zero) * step[:, None]
        if HAS_PRE_SCALE:
            mask_j = j < K // 2
            w_even *= tl.load(pqs_ptr + 2 * j, mask=mask_j, other=0.0).to(tl.float32)[None, :]
            w_odd *= tl.load(pqs_ptr + 2 * j + 1, mask=mask_j, other=0.0).to(tl.float32)[None, :]
        out = w_ptr + offs_r.to(tl.int64)[:, None] * stride_wn + 2 * j[None, :]
        tl.store(out, w_even.to(w_ptr.dtype.element_ty), mask=mask)
        tl.store(out + 1, w_odd.to(w_ptr.dtype.element_ty), mask=mask)

    return w4a16_dequant_kernel


@functools.cache
def _arrival_counters(device: torch.device, stream: int) -> torch.Tensor:
    """Zeroed int32 counters of split-K tiles, one set per device and stream (two streams never
    share one); each launch leaves them zero again, so they are zeroed only here, once."""
    return torch.zeros(_MAX_SPLIT_TILES, dtype=torch.int32, device=device)


@functools.cache
def _gpu(index: int) -> tuple[tuple[int, int], int]:
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor), props.multi_processor_count


def _device_info(device: torch.device) -> tuple[tuple[int, int], int | None, int]:
    """(compute capability, SM count, current stream id); the interpreter on CPU poses as sm90."""
    if device.type != "cuda":
        return (9, 0), None, 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    return (*_gpu(index), torch.cuda.current_stream(device).cuda_stream)


def _check(x: torch.Tensor, w: Int4Weight) -> None:
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


def w4a16_linear(
    x: torch.Tensor, w: Int4Weight, *, config: W4A16Config | None = None
) -> torch.Tensor:
    """``y = x @ W.T``; x ``[..., in]`` -> y ``[..., out]`` in x's dtype, fp32 accumulation.

    ``config`` defaults to ``choose_config`` for the device (tests pass one to reach every path).
    """
    _check(x, w)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.in_features)
    m, n, k = x2.shape[0], w.out_features, w.in_features
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*lead, n)
    cc, num_sms, stream = _device_info(x.device)
    cfg = config or choose_config(m, n, k, w.group_size, x.dtype, cc, num_sms)
    if cfg.path == "dequant":
        _dequant_matmul(x2, w, y, cfg)
    else:
        _fused(x2, w, y, cfg, stream)
    return y.reshape(*lead, n)


def _operands(w: Int4Weight):
    """(qweight, scales, zeros, pqs) contiguous; absent ones replaced by a never-read dummy."""
    qweight, scales = w.qweight.contiguous(), w.scales.contiguous()
    zeros = w.zeros.contiguous() if w.zeros is not None else scales
    pqs = w.pre_quant_scale.contiguous() if w.pre_quant_scale is not None else scales
    return qweight, scales, zeros, pqs


def _fused(x2: torch.Tensor, w: Int4Weight, y: torch.Tensor, cfg: W4A16Config,
           stream: int) -> None:
    m, n, k = x2.shape[0], w.out_features, w.in_features
    if not _fused_fits(m, n, k, w.group_size, cfg.block_k):
        raise ValueError(f"w4a16_linear: the fused kernel cannot take m={m} n={n} k={k} group "
                         f"{w.group_size} with K step {cfg.block_k} (choose_config routes these "
                         "to the dequantize path)")
    qweight, scales, zeros, pqs = _operands(w)
    tiles = -(-m // cfg.block_m) * -(-n // cfg.block_n)
    split = cfg.split_k if tiles <= _MAX_SPLIT_TILES else 1
    # Whole K tiles per split; trailing splits may be empty (they still arrive and count).
    k_per_split = -(-k // (split * cfg.block_k)) * cfg.block_k
    if split > 1:
        partials = torch.empty(split, m, n, dtype=torch.float32, device=x2.device)
        counters = _arrival_counters(x2.device, stream)
    else:
        partials = counters = y  # dummies, never read
    if x2.stride(1) != 1 or x2.stride(0) % 16:  # the kernel's unit column stride, aligned rows
        x2 = x2.contiguous()
    _kernel()[(tiles, split)](
        x2, qweight, scales, zeros, pqs, y, partials, counters,
        m, n, k, k_per_split, split,
        x2.stride(0), qweight.stride(0), scales.stride(0), zeros.stride(0), y.stride(0),
        GROUP_SIZE=w.group_size,
        HAS_ZEROS=w.zeros is not None,
        HAS_PRE_SCALE=w.pre_quant_scale is not None,
        DOT_PRECISION=_dot_precision(x2),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        SPLIT=split > 1,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def _dot_precision(x: torch.Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 or not x.is_cuda else "fast"


def dequantize_rows(w: Int4Weight, row0: int, rows: int, dtype: torch.dtype,
                    out: torch.Tensor | None = None,
                    cfg: W4A16Config | None = None) -> torch.Tensor:  # [rows, in]
    """Rows ``row0 .. row0 + rows - 1`` of ``w.dequantize(dtype)`` by the Triton kernel."""
    k = w.in_features
    cfg = cfg or _dequant_config(w.group_size)
    out = out if out is not None else torch.empty(rows, k, dtype=dtype, device=w.device)
    qweight, scales, zeros, pqs = _operands(w)
    grid = (-(-rows // cfg.block_n), -(-k // cfg.block_k))
    _dequant_kernel()[grid](
        qweight, scales, zeros, pqs, out,
        row0, rows, k,
        qweight.stride(0), scales.stride(0), zeros.stride(0), out.stride(0),
        GROUP_SIZE=w.group_size,
        HAS_ZEROS=w.zeros is not None,
        HAS_PRE_SCALE=w.pre_quant_scale is not None,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out


def _dequant_matmul(x2: torch.Tensor, w: Int4Weight, y: torch.Tensor, cfg: W4A16Config) -> None:
    """Large M: dense chunks of W (at most ``_DEQUANT_CHUNK_BYTES``), each multiplied by cuBLAS
    straight into its column slice of y (row stride n: no copy)."""
    n, k = w.out_features, w.in_features
    rows = max(cfg.block_n, _DEQUANT_CHUNK_BYTES // (k * x2.element_size()) // cfg.block_n
               * cfg.block_n)
    rows = min(rows, n)
    buf = torch.empty(rows, k, dtype=x2.dtype, device=x2.device)
    for row0 in range(0, n, rows):
        r = min(rows, n - row0)
        dense = dequantize_rows(w, row0, r, x2.dtype, out=buf[:r], cfg=cfg)
        torch.mm(x2, dense.t(), out=y[:, row0:row0 + r])


# --------------------------------------------------------------------------------------------
# Ahead-of-time compile check

# Gemma's projection shapes (n, k) from 2B to 27B and the row counts that reach every branch of
# choose_config: what compile_specs feeds it.
_GEMMA_SHAPES = ((2048, 2048), (2304, 9216), (4608, 36864), (73728, 4608), (5376, 21504))
_SPEC_ROWS = (1, 16, 17, 32, 33, 64, 65, 255, 256)
_TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def compile_specs(cc: tuple[int, int]) -> list:
    """Every configuration ``w4a16_linear`` can launch on compute capability ``cc``, through
    ``choose_config``: each x dtype (scales and pre_quant_scale in x's dtype, as the converter
    stores them), with/without zeros and pre_quant_scale, groups 32/64/128 (they set BLOCK_K)."""
    from trt_gemma.kernels.compile_spec import KernelSpec

    configs = {
        (dtype, group, choose_config(m, n, k, group, dtype, cc, sms))
        for dtype in _TRITON_TYPES for group in (32, 64, 128) for m in _SPEC_ROWS
        for n, k in _GEMMA_SHAPES for sms in (None, 1 << 12)  # 4096 SMs: never split
    }
    specs = {}
    for dtype, group, cfg in sorted(configs, key=repr):
        t = _TRITON_TYPES[dtype]
        for zeros in (False, True):
            for pre in (False, True):
                flags = {"GROUP_SIZE": group, "HAS_ZEROS": zeros, "HAS_PRE_SCALE": pre}
                ptrs = {"qw_ptr": "*u8", "scales_ptr": f"*{t}",
                        "zeros_ptr": "*u8" if zeros else f"*{t}", "pqs_ptr": f"*{t}"}
                tag = f"{t},g{group}" + ",zeros" * zeros + ",pqs" * pre
                if cfg.path == "dequant":
                    name = f"w4a16_dequant[{tag},N{cfg.block_n}]"
                    specs[name] = KernelSpec(
                        name, _dequant_kernel(),
                        {**ptrs, "w_ptr": f"*{t}", "row0": "i32", "rows": "i32", "K": "i32",
                         "stride_qn": "i32", "stride_sn": "i32", "stride_zn": "i32",
                         "stride_wn": "i32"},
                        {**flags, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k},
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages)  # fmt: skip
                    continue
                split = cfg.split_k > 1
                name = (f"w4a16_gemm[{tag},{cfg.block_m}x{cfg.block_n}"
                        f"{',splitk' if split else ''},s{cfg.num_stages}]")
                specs[name] = KernelSpec(
                    name, _kernel(),
                    {"x_ptr": f"*{t}", **ptrs, "y_ptr": f"*{t}",
                     "part_ptr": "*fp32" if split else f"*{t}",
                     "count_ptr": "*i32" if split else f"*{t}",
                     "M": "i32", "N": "i32", "K": "i32", "k_per_split": "i32", "split_k": "i32",
                     "stride_xm": "i32", "stride_qn": "i32", "stride_sn": "i32",
                     "stride_zn": "i32", "stride_ym": "i32"},
                    {**flags, "DOT_PRECISION": "ieee" if dtype == torch.float32 else "fast",
                     "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
                     "SPLIT": split},
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages)  # fmt: skip
    return list(specs.values())
