"""Plain-PyTorch references of the attention kernels: the definition of correct.

They are also the CPU production path (``trt_gemma.ops`` picks them when there is no GPU), so they
are vectorised: batched matmuls per sequence over all heads, in query chunks that skip keys no query
of the chunk can see, softmax in fp32, output in q's dtype. No Triton import here.

Conventions shared with ``kernels/attention.py``:
- Packed variable-length batches: ``cu_seqlens`` int32 ``[batch + 1]`` holds cumulative lengths.
- A sequence may have more keys than queries (cached prefix or earlier prefill chunk): its queries
  are the *last* ones, so query i of a sequence with Lq queries and Lk keys sits at absolute
  position ``Lk - Lq + i``; key j sits at position j.
- Sliding window W (only together with causal masking): position p sees keys ``p - W + 1 .. p``.
  With ``causal=False`` the window is ignored (Gemma never needs a bidirectional window).
- Soft-cap c replaces a score s (already multiplied by ``scale``) by ``c * tanh(s / c)``, before
  masking.
- GQA/MQA: query head h reads kv head ``h // (num_heads // num_kv_heads)``.
- FP8 (``torch.float8_e4m3fn``) K/V carry a per-tensor scale: stored = real / scale, so
  real = stored * scale.
- Paged caches are ``[num_blocks, block_size, num_kv_heads, head_dim]``; a flat slot is
  ``block * block_size + offset``; slot -1 means "skip" (padding).
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn; values are clamped so the cast never makes NaN

# Upper bound on elements of one fp32 score block [kv_heads, group, q_chunk, Lk]; longer prompts are
# processed in query chunks so an 8k-token prefill does not allocate gigabytes on CPU.
_MAX_SCORE_ELEMENTS = 1 << 25
# Queries per chunk at most: smaller chunks let causal/window masking skip more keys (see _attend).
_QUERY_CHUNK = 256

Scale = float | torch.Tensor | None


def _dequant(x: torch.Tensor, scale: Scale) -> torch.Tensor:
    """fp32 copy of x; fp8 tensors are multiplied by their per-tensor scale (1.0 when None)."""
    x = x.float()
    if scale is not None:
        x = x * (scale.float() if isinstance(scale, torch.Tensor) else float(scale))
    return x


def _attend(
    q: torch.Tensor,  # [Lq, num_heads, head_dim] fp32
    k: torch.Tensor,  # [Lk, num_kv_heads, head_dim] fp32
    v: torch.Tensor,  # [Lk, num_kv_heads, head_dim] fp32
    *,
    scale: float,
    causal: bool,
    sliding_window: int | None,
    softcap: float | None,
) -> torch.Tensor:  # [Lq, num_heads, head_dim] fp32
    """Attention of one sequence, all heads at once, queries at the last Lq of Lk positions."""
    lq, num_heads, head_dim = q.shape
    lk, num_kv_heads = k.shape[0], k.shape[1]
    group = num_heads // num_kv_heads
    out = q.new_zeros(lq, num_heads, head_dim)
    if lq == 0 or lk == 0:
        return out  # no keys: zeros rather than NaN
    # [Hkv, G, Lq, D] against [Hkv, 1, D, Lk]: the group of query heads shares its kv head.
    # The scale is folded into q (Lq*H*D multiplies instead of Lq*H*Lk).
    qh = (q * scale).permute(1, 0, 2).reshape(num_kv_heads, group, lq, head_dim)
    kt = k.permute(1, 2, 0).unsqueeze(1)  # [Hkv, 1, D, Lk]
    vh = v.permute(1, 0, 2).unsqueeze(1)  # [Hkv, 1, Lk, D]
    offset = lk - lq  # absolute position of query 0
    chunk = min(_QUERY_CHUNK, max(1, _MAX_SCORE_ELEMENTS // (num_heads * lk)))
    for start in range(0, lq, chunk):
        stop = min(lq, start + chunk)
        # Only keys some query of the chunk can see: up to the chunk's last query when causal, and
        # from its first query's window start. Saves ~half the work causally, most of it in windows.
        lo, hi = 0, lk
        if causal:
            hi = max(0, min(lk, offset + stop))
            if sliding_window is not None:
                lo = min(hi, max(0, offset + start - sliding_window + 1))
        s = torch.matmul(qh[:, :, start:stop], kt[..., lo:hi])  # [Hkv, G, chunk, hi - lo]
        if softcap is not None:
            s = s.div_(softcap).tanh_().mul_(softcap)
        if causal:
            q_pos = torch.arange(offset + start, offset + stop, device=q.device)[:, None]
            k_pos = torch.arange(lo, hi, device=q.device)[None, :]
            visible = k_pos <= q_pos
            if sliding_window is not None:
                visible &= k_pos > q_pos - sliding_window
            s.masked_fill_(~visible, float("-inf"))
        p = torch.softmax(s, dim=-1)
        # A row with no visible key (impossible for valid causal input) is NaN: make it zeros.
        if causal and not bool(visible.any(-1).all()):
            p = p.nan_to_num_(0.0)
        o = torch.matmul(p, vh[:, :, lo:hi])  # [Hkv, G, chunk, D]
        out[start:stop] = o.reshape(num_heads, stop - start, head_dim).permute(1, 0, 2)
    return out


def prefill_attention_ref(
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
    """Variable-length (packed) attention over a batch of sequences.

    ``max_seqlen_q`` is accepted for signature parity with the Triton launcher and ignored here.
    """
    del max_seqlen_q
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"num_heads ({q.shape[1]}) of q must be a multiple of num_kv_heads ({k.shape[1]}) of k"
        )
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        qs, qe, ks, ke = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if qe == qs:
            continue
        if causal and ke - ks < qe - qs:
            raise ValueError(
                f"cu_seqlens_k: sequence {b} has {ke - ks} keys but {qe - qs} queries; causal "
                "attention needs at least as many keys as queries"
            )
        o = _attend(
            q[qs:qe].float(),
            _dequant(k[ks:ke], k_scale),
            _dequant(v[ks:ke], v_scale),
            scale=scale,
            causal=causal,
            sliding_window=sliding_window,
            softcap=softcap,
        )
        out[qs:qe] = o.to(q.dtype)
    return out


def gather_paged_kv(
    cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor,  # [max_blocks] int32, one sequence's row
    context_len: int,
    start: int = 0,
) -> torch.Tensor:  # [context_len - start, num_kv_heads, head_dim], cache dtype
    """Tokens start .. context_len-1 of one sequence; only the blocks that hold them are read."""
    block_size = cache.shape[1]
    first, last = start // block_size, -(-context_len // block_size)
    blocks = block_table[first:last].long()
    tokens = cache[blocks].reshape(-1, *cache.shape[2:])
    return tokens[start - first * block_size : context_len - first * block_size]


def paged_decode_attention_ref(
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
) -> torch.Tensor:  # [batch, num_heads, head_dim] in q.dtype
    """One decode step: each sequence's single query (at position context_len - 1, its own key
    already written) attends to its paged cache. A zero context_len yields a zero row."""
    if q.shape[1] % k_cache.shape[2] != 0:
        raise ValueError(
            f"num_heads ({q.shape[1]}) of q must be a multiple of num_kv_heads "
            f"({k_cache.shape[2]}) of k_cache"
        )
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lens = context_lens.tolist()
    for b, n in enumerate(lens):
        if n <= 0:
            continue
        # A window only sees the last W keys: gather just those. Relative positions are unchanged
        # (the query stays last), so _attend's masking is still right.
        start = max(0, n - sliding_window) if sliding_window is not None else 0
        o = _attend(
            q[b : b + 1].float(),
            _dequant(gather_paged_kv(k_cache, block_tables[b], n, start), k_scale),
            _dequant(gather_paged_kv(v_cache, block_tables[b], n, start), v_scale),
            scale=scale,
            causal=True,
            sliding_window=sliding_window,
            softcap=softcap,
        )
        out[b] = o[0].to(q.dtype)
    return out


def quantize_fp8(x: torch.Tensor, scale: Scale) -> torch.Tensor:
    """x / scale clamped to the finite fp8 range, cast to float8_e4m3fn (round to nearest even)."""
    x = x.float()
    if scale is not None:
        x = x / (scale.float() if isinstance(scale, torch.Tensor) else float(scale))
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def write_kv_cache_ref(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], written in place
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], written in place
    slot_mapping: torch.Tensor,  # [num_tokens] int32/int64, block * block_size + offset, -1 = skip
    *,
    k_scale: Scale = None,
    v_scale: Scale = None,
) -> None:
    """Store new keys/values at their flat slots; fp8 caches get value / scale, clamped."""
    block_size = k_cache.shape[1]
    slots = slot_mapping.long()
    keep = slots >= 0
    slots = slots[keep]
    blocks, offsets = slots // block_size, slots % block_size
    for src, cache, s in ((k[keep], k_cache, k_scale), (v[keep], v_cache, v_scale)):
        if cache.dtype == FP8_DTYPE:
            src = quantize_fp8(src, s)
        cache[blocks, offsets] = src.to(cache.dtype)


# Fused decode-step kernels: RMSNorm (+ residual add), GeGLU, q/k norm + rope + KV-cache write -----
#
# References of kernels/norm.py, kernels/activation.py and kernels/rope_kv.py. They are also the
# CPU path, so they are the few torch ops the model used before the kernels existed (same bits,
# same speed) and stay differentiable when no ``out=`` buffer is given (the quantizer
# backpropagates through them). Numerics (gemma_pytorch / transformers): RMSNorm in fp32 times
# ``scale = 1 + w`` (fp32, made once by the caller), rounded to the activation dtype; GeGLU and rope
# op by op in the activation dtype, with rope cos/sin computed in fp32 and rounded first.

_F = torch.nn.functional


def rms_norm_ref(
    x: torch.Tensor,  # [T, D] (any leading dims; last dim contiguous)
    scale: torch.Tensor,  # [D] fp32, or fp32 broadcastable to x (e.g. [heads, head_dim])
    eps: float,
    *,
    out: torch.Tensor | None = None,  # [T, D] in x.dtype
) -> torch.Tensor:  # [T, D] in x.dtype
    """Gemma RMSNorm: normalise in fp32, multiply by ``scale``, round to x's dtype.

    One fused ``_F.rms_norm`` rather than five elementwise ops: on CPU each op costs its dispatch
    more than its arithmetic. A per-head scale multiplies after the norm (same math, same bits).
    """
    dim = (x.shape[-1],)
    if scale.shape == dim:
        y = _F.rms_norm(x.float(), dim, scale, eps).to(x.dtype)
    else:
        y = (_F.rms_norm(x.float(), dim, None, eps) * scale).to(x.dtype)
    return y if out is None else out.copy_(y)


def add_rms_norm_ref(
    h: torch.Tensor,  # [T, D] the sublayer's output
    residual: torch.Tensor,  # [T, D] same dtype
    scale: torch.Tensor | None,  # [D] fp32 norm of the new residual (next sublayer's input norm)
    eps: float,
    *,
    pre_scale: torch.Tensor | None = None,  # [D] fp32 post-norm of h first (Gemma 2/3)
    out: torch.Tensor | None = None,  # [T, D] for normed
    residual_out: torch.Tensor | None = None,  # [T, D] for new_residual; may be `residual`
) -> tuple[torch.Tensor, torch.Tensor | None]:  # (new_residual, normed or None)
    """``new_residual = residual + post_norm(h)``, then its RMSNorm: the glue between sublayers."""
    if pre_scale is not None:
        h = rms_norm_ref(h, pre_scale, eps)
    if residual_out is None:
        new_residual = residual + h
    else:
        new_residual = torch.add(residual, h, out=residual_out)
    normed = None if scale is None else rms_norm_ref(new_residual, scale, eps, out=out)
    return new_residual, normed


def gelu_tanh_and_mul_ref(
    gate: torch.Tensor,  # [T, I]
    up: torch.Tensor,  # [T, I]
    *,
    out: torch.Tensor | None = None,  # [T, I] in gate.dtype
) -> torch.Tensor:  # [T, I]
    """GeGLU: ``gelu_tanh(gate) * up``, op by op (the gelu rounded to the dtype before the mul)."""
    g = _F.gelu(gate, approximate="tanh")
    return g * up if out is None else torch.mul(g, up, out=out)


def rope_inv_freq(
    head_dim: int, base: float, scaling: float, device: torch.device | str | None = None
) -> torch.Tensor:  # [head_dim // 2] fp32
    """Rope inverse frequencies ``1 / base**(2i / head_dim) / scaling`` (linear scaling divides
    the positions, i.e. the frequencies), computed in fp32 exactly as transformers does."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float()
    return 1.0 / (base ** (exponent / head_dim)) / scaling


