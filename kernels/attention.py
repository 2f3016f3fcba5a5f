"""Triton attention kernels: varlen prefill, paged split-K decode, KV-cache write.

Semantics (positions, windows, soft-cap, GQA, FP8 scales) are defined by ``kernels/reference.py``;
each launcher here has the signature of its reference without the ``_ref`` suffix.

- ``prefill_attention``: flash attention over packed variable-length sequences. One program per
  (query tile, query head). Sequence b's tiles are numbered from ``cu_seqlens_q[b] // BLOCK_M + b``
  (at most one spare tile per sequence) and found by binary search, so the grid needs no host sync.
  Key tiles wholly above the causal diagonal or below the window are never visited.
- ``paged_decode_attention``: flash decoding. One program per (sequence, kv head, split of the
  visible range); the GQA group of query heads (padded to >= 16 rows for ``tl.dot``) shares every
  K/V tile it loads. A second kernel merges the splits with their log-sum-exp, so one long
  sequence still fills the GPU. With a window only the last W positions are split, so a 4k window
  on a 32k context costs 4k, not 32k.
- ``write_kv_cache``: scatter new K/V rows to their slots, quantising to fp8 when the cache is fp8.

Scores live in log2 units (``exp2`` is the fast instruction); the LSE passed between the two decode
kernels is in log2 units too. Offsets that scale with cache size or token count use int64.
"""

from __future__ import annotations

import functools

import torch
import triton

from .attention_jit import (
    _decode_reduce_kernel,
    _decode_split_kernel,
    _prefill_kernel,
    _write_kv_kernel,
)
from .reference import FP8_DTYPE, Scale

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256


