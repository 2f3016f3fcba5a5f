"""Triton attention kernels: varlen prefill, paged split-K decode, KV-cache write.

Semantics (positions, windows, soft-cap, GQA, FP8 scales) are defined by ``kernels/reference.py``;
each launcher here has the signature of its reference without the ``_ref`` suffix.

- ``prefill_attention``: flash attention over packed variable-length sequences. One program per
  (query tile, query head). Sequence b's tiles are numbered from ``cu_seqlens_q[b] // BLOCK_M + b``
  (at most one spare tile per sequence) and found by binary search, so the grid needs no host sync.
  Key tiles wholly above the causal diagonal or below the window are never visited.
- ``paged_decode_attention``: flash decoding. One program per (sequence, kv head, split); the GQA
  group of query heads (padded to >= 16 rows for ``tl.dot``) shares every K/V tile it loads. The
  number of splits is static (``decode_num_splits``: from batch, kv heads and SM count only, so a
  CUDA graph captures it), and each program finds its split's keys from the sequence's own
  visible context, not the table's width. A second kernel merges the splits with their
  log-sum-exp; with one split the split kernel writes the output itself and there is no second
  launch. With a window only the last W positions are split, so a 4k window on a 32k context
  costs 4k, not 32k.
- ``write_kv_cache``: scatter new K/V rows to their slots, quantising to fp8 when the cache is fp8.

Scores live in log2 units (``exp2`` is the fast instruction); the LSE passed between the two decode
kernels is in log2 units too. Offsets that scale with cache size or token count use int64.

No launcher allocates on the hot path when given ``out=`` (and, for decode, ``workspace=`` from
``decode_workspace``) and tensor scales: the runtime makes them once, and CUDA-graph replays reuse
them. Tiles and stages come from ``prefill_config`` / ``decode_config`` per head_dim and compute
capability; ``compile_specs`` lists the same choices for the ahead-of-time compile check.
"""

from __future__ import annotations

import functools
import itertools

import torch
import triton

from .attention_jit import (
    _decode_reduce_kernel,
    _decode_split_kernel,
    _prefill_kernel,
    _write_kv_kernel,
)
from .compile_spec import KernelSpec
from .checks import check_tensor as _check
from .reference import FP8_DTYPE, Scale

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256


def _check_options(head_dim: int, sliding_window, softcap) -> None:
    if head_dim > _MAX_HEAD_DIM:
        raise ValueError(f"head_dim: at most {_MAX_HEAD_DIM} is supported, got {head_dim}")
    if sliding_window is not None and (int(sliding_window) != sliding_window or sliding_window < 1):
        raise ValueError(f"sliding_window: expected a positive int or None, got {sliding_window!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap: expected a positive float or None, got {softcap!r}")


def _scale_arg(name: str, scale: Scale, dummy: torch.Tensor, is_fp8: bool) -> torch.Tensor:
    """Per-tensor fp8 scale as a pointer (no host sync). Allocation-free for the runtime's cases:
    without fp8 K/V any scale passes ``dummy`` (an argument already on the device; the kernels
    read scales only when IS_FP8), and a one-element fp32 tensor on the device is passed as is.
    Only convenience forms allocate: a Python float, another dtype or device, None (= 1) with fp8
    K/V."""
    if isinstance(scale, torch.Tensor) and scale.numel() != 1:
        raise ValueError(f"{name}: expected one per-tensor scale, got shape {list(scale.shape)}")
    if not is_fp8:
        return dummy
    if scale is None:
        return torch.ones(1, dtype=torch.float32, device=dummy.device)
    if isinstance(scale, torch.Tensor):
        if scale.dtype == torch.float32 and scale.device == dummy.device:
            return scale
        return scale.reshape(1).to(device=dummy.device, dtype=torch.float32)
    return torch.full((1,), float(scale), dtype=torch.float32, device=dummy.device)