def rope_cos_sin_ref(
    positions: torch.Tensor,  # [T] int
    inv_freq: torch.Tensor,  # [head_dim // 2] fp32, from rope_inv_freq
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:  # ([T, 1, head_dim], [T, 1, head_dim]) in dtype
    """cos and *signed* sin of HF's rotate-half rope in fp32, rounded to ``dtype``, shaped to
    broadcast over heads.

    rotate_half(x) * sin == roll(x, half) * signed_sin, with signed_sin = (-sin_lo, sin_hi): a sign
    flip is exact, so the rope is four ops, not nine, with the same bits.
    """
    half = inv_freq.shape[0]
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    sin = emb.sin()
    sin[:, :half].neg_()
    return emb.cos().to(dtype)[:, None, :], sin.to(dtype)[:, None, :]


def qk_norm_rope_kv_write_ref(
    qk: torch.Tensor,  # [T, H + Hkv, hd]: query heads, then key heads
    v: torch.Tensor,  # [T, Hkv, hd]
    positions: torch.Tensor,  # [T] int
    inv_freq: torch.Tensor,  # [hd // 2] fp32
    norm: torch.Tensor | None,  # [H + Hkv, hd] fp32 per-head (1 + w), or None (Gemma 1/2)
    eps: float,
    num_q_heads: int,
    k_cache: torch.Tensor | None = None,  # [num_blocks, block_size, Hkv, hd]
    v_cache: torch.Tensor | None = None,  # [num_blocks, block_size, Hkv, hd]
    slot_mapping: torch.Tensor | None = None,  # [T] int, -1 = skip
    *,
    k_scale: Scale = None,
    v_scale: Scale = None,
    out: torch.Tensor | None = None,  # [T, H + Hkv, hd]; None: a new tensor (qk is not modified)
    cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None,  # rope_cos_sin_ref's, if computed
) -> torch.Tensor:  # [T, H + Hkv, hd] normed and roped, in qk.dtype
    """Per-head RMSNorm of q and k (Gemma 3), rope, and the new keys/values stored in the cache.

    The keys written are the normed, roped ones (``result[:, num_q_heads:]``); v is stored as is.
    ``cos_sin`` lets a caller compute the rope table once per step and share it across layers.
    """
    if norm is not None:
        qk = rms_norm_ref(qk, norm, eps)
    cos, sin = cos_sin if cos_sin is not None else rope_cos_sin_ref(positions, inv_freq, qk.dtype)
    qk = qk * cos + qk.roll(qk.shape[-1] // 2, dims=-1) * sin
    if k_cache is not None:
        write_kv_cache_ref(qk[:, num_q_heads:], v, k_cache, v_cache, slot_mapping,
                           k_scale=k_scale, v_scale=v_scale)  # fmt: skip
    return qk if out is None else out.copy_(qk)
