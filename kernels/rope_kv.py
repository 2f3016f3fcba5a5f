"""Triton kernel between the qkv GEMM and attention: per-head RMSNorm of q and k (Gemma 3),
rotate-half rope, and the new keys and values stored in the paged KV cache, in one launch.

Semantics are those of ``qk_norm_rope_kv_write_ref`` in ``kernels/reference.py``. q and k heads are
one ``[T, H + Hkv, hd]`` view of the fused qkv output; each program takes one token and a block of
``HEAD_BLOCK`` heads as a ``[HEAD_BLOCK, hd]`` tile, loads every element and its rotate-half partner
``(d + hd/2) % hd`` (the partner's row is the same, so its norm factor is the same), and writes the
roped tile back (in place by default). Programs whose block holds key heads also store those keys
and the matching v rows at the token's cache slot (fp8 caches: ``_quantize_fp8``, stored = x /
scale).

Numerics: the norm is computed in fp32 and rounded to the activation dtype, as the reference does.
cos/sin are computed in fp32 from ``position * inv_freq`` (libdevice sin/cos on GPU: accurate
range reduction, so positions of 100k+ are fine) and rounded to the activation dtype; the rope is
then computed in fp32 and rounded once, where the reference rounds three times (two products and
the sum in the activation dtype). So q/k are within one ulp of the reference (the kernel's is the
more accurate); a key's fp8 cache entry is bit-identical to the reference's quantization of the
key the kernel returns, v's is bit-identical outright, and non-fp8 caches hold exactly the returned
keys.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .attention_jit import _quantize_fp8
from .compile_spec import KernelSpec
from .norm import _FLOAT_DTYPES, TRITON_TYPES, _check, _check_eps, _inv_rms, _round
from .reference import FP8_DTYPE

# (num_q_heads, num_kv_heads, head_dim) of the Gemma models we ship recipes for.
HEAD_CONFIGS = (
    (4, 1, 256), (8, 1, 256), (8, 4, 256), (16, 16, 256), (16, 8, 256),
    (32, 16, 128), (16, 8, 128), (8, 4, 128),
)  # fmt: skip
_TILE = 2048  # elements of one program's [HEAD_BLOCK, hd] tile: 16 per thread at 4 warps


@triton.jit
def _qk_norm_rope_kv_kernel(
    qk_ptr,  # [T, H + Hkv, hd]
    v_ptr,  # [T, Hkv, hd], read only when HAS_CACHE
    pos_ptr,  # [T] int32/int64
    inv_freq_ptr,  # [hd // 2] fp32
    norm_ptr,  # [H + Hkv, hd] fp32 (head stride may be 0), read only when HAS_NORM
    out_ptr,  # [T, H + Hkv, hd], may be qk_ptr: a program reads its heads before writing them
    k_cache_ptr,  # [num_blocks, block_size, Hkv, hd], written only when HAS_CACHE
    v_cache_ptr,  # [num_blocks, block_size, Hkv, hd], written only when HAS_CACHE
    slot_ptr,  # [T] int32/int64 flat slot, -1 = skip; read only when HAS_CACHE
    k_scale_ptr,  # [1] fp32, read only when IS_FP8
    v_scale_ptr,  # [1] fp32, read only when IS_FP8
    num_q_heads, num_heads, block_size, eps,
    stride_qt, stride_qh, stride_vt, stride_vh, stride_nh, stride_ot, stride_oh,
    stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HEAD_BLOCK: tl.constexpr,
    HAS_NORM: tl.constexpr, HAS_CACHE: tl.constexpr, IS_FP8: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * HEAD_BLOCK + tl.arange(0, HEAD_BLOCK)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    half = HEAD_DIM // 2
    d_mask = offs_d < HEAD_DIM
    mask = (heads < num_heads)[:, None] & d_mask[None, :]
    partner = (offs_d + half) % HEAD_DIM  # rotate-half partner of each column
    dtype = out_ptr.dtype.element_ty

    rows = qk_ptr + t * stride_qt + heads[:, None] * stride_qh
    x = tl.load(rows + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(rows + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        r = _inv_rms(x, HEAD_DIM, eps, 1)[:, None]
        norm_rows = norm_ptr + heads[:, None] * stride_nh
        w = tl.load(norm_rows + offs_d[None, :], mask=mask, other=0.0)
        wp = tl.load(norm_rows + partner[None, :], mask=mask, other=0.0)
        x = _round(x * r * w, dtype).to(tl.float32)
        xp = _round(xp * r * wp, dtype).to(tl.float32)

    # cos and signed sin of this token, rounded to the activation dtype as the reference's table.
    freq = tl.load(pos_ptr + t).to(tl.float32) * tl.load(
        inv_freq_ptr + offs_d % half, mask=d_mask, other=0.0
    )
    cos = _round(tl.cos(freq), dtype).to(tl.float32)
    sin = _round(tl.sin(freq), dtype).to(tl.float32)
    sin = tl.where(offs_d < half, -sin, sin)
    y = _round(x * cos[None, :] + xp * sin[None, :], dtype)
    tl.store(out_ptr + t * stride_ot + heads[:, None] * stride_oh + offs_d[None, :], y, mask=mask)

    if HAS_CACHE:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            kv = heads - num_q_heads  # kv head of each row; < 0 for query heads
            kv_mask = ((kv >= 0) & (heads < num_heads))[:, None] & d_mask[None, :]
            blk = slot // block_size
            tok = slot % block_size
            v = tl.load(v_ptr + t * stride_vt + kv[:, None] * stride_vh + offs_d[None, :],
                        mask=kv_mask, other=0.0)  # fmt: skip
            k = y
            if IS_FP8:
                k = _quantize_fp8(k.to(tl.float32), tl.load(k_scale_ptr))
                v = _quantize_fp8(v.to(tl.float32), tl.load(v_scale_ptr))
            k_dst = k_cache_ptr + blk * stride_kcb + tok * stride_kct + kv[:, None] * stride_kch
            v_dst = v_cache_ptr + blk * stride_vcb + tok * stride_vct + kv[:, None] * stride_vch
            tl.store(k_dst + offs_d[None, :], k.to(k_cache_ptr.dtype.element_ty), mask=kv_mask)
            tl.store(v_dst + offs_d[None, :], v.to(v_cache_ptr.dtype.element_ty), mask=kv_mask)


def rope_config(num_heads: int, head_dim: int) -> tuple[int, int, int]:
    """(HEAD_DIM_PAD, HEAD_BLOCK, num_warps): a [HEAD_BLOCK, hd] tile of ~2048 elements, i.e.
    8 heads at hd 256, 16 at hd 128 (gemma-3-27b's 48 heads: 3 programs per token)."""
    hd_pad = triton.next_power_of_2(head_dim)
    head_block = min(triton.next_power_of_2(num_heads), max(1, _TILE // hd_pad))
    return hd_pad, head_block, 4


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _check_fp8_scale(name: str, scale, device) -> None:
    if not isinstance(scale, torch.Tensor) or scale.numel() != 1:
        raise ValueError(f"{name}: an fp8 cache needs a one-element fp32 device tensor, got "
                         f"{scale if not isinstance(scale, torch.Tensor) else list(scale.shape)}")
    if scale.dtype != torch.float32 or scale.device != device:
        raise ValueError(f"{name}: expected fp32 on {device}, got {scale.dtype} on {scale.device}")


def qk_norm_rope_kv_write(
    qk: torch.Tensor,  # [T, H + Hkv, hd] (row and head strides free)
    v: torch.Tensor,  # [T, Hkv, hd]
    positions: torch.Tensor,  # [T] int32/int64
    inv_freq: torch.Tensor,  # [hd // 2] fp32
    norm: torch.Tensor | None,  # [H + Hkv, hd] fp32 (head stride may be 0), or None
    eps: float,
    num_q_heads: int,
    k_cache: torch.Tensor | None = None,  # [num_blocks, block_size, Hkv, hd] qk.dtype or fp8
    v_cache: torch.Tensor | None = None,  # like k_cache
    slot_mapping: torch.Tensor | None = None,  # [T] int32/int64, -1 = skip
    *,
    k_scale: torch.Tensor | None = None,  # [1] fp32 on the device, for fp8 caches
    v_scale: torch.Tensor | None = None,  # [1] fp32 on the device, for fp8 caches
    out: torch.Tensor | None = None,  # [T, H + Hkv, hd]; default: qk itself (in place)
) -> torch.Tensor:  # out: qk normed and roped
    """q/k norm + rope + KV-cache write; see ``qk_norm_rope_kv_write_ref``. Scales are tensors
    (no host sync, nothing allocated); they are ignored for caches in the activation dtype."""
    _check("qk", qk, "[T, H + Hkv, hd]", (None, None, None), _FLOAT_DTYPES, None)
    t, num_heads, hd = qk.shape
    dev = qk.device
    if hd < 2 or hd % 2:
        raise ValueError(f"qk: head_dim must be even, got {hd}")
    if not isinstance(num_q_heads, int) or not 0 < num_q_heads < num_heads:
        raise ValueError(
            f"num_q_heads: expected an int in [1, {num_heads - 1}] (qk has {num_heads} heads, "
            f"queries first, then at least one key head), got {num_q_heads!r}"
        )
    hkv = num_heads - num_q_heads
    _check("v", v, "[T, Hkv, hd]", (t, hkv, hd), (qk.dtype,), dev)
    _check("positions", positions, "[T]", (t,), (torch.int32, torch.int64), dev)
    _check("inv_freq", inv_freq, "[hd // 2]", (hd // 2,), (torch.float32,), dev)
    if norm is not None:
        _check("norm", norm, "[H + Hkv, hd] fp32 (1 + w)", (num_heads, hd), (torch.float32,), dev)
    _check_eps(eps)
    has_cache = k_cache is not None
    if has_cache:
        desc = "[num_blocks, block_size, Hkv, hd]"
        _check("k_cache", k_cache, desc, (None, None, hkv, hd), (qk.dtype, FP8_DTYPE), dev)
        _check("v_cache", v_cache, desc, tuple(k_cache.shape), (k_cache.dtype,), dev)
        _check("slot_mapping", slot_mapping, "[T]", (t,), (torch.int32, torch.int64), dev)
    elif v_cache is not None or slot_mapping is not None:
        raise ValueError("k_cache: None, but v_cache or slot_mapping was given (pass all three)")
    is_fp8 = has_cache and k_cache.dtype == FP8_DTYPE
    if is_fp8:
        _check_fp8_scale("k_scale", k_scale, dev)
        _check_fp8_scale("v_scale", v_scale, dev)
        if dev.type == "cuda" and _capability(dev) < (8, 9):
            raise ValueError("k_cache: float8_e4m3fn caches need compute capability >= 8.9")
    if out is None:
        out = qk
    else:
        _check("out", out, "[T, H + Hkv, hd] in qk.dtype", tuple(qk.shape), (qk.dtype,), dev)
    if t == 0:
        return out
    hd_pad, head_block, warps = rope_config(num_heads, hd)
    kc = k_cache if has_cache else qk  # unused pointers: any tensor, never read or written
    vc = v_cache if has_cache else qk
    kc_strides = (kc.stride(0), kc.stride(1), kc.stride(2)) if has_cache else (0, 0, 0)
    vc_strides = (vc.stride(0), vc.stride(1), vc.stride(2)) if has_cache else (0, 0, 0)
    _qk_norm_rope_kv_kernel[(t, triton.cdiv(num_heads, head_block))](
        qk, v, positions, inv_freq, qk if norm is None else norm, out, kc, vc,
        slot_mapping if has_cache else positions,
        k_scale if is_fp8 else inv_freq, v_scale if is_fp8 else inv_freq,
        num_q_heads, num_heads, k_cache.shape[1] if has_cache else 1, float(eps),
        qk.stride(0), qk.stride(1), v.stride(0), v.stride(1),
        0 if norm is None else norm.stride(0), out.stride(0), out.stride(1),
        *kc_strides, *vc_strides,
        HEAD_DIM=hd, HEAD_DIM_PAD=hd_pad, HEAD_BLOCK=head_block,
        HAS_NORM=norm is not None, HAS_CACHE=has_cache, IS_FP8=is_fp8,
        num_warps=warps,
    )  # fmt: skip
    return out


def compile_specs(cc: tuple[int, int]) -> list[KernelSpec]:
    """Every (dtype, hd, HEAD_BLOCK, norm, cache kind) the launcher chooses for the real head
    configs (head counts are runtime arguments). Positions and slots are int64, as the runtime
    passes them; fp8 caches only where the GPU has fp8 conversions (cc >= 8.9)."""
    caches = ("none", "cache") + (("fp8kv",) if cc >= (8, 9) else ())
    specs: dict[str, KernelSpec] = {}
    for ty in TRITON_TYPES.values():
        for hq, hkv, hd in HEAD_CONFIGS:
            hd_pad, head_block, warps = rope_config(hq + hkv, hd)
            for has_norm in (False, True):
                for cache in caches:
                    p, f = f"*{ty}", "*fp32"
                    cp = {"none": p, "cache": p, "fp8kv": "*fp8e4nv"}[cache]
                    name = (f"qk_norm_rope_kv[{ty},hd{hd},hb{head_block}"
                            f"{',norm' * has_norm}{'' if cache == 'none' else ',' + cache}]")
                    args = {
                        "qk_ptr": p, "v_ptr": p, "pos_ptr": "*i64", "inv_freq_ptr": f,
                        "norm_ptr": f if has_norm else p, "out_ptr": p,
                        "k_cache_ptr": cp, "v_cache_ptr": cp,
                        "slot_ptr": "*i64", "k_scale_ptr": f, "v_scale_ptr": f,
                        "num_q_heads": "i32", "num_heads": "i32", "block_size": "i32",
                        "eps": "fp32",
                        **{s: "i32" for s in (
                            "stride_qt", "stride_qh", "stride_vt", "stride_vh", "stride_nh",
                            "stride_ot", "stride_oh", "stride_kcb", "stride_kct", "stride_kch",
                            "stride_vcb", "stride_vct", "stride_vch")},
                    }  # fmt: skip
                    specs.setdefault(name, KernelSpec(
                        name, _qk_norm_rope_kv_kernel, args,
                        {"HEAD_DIM": hd, "HEAD_DIM_PAD": hd_pad, "HEAD_BLOCK": head_block,
                         "HAS_NORM": has_norm, "HAS_CACHE": cache != "none",
                         "IS_FP8": cache == "fp8kv"},
                        num_warps=warps))  # fmt: skip
    return list(specs.values())
