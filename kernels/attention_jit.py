"""The Triton programs behind ``kernels/attention.py`` (its docstring describes them; its
launchers check arguments, pick tile sizes and grids, and call these).

Scores live in log2 units (``exp2`` is the fast instruction); the LSE passed between the two
decode kernels is in log2 units too. Offsets that scale with cache size or token count use
int64.

``ROW_ALIGN`` states what Triton would otherwise learn only from its specialisation on integer
arguments: that each row starts on a 16-element boundary, so a row loads as 16-byte vectors.
The launcher sets it from the actual strides, so the compiled variant is fixed by the launch
config (and checked ahead of time) instead of by the values the JIT happens to see; without it
every element needs its own 64-bit address and the tiles spill.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _soft_cap(s, softcap):
    # c * tanh(s / c), with tanh(x) = 2 * sigmoid(2x) - 1: portable (libdevice tanh is not in the
    # interpreter) and saturating to +-1 without NaN for large |x|.
    return softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr):
    # "ieee" means exact fp32 products: used for fp32 inputs, and under the Triton interpreter,
    # which multiplies 16-bit floats as their raw integer bits; widening after any rounding to
    # bf16/fp16 keeps the interpreter's numerics those of the GPU path. On GPU, 16-bit inputs use
    # tensor cores.
    if DOT_PRECISION == "ieee":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION: tl.constexpr):
    # s: [M, N] fp32 scores in log2 units, -inf where masked; v: [N, D]; m_i, l_i: [M];
    # acc: [M, D].
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen only masked keys keeps m = -inf: subtract 0 instead, so exp2 gives 0,
    # not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _scores(q, k, scale, softcap, DOT_PRECISION: tl.constexpr, USE_SOFTCAP: tl.constexpr):
    # q: [M, D], k: [N, D] -> [M, N] fp32 scores in log2 units; scale includes k's fp8 scale.
    s = _dot(q, tl.trans(k), DOT_PRECISION)
    if USE_SOFTCAP:
        return _soft_cap(s * scale, softcap) * 1.4426950408889634  # log2(e)
    return s * (scale * 1.4426950408889634)


@triton.jit
def _find_seq(cu_q_ptr, tile, num_seqs, BLOCK_M: tl.constexpr):
    # Largest b with cu_q[b] // BLOCK_M + b <= tile (the first tile id of sequence b).
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(cu_q_ptr + mid) // BLOCK_M + mid <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _prefill_kernel(
    q_ptr,  # [total_q, num_heads, head_dim]
    k_ptr,  # [total_k, num_kv_heads, head_dim]
    v_ptr,  # [total_k, num_kv_heads, head_dim]
    o_ptr,  # [total_q, num_heads, head_dim]
    cu_q_ptr,  # [batch + 1] int32
    cu_k_ptr,  # [batch + 1] int32
    k_scale_ptr,  # [1] fp32, read only when IS_FP8
    v_scale_ptr,  # [1] fp32, read only when IS_FP8
    scale, softcap, num_seqs,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    GROUP: tl.constexpr,  # num_heads // num_kv_heads
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, SLIDING_WINDOW: tl.constexpr,  # 0 = no window
    USE_SOFTCAP: tl.constexpr, IS_FP8: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ROW_ALIGN: tl.constexpr,  # 16 when every row stride is a multiple of 16 elements, else 1
):  # fmt: skip
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    seq = _find_seq(cu_q_ptr, tile, num_seqs, BLOCK_M)
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    m_start = (tile - (q_start // BLOCK_M + seq)) * BLOCK_M
    if m_start >= q_len:
        return  # spare tile
    k_start = tl.load(cu_k_ptr + seq)
    k_len = tl.load(cu_k_ptr + seq + 1) - k_start

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_mask = offs_d < HEAD_DIM
    m_mask = offs_m < q_len
    q_pos = k_len - q_len + offs_m  # absolute positions: queries are the last q_len of k_len
    q_rows = (q_start + offs_m).to(tl.int64)
    q_off = tl.multiple_of(q_rows * stride_qt + head * stride_qh, ROW_ALIGN)
    q = tl.load(q_ptr + q_off[:, None] + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # fmt: skip
    qk_scale = scale
    if IS_FP8:
        qk_scale = scale * tl.load(k_scale_ptr)

    lo = 0
    hi = k_len
    if CAUSAL:  # skip key tiles after the tile's last query and before its first query's window
        hi = tl.minimum(k_len, k_len - q_len + m_start + BLOCK_M)
        if SLIDING_WINDOW > 0:
            lo = tl.maximum(0, k_len - q_len + m_start - SLIDING_WINDOW + 1) // BLOCK_N * BLOCK_N
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    for n_start in range(lo, hi, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < k_len
        k_rows = (k_start + offs_n).to(tl.int64)
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k_off = tl.multiple_of(k_rows * stride_kt + kv_head * stride_kh, ROW_ALIGN)
        v_off = tl.multiple_of(k_rows * stride_vt + kv_head * stride_vh, ROW_ALIGN)
        k = tl.load(k_ptr + k_off[:, None] + offs_d[None, :],
                    mask=kv_mask, other=0.0).to(q.dtype)  # fmt: skip
        v = tl.load(v_ptr + v_off[:, None] + offs_d[None, :],
                    mask=kv_mask, other=0.0).to(q.dtype)  # fmt: skip
        s = _scores(q, k, qk_scale, softcap, DOT_PRECISION, USE_SOFTCAP)
        # Masks apply on every tile (not only diagonal ones): simpler, and cheap next to two dots.
        visible = n_mask[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= q_pos[:, None])
            if SLIDING_WINDOW > 0:
                visible = visible & (offs_n[None, :] > q_pos[:, None] - SLIDING_WINDOW)
        s = tl.where(visible, s, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # rows with no visible key stay 0
    if IS_FP8:
        out = out * tl.load(v_scale_ptr)
    o_off = tl.multiple_of(q_rows * stride_ot + head * stride_oh, ROW_ALIGN)
    tl.store(o_ptr + o_off[:, None] + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])  # fmt: skip


@triton.jit
def _decode_split_kernel(
    q_ptr,  # [batch, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables_ptr,  # [batch, max_blocks] int32
    context_lens_ptr,  # [batch] int32
    k_scale_ptr,  # [1] fp32, read only when IS_FP8
    v_scale_ptr,  # [1] fp32, read only when IS_FP8
    o_ptr,  # [batch, num_heads, head_dim], written only when ONE_SPLIT
    mid_o_ptr,  # [batch, num_heads, num_splits, head_dim] fp32, normalised per split; not ONE_SPLIT
    mid_lse_ptr,  # [batch, num_heads, num_splits] fp32, log2 units, -inf for an empty split
    scale, softcap, min_split_keys, block_size, max_blocks, num_splits,
    stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_bt, stride_ob, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,  # query heads per kv head, padded to pow2 >= 16
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, IS_FP8: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ONE_SPLIT: tl.constexpr,  # num_splits == 1: write the final output, no reduce follows
    ROW_ALIGN: tl.constexpr,  # 16 when every row stride is a multiple of 16 elements, else 1
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    # Clamp to the table's capacity so a bad length can never index past the block table row.
    ctx = tl.maximum(tl.minimum(tl.load(context_lens_ptr + b), max_blocks * block_size), 0)
    start = 0
    if SLIDING_WINDOW > 0:  # the query at ctx - 1 sees positions ctx - W .. ctx - 1
        start = tl.maximum(ctx - SLIDING_WINDOW, 0)
    lo = start
    hi = ctx
    if not ONE_SPLIT:
        # The split count is fixed by the launch (the same inside a CUDA graph); each split's
        # range comes from this sequence's visible keys, so a 4k context on a 128k-wide table
        # still spreads over every split. Whole BLOCK_N tiles, at least min_split_keys keys:
        # short contexts leave the last splits empty (lse = -inf).
        split_keys = tl.cdiv(tl.cdiv(ctx - start, num_splits), BLOCK_N) * BLOCK_N
        split_keys = tl.maximum(split_keys, min_split_keys)
        lo = start + split * split_keys
        hi = tl.minimum(ctx, lo + split_keys)

    offs_g = tl.arange(0, GROUP_PAD)
    g_mask = offs_g < GROUP
    heads = kv_head * GROUP + offs_g
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_mask = offs_d < HEAD_DIM
    q_off = tl.multiple_of(b * stride_qb + heads * stride_qh, ROW_ALIGN)
    q = tl.load(q_ptr + q_off[:, None] + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # fmt: skip
    qk_scale = scale
    if IS_FP8:
        qk_scale = scale * tl.load(k_scale_ptr)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    for n_start in range(lo, hi, BLOCK_N):
        pos = n_start + tl.arange(0, BLOCK_N)
        in_range = pos < hi
        # Block ids are loaded only for in-range positions; masked rows read block 0, slot 0.
        blk = tl.load(block_tables_ptr + b * stride_bt + pos // block_size, mask=in_range, other=0)
        blk = blk.to(tl.int64)
        tok = pos % block_size
        kv_mask = in_range[:, None] & d_mask[None, :]
        k_off = tl.multiple_of(blk * stride_kb + tok * stride_kt + kv_head * stride_kh, ROW_ALIGN)
        v_off = tl.multiple_of(blk * stride_vb + tok * stride_vt + kv_head * stride_vh, ROW_ALIGN)
        k = tl.load(k_cache_ptr + k_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + v_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _scores(q, k.to(q.dtype), qk_scale, softcap, DOT_PRECISION, USE_SOFTCAP)
        s = tl.where(in_range[None, :], s, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(s, v.to(q.dtype), m_i, l_i, acc, DOT_PRECISION)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if IS_FP8:
        out = out * tl.load(v_scale_ptr)
    out_mask = g_mask[:, None] & d_mask[None, :]
    if ONE_SPLIT:  # rows with no key (ctx 0) stay 0, as after the reduce
        o_off = tl.multiple_of(b * stride_ob + heads * stride_oh, ROW_ALIGN)
        tl.store(o_ptr + o_off[:, None] + offs_d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=out_mask)  # fmt: skip
    else:
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        row = (b * GROUP * tl.num_programs(1) + heads) * num_splits + split  # [b, heads, splits]
        tl.store(mid_lse_ptr + row, lse, mask=g_mask)
        tl.store(mid_o_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=out_mask)


@triton.jit
def _decode_reduce_kernel(
    mid_o_ptr,  # [batch, num_heads, num_splits, head_dim] fp32
    mid_lse_ptr,  # [batch, num_heads, num_splits] fp32, log2 units
    o_ptr,  # [batch, num_heads, head_dim]
    num_splits, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    row = b * tl.num_programs(1) + head
    offs_s = tl.arange(0, SPLITS_PAD)
    s_mask = offs_s < num_splits
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_mask = offs_d < HEAD_DIM
    lse = tl.load(mid_lse_ptr + row * num_splits + offs_s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # 0 for empty splits
    o = tl.load(mid_o_ptr + (row * num_splits + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                mask=s_mask[:, None] & d_mask[None, :], other=0.0)  # fmt: skip
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(total == 0.0, 1.0, total)  # ctx 0 -> zeros
    tl.store(o_ptr + b * stride_ob + head * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty),
             mask=d_mask)  # fmt: skip


@triton.jit
def _quantize_fp8(x, scale):
    # x / scale, clamped, rounded to the e4m3 grid (nearest, ties to even) in fp32 so the final cast
    # is exact. Rounding here rather than in the cast keeps results bit-identical to torch on every
    # backend: the Triton interpreter's software cast drops the carry when rounding up crosses a
    # power of two (31.4 -> 16). The cost is a few integer ops in a memory-bound kernel.
    # div_rn: IEEE round-to-nearest division, as torch's; Triton's `/` on fp32 is approximate
    # (div.full) on CUDA, which would move values near a rounding boundary of the fp8 grid.
    y = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -448.0), 448.0)
    a = tl.abs(y)
    exp = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)  # subnormals: -6
    ulp = ((exp + 124) << 23).to(tl.float32, bitcast=True)  # 2 ** (exp - 3): 3 mantissa bits
    magic = ulp * 12582912.0  # 1.5 * 2**23 * ulp: adding it rounds a to a multiple of ulp
    r = (a + magic) - magic
    return tl.where(y < 0, -r, r)


@triton.jit
def _write_kv_kernel(
    k_ptr,  # [num_tokens, num_kv_heads, head_dim]
    v_ptr,  # [num_tokens, num_kv_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_ptr,  # [num_tokens] int32/int64, -1 = skip
    k_scale_ptr,  # [1] fp32, read only when IS_FP8
    v_scale_ptr,  # [1] fp32, read only when IS_FP8
    block_size,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
    NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, IS_FP8: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    blk = slot // block_size
    tok = slot % block_size
    offs_h = tl.arange(0, HEADS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask = (offs_h < NUM_KV_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    if IS_FP8:
        k = _quantize_fp8(k.to(tl.float32), tl.load(k_scale_ptr))
        v = _quantize_fp8(v.to(tl.float32), tl.load(v_scale_ptr))
    k_dst = k_cache_ptr + blk * stride_kcb + tok * stride_kct + offs_h[:, None] * stride_kch
    v_dst = v_cache_ptr + blk * stride_vcb + tok * stride_vct + offs_h[:, None] * stride_vch
    tl.store(k_dst + offs_d[None, :], k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst + offs_d[None, :], v.to(v_cache_ptr.dtype.element_ty), mask=mask)