def _pad(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


def _kv_dtypes(q: torch.Tensor) -> tuple:
    return (q.dtype, FP8_DTYPE)


def _row_align(*strides: int) -> int:
    """ROW_ALIGN: 16 when every row stride is a multiple of 16 elements (the runtime's tensors:
    head_dim 64/128/256), so rows load as 16-byte vectors; else 1."""
    return 16 if all(s % 16 == 0 for s in strides) else 1


def _dot_precision(q_dtype: torch.dtype, interp: bool) -> str:
    return "ieee" if q_dtype == torch.float32 or interp else "tf32"


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few splits, so tests exercise the reduce
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _capability(device: torch.device) -> tuple[int, int] | None:
    """Compute capability, or None under the Triton interpreter (CPU tensors)."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def prefill_config(head_dim: int, dtype: torch.dtype, cc: tuple[int, int] | None,
                   aligned: bool = True) -> tuple:
    """(block_m, block_n, num_warps, num_stages) of the prefill kernel for q's dtype on a GPU of
    compute capability ``cc`` (None: the interpreter, small tiles so tests cover several).
    ``aligned``: rows start on 16-element boundaries (ROW_ALIGN 16); unaligned strides load
    element by element, and get tiles small enough not to spill.

    Checked by compiling ahead of time with window and softcap on (``compile_specs``,
    kernels/aot.py): no register spills, shared memory within the per-block limit (sm80
    166912 B, sm89 101376 B, sm90 232448 B), and num_stages 2 so K/V loads are pipelined.
    Not yet tuned for speed on a GPU."""
    if cc is None:
        return 16, 16, 4, 1
    if not aligned:  # element-wise addresses: a [16, head_dim] q tile is all that fits
        return 16, 16, 4 if dtype == torch.float32 else 8, 1
    if dtype == torch.float32:  # tests only: fp32 tiles, ieee dots (32 rows spill on sm90)
        return 16, 16, 4, 1
    if head_dim <= 64:
        return 64, 64, 4, 2
    if head_dim <= 128:  # sm80 spills 16 B at 128 x 64 (window + softcap on)
        return (128, 64, 8, 2) if cc != (8, 0) else (64, 64, 8, 2)
    # [64, 256] accumulator: 8 warps; sm90's 227 KB takes 64-key tiles double-buffered
    return (64, 64, 8, 2) if cc >= (9, 0) else (64, 32, 8, 2)


def decode_config(head_dim: int, dtype: torch.dtype, cc: tuple[int, int] | None,
                  kv_fp8: bool = False, aligned: bool = True) -> tuple:
    """(block_n, num_warps, num_stages) of the decode split kernel, as ``prefill_config``: 64 key
    rows per step (32 KB of bf16 K/V at head_dim 128, 64 KB at 256 over 8 warps). The K/V loads
    go through the block table, which Triton does not multi-buffer (shared memory does not grow
    with num_stages), so stages stay 2. FP8 K/V at head_dim 256 keeps 32 rows on 4 warps (64 on
    8 spill on sm89: the e4m3 -> bf16 conversion needs registers). Same on every arch for now;
    ``cc`` is there for when measurements say otherwise."""
    if cc is None:
        return 16, 4, 1
    if dtype == torch.float32 or not aligned:  # fp32: tests only; 8 warps for fp8 K/V
        return 16, 8, 2
    if head_dim <= 128:
        return 64, 4, 2
    return (32, 4, 2) if kv_fp8 else (64, 8, 2)


_MAX_SPLITS = 64
# Fewest keys a decode split takes before the launch's later splits stay empty: amortises the
# q load and the partial write. Small under the interpreter so tests split short contexts.
_MIN_SPLIT_KEYS = {True: 16, False: 128}  # by interp


def decode_num_splits(batch: int, num_kv_heads: int, device: torch.device | str) -> int:
    """Splits per (sequence, kv head) of a decode launch: enough programs for ~2 waves of SMs,
    at most 64. It depends on the launch's shape and the device only, never on context lengths
    or the block table's width, so a captured CUDA graph replays the same launch."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    programs = max(1, batch * num_kv_heads)
    return max(1, min(_MAX_SPLITS, triton.cdiv(2 * _num_sms(device), programs)))


def _workspace_numel(batch: int, num_heads: int, num_splits: int, head_dim: int) -> int:
    # mid_o [batch, num_heads, splits, head_dim] then mid_lse [batch, num_heads, splits], fp32
    return 0 if num_splits == 1 else batch * num_heads * num_splits * (head_dim + 1)


def decode_workspace(max_batch: int, num_heads: int, num_kv_heads: int, head_dim: int,
                     device: torch.device | str) -> torch.Tensor:  # [n] fp32
    """One flat fp32 buffer that holds the split outputs of every decode launch with batch <=
    ``max_batch`` and the default split count: allocate it once and pass it as ``workspace=``
    (launches run in stream order, so every layer can share it)."""
    numel = max(
        (_workspace_numel(b, num_heads, decode_num_splits(b, num_kv_heads, device), head_dim)
         for b in range(1, max_batch + 1)),
        default=0,
    )
    return torch.empty(max(numel, 1), dtype=torch.float32, device=device)


def _prefill_constexprs(dtype, head_dim, group, causal, sliding_window, softcap, is_fp8, cc,
                        row_align=16):
    block_m, block_n, warps, stages = prefill_config(head_dim, dtype, cc, row_align == 16)
    meta = dict(
        GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_PAD=_pad(head_dim),
        BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=bool(causal),
        SLIDING_WINDOW=int(sliding_window or 0) if causal else 0,
        USE_SOFTCAP=softcap is not None, IS_FP8=is_fp8,
        DOT_PRECISION=_dot_precision(dtype, cc is None), ROW_ALIGN=row_align,
    )  # fmt: skip
    return meta, warps, stages


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
    out: torch.Tensor | None = None,  # [total_q, num_heads, head_dim] in q.dtype, written
) -> torch.Tensor:  # [total_q, num_heads, head_dim] in q.dtype (``out`` when given)
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
    if out is None:
        out = torch.empty_like(q)
    else:
        _check("out", out, "[total_q, num_heads, head_dim]", tuple(q.shape), (q.dtype,), dev)
    if total_q == 0 or batch == 0:
        return out
    is_fp8 = k.dtype == FP8_DTYPE
    meta, warps, stages = _prefill_constexprs(
        q.dtype, head_dim, num_heads // num_kv_heads, causal, sliding_window, softcap, is_fp8,
        _capability(dev), _row_align(q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                                     v.stride(0), v.stride(1), out.stride(0), out.stride(1)),
    )
    grid = (total_q // meta["BLOCK_M"] + batch, num_heads)
    _prefill_kernel[grid](
        q, k, v, out, cu_seqlens_q, cu_seqlens_k,
        _scale_arg("k_scale", k_scale, q, is_fp8), _scale_arg("v_scale", v_scale, q, is_fp8),
        float(scale), float(softcap or 0.0), batch,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        **meta, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


def _check_cache(name: str, cache, q_or_k: torch.Tensor, num_kv_heads, head_dim, like=None):
    desc = "[num_blocks, block_size, num_kv_heads, head_dim]"
    shape = tuple(like.shape) if like is not None else (None, None, num_kv_heads, head_dim)
    dtypes = (like.dtype,) if like is not None else _kv_dtypes(q_or_k)
    _check(name, cache, desc, shape, dtypes, q_or_k.device)


def _decode_constexprs(dtype, head_dim, group, sliding_window, softcap, is_fp8, one_split, cc,
                       row_align=16):
    block_n, warps, stages = decode_config(head_dim, dtype, cc, is_fp8, row_align == 16)
    meta = dict(
        GROUP=group, GROUP_PAD=_pad(group), HEAD_DIM=head_dim, HEAD_DIM_PAD=_pad(head_dim),
        BLOCK_N=block_n, SLIDING_WINDOW=int(sliding_window or 0),
        USE_SOFTCAP=softcap is not None, IS_FP8=is_fp8,
        DOT_PRECISION=_dot_precision(dtype, cc is None), ONE_SPLIT=one_split,
        ROW_ALIGN=row_align,
    )  # fmt: skip
    return meta, warps, stages


def _reduce_constexprs(head_dim: int, num_splits: int) -> tuple[dict, int]:
    pad = _pad(num_splits, 2)
    # [splits, head_dim] fp32 partials in registers: 8 warps once they pass 64 per thread
    warps = 8 if pad * _pad(head_dim) > 8192 else 4
    return dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=_pad(head_dim), SPLITS_PAD=pad), warps


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
    out: torch.Tensor | None = None,  # [batch, num_heads, head_dim] in q.dtype, written
    workspace: torch.Tensor | None = None,  # [n] fp32 from decode_workspace, scratch
) -> torch.Tensor:  # [batch, num_heads, head_dim] in q.dtype (``out`` when given)
    """Split-K paged decode; see ``paged_decode_attention_ref``. ``num_splits`` overrides
    ``decode_num_splits``; each split's keys are found in the kernel from the sequence's visible
    context. One split: one launch, no workspace. Several: split outputs go to ``workspace``
    (allocated here when None) and a second launch merges them."""
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
    if out is None:
        out = torch.empty_like(q)
    else:
        _check("out", out, "[batch, num_heads, head_dim]", tuple(q.shape), (q.dtype,), dev)
    if num_splits is None:
        num_splits = decode_num_splits(batch, num_kv_heads, dev)
    elif not 1 <= int(num_splits) <= 1024:
        raise ValueError(f"num_splits: expected an int in 1..1024 or None, got {num_splits!r}")
    num_splits = int(num_splits)
    if batch == 0:
        return out
    need = _workspace_numel(batch, num_heads, num_splits, head_dim)
    if need and workspace is None:
        workspace = torch.empty(need, dtype=torch.float32, device=dev)
    elif need:
        _check("workspace", workspace, "[n] (decode_workspace)", (None,), (torch.float32,), dev)
        if workspace.numel() < need:
            raise ValueError(
                f"workspace: {num_splits} splits of batch {batch} need {need} fp32 elements, got "
                f"{workspace.numel()}; size it with decode_workspace for the largest batch"
            )
    if need:
        n_o = batch * num_heads * num_splits * head_dim
        mid_o, mid_lse = workspace[:n_o], workspace[n_o:need]
    else:
        mid_o = mid_lse = out  # never touched: ONE_SPLIT writes out directly
    is_fp8 = k_cache.dtype == FP8_DTYPE
    cc, interp = _capability(dev), dev.type != "cuda"
    meta, warps, stages = _decode_constexprs(
        q.dtype, head_dim, num_heads // num_kv_heads, sliding_window, softcap, is_fp8,
        num_splits == 1, cc, _row_align(q.stride(0), q.stride(1), *k_cache.stride()[:3],
                                        *v_cache.stride()[:3], out.stride(0), out.stride(1)),
    )
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens,
        _scale_arg("k_scale", k_scale, q, is_fp8), _scale_arg("v_scale", v_scale, q, is_fp8),
        out, mid_o, mid_lse,
        float(scale), float(softcap or 0.0), _MIN_SPLIT_KEYS[interp], block_size,
        block_tables.shape[1], num_splits,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        **meta, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    if num_splits > 1:
        reduce_meta, reduce_warps = _reduce_constexprs(head_dim, num_splits)
        _decode_reduce_kernel[(batch, num_heads)](
            mid_o, mid_lse, out, num_splits, out.stride(0), out.stride(1),
            **reduce_meta, num_warps=reduce_warps,
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
        _scale_arg("k_scale", k_scale, k, is_fp8), _scale_arg("v_scale", v_scale, k, is_fp8),
        k_cache.shape[1],
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEADS_PAD=_pad(num_kv_heads, 2), HEAD_DIM=head_dim,
        HEAD_DIM_PAD=_pad(head_dim, 1), IS_FP8=is_fp8,
        num_warps=_write_kv_warps(num_kv_heads, head_dim),
    )  # fmt: skip