def _check(name: str, t, desc: str, shape: tuple, dtypes: tuple, device: torch.device) -> None:
    """Raise ValueError naming `name` unless t is a tensor of `shape` (None = any) on `device`."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor {desc}, got {type(t).__name__}")
    want = "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
    if t.dim() != len(shape) or any(
        d is not None and d != n for d, n in zip(shape, t.shape, strict=True)
    ):
        raise ValueError(f"{name}: expected shape {desc} = {want}, got {list(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name}: expected dtype in ({names}), got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device} (that of q/k), got {t.device}")
    if t.numel() and t.stride(-1) != 1:
        raise ValueError(f"{name}: the last dimension must be contiguous (stride 1)")


def _check_options(head_dim: int, sliding_window, softcap) -> None:
    if head_dim > _MAX_HEAD_DIM:
        raise ValueError(f"head_dim: at most {_MAX_HEAD_DIM} is supported, got {head_dim}")
    if sliding_window is not None and (int(sliding_window) != sliding_window or sliding_window < 1):
        raise ValueError(f"sliding_window: expected a positive int or None, got {sliding_window!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap: expected a positive float or None, got {softcap!r}")


def _scale_arg(name: str, scale: Scale, device: torch.device) -> torch.Tensor:
    """Per-tensor fp8 scale as a [1] fp32 device tensor (a pointer, so no host sync; None = 1)."""
    if scale is None:
        return torch.ones(1, dtype=torch.float32, device=device)
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(
                f"{name}: expected one per-tensor scale, got shape {list(scale.shape)}"
            )
        return scale.reshape(1).to(device=device, dtype=torch.float32)
    return torch.full((1,), float(scale), dtype=torch.float32, device=device)


def _pad(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


def _kv_dtypes(q: torch.Tensor) -> tuple:
    return (q.dtype, FP8_DTYPE)


def _dot_precision(q: torch.Tensor) -> str:
    return "ieee" if q.dtype == torch.float32 or q.device.type != "cuda" else "tf32"


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few splits, so tests exercise the reduce
    return torch.cuda.get_device_properties(device).multi_processor_count


def prefill_attention(
    q: torch.Tensor,  # [total_q, num_heads, head_dim]
    k: torch.Tensor,  # [total_k, num_kv_heads, head_dim] (fp8 allowed with k_scale)
    v: torch.Tensor,  # [total_k, num_kv_heads, head_dim] (fp8 allowed with v_scale)
    cu_seqlens_q: torch.Tensor,  # [batch + 1] int32
    cu_seqlens_k: torch.Tensor,  # [batch + 1] int32
    *,
    scale: float,
    causal: bool = True,
    sliding_window: int | None = None,
    softcap: float | None = None,
    k_scale: Scale = None,
    v_scale: Scale = None,
    max_seqlen_q: int | None = None,
) -> torch.Tensor:  # [total_q, num_heads, head_dim] in q.dtype
    """Varlen flash attention; see ``prefill_attention_ref``. ``max_seqlen_q`` is not needed (the
    grid is sized from total_q) and is accepted only for parity. Causal attention with fewer keys
    than queries is invalid input: the reference raises, this kernel gives zeros for rows that see
    no key (it cannot check without a host sync)."""
    del max_seqlen_q
    dev = q.device if isinstance(q, torch.Tensor) else None
    _check("q", q, "[total_q, num_heads, head_dim]", (None, None, None), _FLOAT_DTYPES, dev)
    total_q, num_heads, head_dim = q.shape
    _check("k", k, "[total_k, num_kv_heads, head_dim]", (None, None, head_dim), _kv_dtypes(q), dev)
    num_kv_heads = k.shape[1]
    _check("v", v, "[total_k, num_kv_heads, head_dim]", tuple(k.shape), (k.dtype,), dev)
    batch = cu_seqlens_q.shape[0] - 1 if isinstance(cu_seqlens_q, torch.Tensor) else 0
    _check("cu_seqlens_q", cu_seqlens_q, "[batch + 1]", (None,), (torch.int32,), dev)
    _check("cu_seqlens_k", cu_seqlens_k, "[batch + 1]", (batch + 1,), (torch.int32,), dev)
    if batch < 0 or num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(
            f"q: num_heads ({num_heads}) must be a multiple of k's num_kv_heads ({num_kv_heads}), "
            f"and cu_seqlens_q needs >= 1 entry (got {batch + 1})"
        )
    _check_options(head_dim, sliding_window, softcap)
    out = torch.empty_like(q)
    if total_q == 0 or batch == 0:
        return out
    is_fp8 = k.dtype == FP8_DTYPE
    interp = dev.type != "cuda"
    # Tiles: small under the interpreter (fast, and several tiles per test). On GPU, untuned
    # guesses sized to fit ~100 KB of shared memory (L4/RTX 4090 have the least): q, k, v tiles
    # with two pipeline stages up to head_dim 128; at 256, one stage and 8 warps for the
    # [64, 256] accumulator. fp32 (tests only) shrinks the tiles again.
    if interp:
        block_m, block_n, warps, stages = 16, 16, 4, 1
    elif head_dim <= 128:
        block_m, block_n, warps, stages = 64, 64, 4, 2
    else:
        block_m, block_n, warps, stages = 64, 32, 8, 1
    if q.dtype == torch.float32 and not interp:
        block_m, block_n = 32, 16
    grid = (total_q // block_m + batch, num_heads)
    _prefill_kernel[grid](
        q, k, v, out, cu_seqlens_q, cu_seqlens_k,
        _scale_arg("k_scale", k_scale, dev), _scale_arg("v_scale", v_scale, dev),
        float(scale), float(softcap or 0.0), batch,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, HEAD_DIM_PAD=_pad(head_dim),
        BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=bool(causal),
        SLIDING_WINDOW=int(sliding_window or 0) if causal else 0,
        USE_SOFTCAP=softcap is not None, IS_FP8=is_fp8,
        DOT_PRECISION=_dot_precision(q),
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


def _check_cache(name: str, cache, q_or_k: torch.Tensor, num_kv_heads, head_dim, like=None):
    desc = "[num_blocks, block_size, num_kv_heads, head_dim]"
    shape = tuple(like.shape) if like is not None else (None, None, num_kv_heads, head_dim)
    dtypes = (like.dtype,) if like is not None else _kv_dtypes(q_or_k)
    _check(name, cache, desc, shape, dtypes, q_or_k.device)


def paged_decode_attention(
    q: torch.Tensor,  # [batch, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [batch, max_blocks] int32
    context_lens: torch.Tensor,  # [batch] int32
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    k_scale: Scale = None,
    v_scale: Scale = None,
    num_splits: int | None = None,
) -> torch.Tensor:  # [batch, num_heads, head_dim] in q.dtype
    """Split-K paged decode; see ``paged_decode_attention_ref``. ``num_splits`` overrides the
    heuristic (enough (sequence, kv head, split) programs for ~2 waves of SMs, >= 256 keys each)."""
    dev = q.device if isinstance(q, torch.Tensor) else None
    _check("q", q, "[batch, num_heads, head_dim]", (None, None, None), _FLOAT_DTYPES, dev)
    batch, num_heads, head_dim = q.shape
    _check_cache("k_cache", k_cache, q, None, head_dim)
    _check_cache("v_cache", v_cache, q, None, head_dim, like=k_cache)
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    _check("block_tables", block_tables, "[batch, max_blocks]", (batch, None), (torch.int32,), dev)
    _check("context_lens", context_lens, "[batch]", (batch,), (torch.int32,), dev)
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(
            f"q: num_heads ({num_heads}) must be a multiple of k_cache's num_kv_heads "
            f"({num_kv_heads})"
        )
    _check_options(head_dim, sliding_window, softcap)
    out = torch.empty_like(q)
    max_blocks = block_tables.shape[1]
    if batch == 0:
        return out
    interp = dev.type != "cuda"
    # K/V tile rows per step: [block_n, head_dim] k and v tiles, double-buffered, fit ~100 KB.
    block_n = 16 if interp or q.dtype == torch.float32 else (64 if head_dim <= 128 else 32)
    # Longest range one query can read: the table's capacity, or the window.
    span = max(1, max_blocks * block_size)
    if sliding_window is not None:
        span = min(span, int(sliding_window))
    if num_splits is None:
        want = triton.cdiv(2 * _num_sms(dev), batch * num_kv_heads)
        num_splits = min(want, triton.cdiv(span, 256), 64)
    split_tokens = triton.cdiv(triton.cdiv(span, max(1, num_splits)), block_n) * block_n
    num_splits = triton.cdiv(span, split_tokens)  # drop splits that could never hold a key
    mid_o = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=dev)
    mid_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=dev)
    group = num_heads // num_kv_heads
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens,
        _scale_arg("k_scale", k_scale, dev), _scale_arg("v_scale", v_scale, dev),
        mid_o, mid_lse,
        float(scale), float(softcap or 0.0), split_tokens, block_size, max_blocks, num_splits,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        GROUP=group, GROUP_PAD=_pad(group), HEAD_DIM=head_dim, HEAD_DIM_PAD=_pad(head_dim),
        BLOCK_N=block_n, SLIDING_WINDOW=int(sliding_window or 0),
        USE_SOFTCAP=softcap is not None, IS_FP8=k_cache.dtype == FP8_DTYPE,
        DOT_PRECISION=_dot_precision(q),
        num_warps=4, num_stages=2,
    )  # fmt: skip
    _decode_reduce_kernel[(batch, num_heads)](
        mid_o, mid_lse, out, num_splits, out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=_pad(head_dim), SPLITS_PAD=_pad(num_splits, 2),
        num_warps=4,
    )  # fmt: skip
    return out


def write_kv_cache(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], written in place
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], written in place
    slot_mapping: torch.Tensor,  # [num_tokens] int32/int64, block * block_size + offset, -1 = skip
    *,
    k_scale: Scale = None,
    v_scale: Scale = None,
) -> None:
    """Scatter K/V rows to their cache slots; see ``write_kv_cache_ref``."""
    dev = k.device if isinstance(k, torch.Tensor) else None
    _check("k", k, "[num_tokens, num_kv_heads, head_dim]", (None, None, None), _FLOAT_DTYPES, dev)
    num_tokens, num_kv_heads, head_dim = k.shape
    _check("v", v, "[num_tokens, num_kv_heads, head_dim]", tuple(k.shape), _FLOAT_DTYPES, dev)
    _check_cache("k_cache", k_cache, k, num_kv_heads, head_dim)
    _check_cache("v_cache", v_cache, k, num_kv_heads, head_dim, like=k_cache)
    _check("slot_mapping", slot_mapping, "[num_tokens]", (num_tokens,),
           (torch.int32, torch.int64), dev)  # fmt: skip
    if num_tokens == 0:
        return
    is_fp8 = k_cache.dtype == FP8_DTYPE
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        _scale_arg("k_scale", k_scale, dev), _scale_arg("v_scale", v_scale, dev),
        k_cache.shape[1],
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEADS_PAD=_pad(num_kv_heads, 2), HEAD_DIM=head_dim,
        HEAD_DIM_PAD=_pad(head_dim, 1), IS_FP8=is_fp8, num_warps=4,
    )  # fmt: skip