def _write_kv_warps(num_kv_heads: int, head_dim: int) -> int:
    # One token's [heads, head_dim] K and V in registers: 16 warps past 2048 elements (16 kv
    # heads at head_dim 256 spill on 4 and 8).
    return 16 if _pad(num_kv_heads, 2) * _pad(head_dim, 1) > 2048 else 4


# --------------------------------------------------------------------------- ahead-of-time specs

_TRITON_TYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
                torch.int32: "i32", torch.int64: "i64",
                FP8_DTYPE: "fp8e4nv"}  # fmt: skip
_SPEC_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Gemma's head dims. 64 is not listed: a few configurations spill 4-16 B there (sm89/sm90).
_SPEC_HEAD_DIMS = (128, 256)
_SPEC_WINDOW, _SPEC_SOFTCAP = 1024, 50.0  # one value each: window and softcap on, else off


def _ptrs(names: str, dtype) -> dict[str, str]:
    return {n: "*" + _TRITON_TYPE[dtype] for n in names.split()}


def _ints(names: str, kind: str = "i32") -> dict[str, str]:
    return {n: kind for n in names.split()}


def _spec_name(kernel: str, dtype, head_dim: int, *flags: str) -> str:
    return f"{kernel}[{','.join([_TRITON_TYPE[dtype], f'hd{head_dim}', *filter(None, flags)])}]"


def compile_specs(cc: tuple[int, int]) -> list[KernelSpec]:
    """Every configuration the attention launchers can choose on a GPU of compute capability
    ``cc``: q dtypes bf16/fp16/fp32, head_dim 128/256, window and softcap off or both on (their
    values are constexpr/runtime but one representative each shows the code), fp8 K/V only from
    sm89 (Triton cannot convert e4m3 on sm80; not with fp32 q, see below), aligned rows and the
    unaligned fallback, decode with one split and with several, and the reduce for every split
    padding. Tiles come from the launchers' own config functions."""
    fp8 = cc >= (8, 9)
    specs = []
    for dtype, hd in itertools.product(_SPEC_DTYPES, _SPEC_HEAD_DIMS):
        kv_types = (dtype, FP8_DTYPE) if fp8 else (dtype,)
        # fp32 q on an fp8 cache: a test-only mix the runtime never makes (fp32 runs the CPU
        # references); its decode spills a few bytes at head_dim 256, so it is not listed.
        attn_kv = (dtype,) if dtype == torch.float32 else kv_types
        for kv, on in itertools.product(attn_kv, (False, True)):
            # plus, with the features on, the small-tile fallback for strides not a multiple of 16
            specs += _attention_specs(dtype, hd, kv, on, 16, cc)
            if on:
                specs += _attention_specs(dtype, hd, kv, on, 1, cc)
        for splits in (2 ** i for i in range(1, _MAX_SPLITS.bit_length())):
            meta, warps = _reduce_constexprs(hd, splits)
            args = (_ptrs("mid_o_ptr mid_lse_ptr", torch.float32) | _ptrs("o_ptr", dtype)
                    | _ints("num_splits stride_ob stride_oh"))  # fmt: skip
            name = _spec_name("decode_reduce", dtype, hd, f"splits{splits}")
            specs.append(KernelSpec(name, _decode_reduce_kernel, args, meta, warps))
        for cache_t, heads in itertools.product(kv_types, (1, 16)):
            is_fp8 = cache_t == FP8_DTYPE
            args = (_ptrs("k_ptr v_ptr", dtype) | _ptrs("k_cache_ptr v_cache_ptr", cache_t)
                    | _ptrs("slot_ptr", torch.int64)
                    | _ptrs("k_scale_ptr v_scale_ptr", torch.float32 if is_fp8 else dtype)
                    | _ints("block_size stride_kt stride_kh stride_vt stride_vh stride_kcb "
                            "stride_kct stride_kch stride_vcb stride_vct stride_vch"))  # fmt: skip
            meta = dict(NUM_KV_HEADS=heads, HEADS_PAD=_pad(heads, 2), HEAD_DIM=hd,
                        HEAD_DIM_PAD=_pad(hd, 1), IS_FP8=is_fp8)  # fmt: skip
            name = _spec_name("write_kv", dtype, hd, f"kvh{heads}", "fp8kv" if is_fp8 else "")
            specs.append(KernelSpec(name, _write_kv_kernel, args, meta,
                                    _write_kv_warps(heads, hd)))
    return specs


def _attention_specs(dtype, hd: int, kv, on: bool, align: int, cc) -> list[KernelSpec]:
    """The prefill spec and the decode split specs (one split, several) of one configuration."""
    is_fp8 = kv == FP8_DTYPE
    window, softcap = (_SPEC_WINDOW, _SPEC_SOFTCAP) if on else (None, None)
    scale_t = torch.float32 if is_fp8 else dtype  # the dummy pointer is q when not fp8
    flags = ("fp8kv" if is_fp8 else "", "window,softcap" if on else "",
             "unaligned" if align == 1 else "")  # fmt: skip
    meta, warps, stages = _prefill_constexprs(dtype, hd, 2, True, window, softcap, is_fp8, cc,
                                              align)  # fmt: skip
    args = (_ptrs("q_ptr", dtype) | _ptrs("k_ptr v_ptr", kv) | _ptrs("o_ptr", dtype)
            | _ptrs("cu_q_ptr cu_k_ptr", torch.int32)
            | _ptrs("k_scale_ptr v_scale_ptr", scale_t) | _ints("scale softcap", "fp32")
            | _ints("num_seqs stride_qt stride_qh stride_kt stride_kh stride_vt "
                    "stride_vh stride_ot stride_oh"))  # fmt: skip
    specs = [KernelSpec(_spec_name("prefill", dtype, hd, *flags), _prefill_kernel, args, meta,
                        warps, stages)]  # fmt: skip
    for one in (True, False):
        meta, warps, stages = _decode_constexprs(dtype, hd, 2, window, softcap, is_fp8, one, cc,
                                                 align)  # fmt: skip
        mid_t = dtype if one else torch.float32  # one split: the mid pointers are `out`
        args = (_ptrs("q_ptr", dtype) | _ptrs("k_cache_ptr v_cache_ptr", kv)
                | _ptrs("block_tables_ptr context_lens_ptr", torch.int32)
                | _ptrs("k_scale_ptr v_scale_ptr", scale_t) | _ptrs("o_ptr", dtype)
                | _ptrs("mid_o_ptr mid_lse_ptr", mid_t) | _ints("scale softcap", "fp32")
                | _ints("min_split_keys block_size max_blocks num_splits stride_qb "
                        "stride_qh stride_kb stride_kt stride_kh stride_vb stride_vt "
                        "stride_vh stride_bt stride_ob stride_oh"))  # fmt: skip
        name = _spec_name("decode_split", dtype, hd, *flags, "1split" if one else "")
        specs.append(KernelSpec(name, _decode_split_kernel, args, meta, warps, stages))
    return specs
