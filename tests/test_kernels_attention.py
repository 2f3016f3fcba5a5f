"""Attention kernels (kernels/attention.py) against their references (kernels/reference.py), and the
references against an independent naive implementation.

Without CUDA the Triton kernels run under the Triton interpreter on CPU tensors; with CUDA natively.
Shapes are small because the interpreter is slow; cases are a covering set, not a full product.

Tolerances (kernel vs reference, same inputs): fp32 1e-4; fp16 5e-3; bf16 2e-2 (bf16 has 8 bits of
mantissa, the kernel rounds P to bf16 before P@V and the interpreter truncates on casts to bf16).
FP8 caches: kernel vs reference on the *same* fp8 data uses the tolerance of q's dtype (both read
identical values); fp8 vs unquantised attention is looser (0.1), since e4m3 keeps 3 mantissa bits.
"""

import os
import sys

import torch

# Interpreter only for this module: ops.py (used by other tests) would otherwise run every CPU op
# through Triton. The env var must be set when the kernels are decorated and when they launch.
_INTERPRET = not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
if _INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in ("trt_gemma.kernels.attention", "trt_gemma.kernels.attention_jit"):
        sys.modules.pop(_name, None)  # re-decorate if imported natively

import importlib  # noqa: E402
import itertools  # noqa: E402

import pytest  # noqa: E402

# import_module, not `from ... import`: the package attribute may still hold a native import.
attn = importlib.import_module("trt_gemma.kernels.attention")
from trt_gemma.kernels import reference as ref  # noqa: E402

if _INTERPRET:
    del os.environ["TRITON_INTERPRET"]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
FP8 = torch.float8_e4m3fn


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    if _INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    # Each test draws the same inputs whatever ran before it (tolerances were set on them).
    torch.manual_seed(0)


def _cu(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=DEVICE)


def _randn(*shape, dtype=torch.float32, mul=1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=DEVICE) * mul).to(dtype)


def _close(out: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)


def _naive(q, k, v, *, scale, causal=True, window=None, softcap=None):
    """One sequence in fp64: repeat_interleave'd KV heads, a mask built by explicit loops, explicit
    softmax. Deliberately shares no code with the reference."""
    lq, lk, group = q.shape[0], k.shape[0], q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    allowed = torch.zeros(lq, lk, dtype=torch.bool)
    for i in range(lq):
        p = lk - lq + i
        for j in range(lk):
            allowed[i, j] = not causal or (j <= p and (window is None or p - j < window))
    s = s.masked_fill(~allowed.to(s.device), float("-inf"))
    e = torch.exp(s - s.amax(-1, keepdim=True).clamp_min(-1e300))  # all-masked row: e = 0
    p = e / e.sum(-1, keepdim=True).clamp_min(1e-300)
    return torch.einsum("hqk,khd->qhd", p, v)


def _paged(ks, vs, block_size, dtype, k_scale=None, v_scale=None):
    """Scatter per-sequence K/V into a NaN-filled paged cache with shuffled block ids. Table padding
    points at a NaN block too, so reading any position past a context poisons the output."""
    hkv, d = ks[0].shape[1], ks[0].shape[2]
    n_blocks = [-(-k.shape[0] // block_size) for k in ks]
    total = sum(n_blocks) + 3
    ids = torch.randperm(total).tolist()
    pad_id = ids.pop()
    shape = (total, block_size, hkv, d)
    caches = [torch.full(shape, float("nan"), device=DEVICE).to(dtype) for _ in range(2)]
    tables = torch.full((len(ks), max(n_blocks) + 1), pad_id, dtype=torch.int32, device=DEVICE)
    slots = []
    for b, n in enumerate(n_blocks):
        tables[b, :n] = torch.tensor(ids[:n], dtype=torch.int32)
        pos = torch.arange(ks[b].shape[0])
        slots.append(tables[b, pos // block_size].cpu().long() * block_size + pos % block_size)
        del ids[:n]
    slot_mapping = torch.cat(slots).to(DEVICE) if slots else torch.zeros(0, dtype=torch.long)
    ref.write_kv_cache_ref(torch.cat(ks), torch.cat(vs), *caches, slot_mapping,
                           k_scale=k_scale, v_scale=v_scale)  # fmt: skip
    lens = torch.tensor([k.shape[0] for k in ks], dtype=torch.int32, device=DEVICE)
    return caches[0], caches[1], tables, lens


# --------------------------------------------------------------------------- references vs naive


@pytest.mark.parametrize(
    "lq, lk, heads, window, softcap, causal",
    [
        ([5, 0, 9], [5, 0, 9], (4, 4), None, None, True),
        ([3, 7], [11, 7], (4, 2), 4, 2.0, True),  # prefix, window shorter than context
        ([6], [6], (4, 1), 50, None, True),  # MQA, window longer than context
        ([4, 2], [9, 5], (2, 1), 3, 1.5, False),  # non-causal ignores the window
    ],
)
def test_prefill_reference_matches_naive(lq, lk, heads, window, softcap, causal):
    d, scale = 16, 0.3
    q = _randn(sum(lq), heads[0], d)
    k, v = _randn(sum(lk), heads[1], d), _randn(sum(lk), heads[1], d)
    out = ref.prefill_attention_ref(q, k, v, _cu(lq), _cu(lk), scale=scale, causal=causal,
                                    sliding_window=window, softcap=softcap)  # fmt: skip
    cq, ck = _cu(lq).tolist(), _cu(lk).tolist()
    for b in range(len(lq)):
        if lq[b] == 0:
            continue
        expected = _naive(q[cq[b] : cq[b + 1]], k[ck[b] : ck[b + 1]], v[ck[b] : ck[b + 1]],
                          scale=scale, causal=causal, window=window if causal else None,
                          softcap=softcap)  # fmt: skip
        _close(out[cq[b] : cq[b + 1]].double(), expected, 1e-5)


def test_reference_long_prompt_is_chunked_consistently(monkeypatch):
    q, k, v = _randn(40, 2, 8), _randn(40, 1, 8), _randn(40, 1, 8)
    whole = ref.prefill_attention_ref(q, k, v, _cu([40]), _cu([40]), scale=0.5, sliding_window=7)
    monkeypatch.setattr(ref, "_MAX_SCORE_ELEMENTS", 2 * 40 * 3)  # 3 queries per chunk
    chunked = ref.prefill_attention_ref(q, k, v, _cu([40]), _cu([40]), scale=0.5, sliding_window=7)
    _close(chunked, whole, 1e-6)


@pytest.mark.parametrize("window, softcap", [(None, None), (5, 3.0)])
def test_decode_and_write_references_match_naive(window, softcap):
    d, bs, scale = 16, 4, 0.25
    lens = [1, 4, 9]
    ks = [_randn(n, 2, d) for n in lens]
    vs = [_randn(n, 2, d) for n in lens]
    k_cache, v_cache, tables, ctx = _paged(ks, vs, bs, torch.float32)
    q = _randn(len(lens), 4, d)
    out = ref.paged_decode_attention_ref(q, k_cache, v_cache, tables, ctx, scale=scale,
                                         sliding_window=window, softcap=softcap)  # fmt: skip
    for b in range(len(lens)):
        expected = _naive(q[b : b + 1], ks[b], vs[b], scale=scale, window=window, softcap=softcap)
        _close(out[b : b + 1].double(), expected, 1e-5)


def test_write_reference_skips_padding_and_quantises():
    k, v = _randn(3, 1, 4, mul=10), _randn(3, 1, 4)
    kc = torch.zeros(2, 2, 1, 4, dtype=FP8, device=DEVICE)
    vc = torch.zeros(2, 2, 1, 4, dtype=FP8, device=DEVICE)
    ref.write_kv_cache_ref(k, v, kc, vc, torch.tensor([3, -1, 0], device=DEVICE), k_scale=0.1)
    assert kc[0, 1].float().abs().sum() == 0 and kc[1, 0].float().abs().sum() == 0
    expected = (k[0] / 0.1).clamp(-448, 448).to(FP8).float()
    assert torch.equal(kc[1, 1].float(), expected)
    assert torch.equal(vc[0, 0].float(), v[2].to(FP8).float())


# --------------------------------------------------------------------------- kernels vs references

PREFILL_CASES = [
    # head_dim, (heads, kv_heads), lens_q, lens_k, window, softcap, dtype, causal
    (64, (2, 2), [17, 1, 0, 33], [17, 1, 0, 33], None, None, torch.float32, True),
    (128, (4, 2), [5, 16], [40, 16], 8, 1.5, torch.bfloat16, True),  # prefix, short window
    (256, (2, 1), [20], [20], 64, None, torch.float16, True),  # MQA, window > context
    (80, (3, 1), [9, 3], [9, 30], None, 5.0, torch.float32, True),  # head_dim not a power of 2
    (64, (2, 1), [7, 12], [20, 12], None, None, torch.float32, False),
    (64, (2, 2), [0, 0], [0, 0], None, None, torch.float32, True),  # all sequences empty
]


@pytest.mark.parametrize("d, heads, lq, lk, window, softcap, dtype, causal", PREFILL_CASES)
def test_prefill_matches_reference(d, heads, lq, lk, window, softcap, dtype, causal):
    q = _randn(sum(lq), heads[0], d, dtype=dtype, mul=3.0)  # large scores: softcap matters
    k, v = _randn(sum(lk), heads[1], d, dtype=dtype), _randn(sum(lk), heads[1], d, dtype=dtype)
    kw = dict(scale=d**-0.5, causal=causal, sliding_window=window, softcap=softcap)
    out = attn.prefill_attention(q, k, v, _cu(lq), _cu(lk), **kw)
    _close(out, ref.prefill_attention_ref(q, k, v, _cu(lq), _cu(lk), **kw), TOL[dtype])


def test_prefill_fp8_kv():
    lq, lk, d = [6, 18], [6, 35], 64
    q = _randn(sum(lq), 4, d, dtype=torch.bfloat16)
    k_real, v_real = _randn(sum(lk), 2, d), _randn(sum(lk), 2, d)
    k, v = ref.quantize_fp8(k_real, 0.02), ref.quantize_fp8(v_real, 0.01)
    kw = dict(scale=d**-0.5, sliding_window=10, softcap=2.0)
    scales = dict(k_scale=0.02, v_scale=torch.tensor(0.01, device=DEVICE))
    out = attn.prefill_attention(q, k, v, _cu(lq), _cu(lk), **scales, **kw)
    expected = ref.prefill_attention_ref(q, k, v, _cu(lq), _cu(lk), **scales, **kw)
    _close(out, expected, TOL[torch.bfloat16])
    unquantised = ref.prefill_attention_ref(q.float(), k_real, v_real, _cu(lq), _cu(lk), **kw)
    _close(out.float(), unquantised, 0.1)


DECODE_CASES = [
    # head_dim, (heads, kv_heads), context lens, block_size, window, softcap, dtype, num_splits
    (64, (2, 2), [1, 16, 17, 40], 16, None, None, torch.float32, None),  # on/across blocks
    (128, (8, 2), [37, 9], 8, 10, 1.5, torch.bfloat16, 3),  # window < context, split-K
    (256, (8, 1), [33, 5], 16, 100, None, torch.float16, None),  # gemma-2b MQA, window > ctx
    (96, (6, 2), [13, 2, 0], 4, None, 5.0, torch.float32, 2),  # non-pow2 dims, empty context
    (64, (4, 4), [3], 16, None, None, torch.float32, 8),  # more splits than keys
]


@pytest.mark.parametrize("d, heads, lens, bs, window, softcap, dtype, splits", DECODE_CASES)
def test_paged_decode_matches_reference(d, heads, lens, bs, window, softcap, dtype, splits):
    ks = [_randn(n, heads[1], d, dtype=dtype) for n in lens]
    vs = [_randn(n, heads[1], d, dtype=dtype) for n in lens]
    k_cache, v_cache, tables, ctx = _paged(ks, vs, bs, dtype)
    q = _randn(len(lens), heads[0], d, dtype=dtype, mul=3.0)
    kw = dict(scale=d**-0.5, sliding_window=window, softcap=softcap)
    out = attn.paged_decode_attention(q, k_cache, v_cache, tables, ctx, num_splits=splits, **kw)
    expected = ref.paged_decode_attention_ref(q, k_cache, v_cache, tables, ctx, **kw)
    _close(out, expected, TOL[dtype])
    if 0 in lens:
        assert out[lens.index(0)].abs().sum() == 0


def test_paged_decode_fp8_cache():
    lens, d, bs = [50, 3], 64, 16
    ks = [_randn(n, 2, d) for n in lens]
    vs = [_randn(n, 2, d) for n in lens]
    k_cache, v_cache, tables, ctx = _paged(ks, vs, bs, FP8, k_scale=0.02, v_scale=0.01)
    q = _randn(2, 4, d, dtype=torch.bfloat16)
    kw = dict(scale=d**-0.5, sliding_window=20, k_scale=0.02, v_scale=0.01)
    out = attn.paged_decode_attention(q, k_cache, v_cache, tables, ctx, num_splits=4, **kw)
    _close(out, ref.paged_decode_attention_ref(q, k_cache, v_cache, tables, ctx, **kw), 2e-2)
    for b in range(2):
        expected = _naive(q[b : b + 1].float(), ks[b], vs[b], scale=d**-0.5, window=20)
        _close(out[b : b + 1].double(), expected, 0.1)


@pytest.mark.parametrize(
    "cache_dtype, src_dtype, slot_dtype",
    [(torch.bfloat16, torch.bfloat16, torch.int32), (FP8, torch.float16, torch.int64)],
)
def test_write_kv_cache_matches_reference(cache_dtype, src_dtype, slot_dtype):
    hkv, d, bs = 2, 48, 4
    qkv = _randn(7, 4 + 2 * hkv, d, dtype=src_dtype, mul=8.0)
    k, v = qkv[:, 4 : 4 + hkv], qkv[:, 4 + hkv :]  # strided views, as split from a fused QKV
    slots = torch.tensor([5, -1, 0, 23, 8, -1, 9], dtype=slot_dtype, device=DEVICE)
    caches = [torch.zeros(6, bs, hkv, d, device=DEVICE).to(cache_dtype) for _ in range(4)]
    scales = dict(k_scale=0.05, v_scale=torch.tensor(0.03)) if cache_dtype == FP8 else {}
    attn.write_kv_cache(k, v, caches[0], caches[1], slots, **scales)
    ref.write_kv_cache_ref(k, v, caches[2], caches[3], slots, **scales)
    assert torch.equal(caches[0].float(), caches[2].float())
    assert torch.equal(caches[1].float(), caches[3].float())


def test_write_kv_cache_fp8_rounding_edges():
    # Ties, carries across powers of two (31.4 -> 32), subnormals, clamping beyond +-448, zeros.
    vals = [17.0, 19.0, 31.4, -31.4, 127.9, 0.0, -0.0, 2**-8, 3 * 2**-10, 1e-4, 460.0, -1e4]
    x = torch.tensor(vals + [0.5] * (16 - len(vals)), device=DEVICE).view(1, 1, 16)
    kc, vc = (torch.zeros(1, 1, 1, 16, device=DEVICE).to(FP8) for _ in range(2))
    attn.write_kv_cache(x, x, kc, vc, torch.tensor([0], device=DEVICE))
    assert torch.equal(kc.float().flatten(), ref.quantize_fp8(x, None).float().flatten())


# --------------------------------------------------------------------------- validation


def _decode_args(**override):
    args = dict(
        q=torch.zeros(2, 4, 64),
        k_cache=torch.zeros(5, 16, 2, 64),
        v_cache=torch.zeros(5, 16, 2, 64),
        block_tables=torch.zeros(2, 3, dtype=torch.int32),
        context_lens=torch.ones(2, dtype=torch.int32),
    )
    args.update(override)
    return args


@pytest.mark.parametrize(
    "override, name",
    [
        (dict(q=torch.zeros(2, 64)), "q"),
        (dict(q=torch.zeros(2, 3, 64)), "q"),  # 3 heads on 2 kv heads
        (dict(k_cache=torch.zeros(5, 16, 2, 32)), "k_cache"),
        (dict(v_cache=torch.zeros(5, 16, 2, 64, dtype=torch.float16)), "v_cache"),
        (dict(block_tables=torch.zeros(3, 3, dtype=torch.int32)), "block_tables"),
        (dict(context_lens=torch.ones(2, dtype=torch.int64)), "context_lens"),
        (dict(k_cache=torch.zeros(5, 16, 2, 64, device="meta")), "k_cache"),
    ],
)
def test_decode_bad_input_names_argument(override, name):
    args = _decode_args(**override)
    with pytest.raises(ValueError, match=f"^{name}[: ]"):
        attn.paged_decode_attention(*args.values(), scale=1.0)


def test_prefill_and_write_bad_input_names_argument():
    q, k = torch.zeros(4, 2, 64), torch.zeros(4, 1, 64)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    cases = [
        (dict(k=torch.zeros(4, 1, 32)), "k"),
        (dict(v=torch.zeros(3, 1, 64)), "v"),
        (dict(cu_seqlens_q=cu.long()), "cu_seqlens_q"),
        (dict(cu_seqlens_k=torch.tensor([0, 2, 4], dtype=torch.int32)), "cu_seqlens_k"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(q=torch.zeros(4, 2, 512), k=torch.zeros(4, 1, 512), v=torch.zeros(4, 1, 512)),
         "head_dim"),
    ]  # fmt: skip
    for override, name in cases:
        args = dict(q=q, k=k, v=k, cu_seqlens_q=cu, cu_seqlens_k=cu, scale=1.0) | override
        with pytest.raises(ValueError, match=f"^{name}[: ]"):
            attn.prefill_attention(**args)
    caches = torch.zeros(2, 4, 1, 64), torch.zeros(2, 4, 1, 64)
    with pytest.raises(ValueError, match="^slot_mapping:"):
        attn.write_kv_cache(k, k, *caches, torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="^k_cache:"):
        attn.write_kv_cache(k, k, torch.zeros(2, 4, 2, 64), caches[1], torch.zeros(4).int())


# --------------------------------------------------------------------------- static decode splits


def _widen(tables: torch.Tensor, width: int) -> torch.Tensor:
    """The same rows padded to `width` columns with the table's own padding (a NaN block), as a
    CUDA-graph runtime's max_model_len-wide table."""
    wide = tables[:, -1:].expand(-1, width).clone()
    wide[:, : tables.shape[1]] = tables
    return wide


def _split_lse(ws: torch.Tensor, batch: int, heads: int, splits: int, d: int) -> torch.Tensor:
    n_o = batch * heads * splits * d
    return ws[n_o : n_o + batch * heads * splits].view(batch, heads, splits)


def test_decode_num_splits_is_static():
    # The interpreter counts 4 SMs: ~2 waves = 8 programs, at least 1 split, at most 64.
    assert attn.decode_num_splits(1, 1, "cpu") == 8
    assert attn.decode_num_splits(2, 2, "cpu") == 2
    assert attn.decode_num_splits(4, 2, "cpu") == 1
    assert attn.decode_num_splits(1000, 8, "cpu") == 1
    assert attn.decode_num_splits(0, 1, "cpu") == 8  # an empty batch still gets a valid count


@pytest.mark.parametrize("window", [None, 24])
def test_decode_short_contexts_on_wide_table_use_their_splits(window):
    # 40-token contexts on a 4096-block (64k-token) table: the split ranges come from each
    # sequence's visible keys, so a context spreads over cdiv(visible, 16) splits (16 = the
    # interpreter's BLOCK_N and least keys per split), not into split 0 of 4096 * 16 / splits.
    d, heads, splits, bs = 64, (4, 1), 16, 16
    lens = [40, 1, 0, 100]
    ks = [_randn(n, heads[1], d) for n in lens]
    vs = [_randn(n, heads[1], d) for n in lens]
    k_cache, v_cache, tables, ctx = _paged(ks, vs, bs, torch.float32)
    tables = _widen(tables, 4096)
    q = _randn(len(lens), heads[0], d, mul=3.0)
    kw = dict(scale=d**-0.5, sliding_window=window, softcap=5.0)
    ws = attn.decode_workspace(len(lens), heads[0], heads[1], d, DEVICE)
    for b in range(1, len(lens) + 1):  # every batch up to the max fits its default split count
        s = attn.decode_num_splits(b, heads[1], DEVICE)
        assert s == 1 or ws.numel() >= b * heads[0] * s * (d + 1)
    ws = torch.full((len(lens) * heads[0] * splits * (d + 1),), 7.0, device=DEVICE)
    out = attn.paged_decode_attention(q, k_cache, v_cache, tables, ctx, num_splits=splits,
                                      workspace=ws, **kw)  # fmt: skip
    _close(out, ref.paged_decode_attention_ref(q, k_cache, v_cache, tables, ctx, **kw), 1e-4)
    lse = _split_lse(ws, len(lens), heads[0], splits, d)
    for b, n in enumerate(lens):
        visible = min(n, window or n)
        used = -(-visible // 16)
        assert torch.isfinite(lse[b, :, :used]).all(), (b, lse[b])
        assert (lse[b, :, used:] == float("-inf")).all(), (b, lse[b])


class _NoLaunch:
    def __getitem__(self, grid):
        raise AssertionError("the reduce kernel must not launch with one split")


def test_decode_one_split_writes_output_without_reduce(monkeypatch):
    d, heads, bs = 128, (8, 2), 8
    lens = [37, 9, 0]
    ks = [_randn(n, heads[1], d, dtype=torch.bfloat16) for n in lens]
    vs = [_randn(n, heads[1], d, dtype=torch.bfloat16) for n in lens]
    k_cache, v_cache, tables, ctx = _paged(ks, vs, bs, torch.bfloat16)
    q = _randn(len(lens), heads[0], d, dtype=torch.bfloat16, mul=3.0)
    kw = dict(scale=d**-0.5, sliding_window=10, softcap=1.5)
    expected = ref.paged_decode_attention_ref(q, k_cache, v_cache, tables, ctx, **kw)
    monkeypatch.setattr(attn, "_decode_reduce_kernel", _NoLaunch())
    ws = torch.full((64,), 7.0, device=DEVICE)
    out = attn.paged_decode_attention(q, k_cache, v_cache, _widen(tables, 300), ctx,
                                      num_splits=1, workspace=ws, **kw)  # fmt: skip
    _close(out, expected, TOL[torch.bfloat16])
    assert out[2].abs().sum() == 0
    assert (ws == 7.0).all()  # the workspace was not touched
    # The default count is 1 once batch * kv heads fill ~2 waves (8 programs here).
    many = torch.cat([q] * 2)[:4]
    out = attn.paged_decode_attention(many, k_cache, v_cache, torch.cat([tables] * 2)[:4],
                                      torch.cat([ctx] * 2)[:4], **kw)  # fmt: skip
    _close(out[:3], expected, TOL[torch.bfloat16])


def test_decode_into_given_out_and_workspace_matches_allocating_path():
    d, heads, bs = 64, (4, 1), 16
    lens = [50, 3, 17]
    ks = [_randn(n, heads[1], d, dtype=torch.float16) for n in lens]
    vs = [_randn(n, heads[1], d, dtype=torch.float16) for n in lens]
    k_cache, v_cache, tables, ctx = _paged(ks, vs, bs, torch.float16)
    q = _randn(len(lens), heads[0], d, dtype=torch.float16)
    kw = dict(scale=d**-0.5, sliding_window=20)
    fresh = attn.paged_decode_attention(q, k_cache, v_cache, tables, ctx, **kw)
    assert attn.decode_num_splits(len(lens), heads[1], DEVICE) > 1  # the reduce runs
    buf = torch.full((len(lens), heads[0] + 2, d), 9.0, dtype=torch.float16, device=DEVICE)
    out = buf[:, 1:-1]  # a strided view, as a slice of a packed [tokens, heads, d] output
    ws = attn.decode_workspace(8, heads[0], heads[1], d, DEVICE)
    got = attn.paged_decode_attention(q, k_cache, v_cache, tables, ctx, out=out, workspace=ws,
                                      **kw)  # fmt: skip
    assert got.data_ptr() == out.data_ptr() and torch.equal(out, fresh)
    assert (buf[:, 0] == 9.0).all() and (buf[:, -1] == 9.0).all()
    _close(out, ref.paged_decode_attention_ref(q, k_cache, v_cache, tables, ctx, **kw), 5e-3)
    with pytest.raises(ValueError, match="^workspace:"):
        attn.paged_decode_attention(q, k_cache, v_cache, tables, ctx, workspace=ws[:10], **kw)
    with pytest.raises(ValueError, match="^out:"):
        attn.paged_decode_attention(q, k_cache, v_cache, tables, ctx, out=out.float(), **kw)


def test_prefill_into_given_out_matches_allocating_path():
    lq, lk, d = [9, 20], [9, 33], 64
    q = _randn(sum(lq), 4, d, dtype=torch.bfloat16)
    k, v = _randn(sum(lk), 2, d, dtype=torch.bfloat16), _randn(sum(lk), 2, d, dtype=torch.bfloat16)
    kw = dict(scale=d**-0.5, sliding_window=6, softcap=2.0)
    fresh = attn.prefill_attention(q, k, v, _cu(lq), _cu(lk), **kw)
    out = torch.full_like(q, 9.0)
    got = attn.prefill_attention(q, k, v, _cu(lq), _cu(lk), out=out, **kw)
    assert got.data_ptr() == out.data_ptr() and torch.equal(out, fresh)
    _close(out, ref.prefill_attention_ref(q, k, v, _cu(lq), _cu(lk), **kw), TOL[torch.bfloat16])
    with pytest.raises(ValueError, match="^out:"):
        attn.prefill_attention(q, k, v, _cu(lq), _cu(lk), out=out[:-1], **kw)


def test_scale_args_do_not_allocate():
    q = torch.zeros(2, 3, device=DEVICE)
    scale = torch.tensor([0.5], device=DEVICE)
    assert attn._scale_arg("k_scale", scale, q, True) is scale  # fp32 device tensor: as is
    assert attn._scale_arg("k_scale", None, q, False) is q  # never read without fp8
    assert attn._scale_arg("k_scale", 0.5, q, False) is q
    one = attn._scale_arg("k_scale", None, q, True)  # fp8 without a scale: 1 (allocates)
    assert one.dtype == torch.float32 and one.item() == 1.0
    with pytest.raises(ValueError, match="^k_scale:"):
        attn._scale_arg("k_scale", torch.ones(2), q, False)


def test_write_kv_cache_fp8_bit_identical_with_device_scales():
    # Scales that are not powers of two: x / scale must round like torch's IEEE division.
    hkv, d, n = 2, 64, 24
    k, v = _randn(n, hkv, d, mul=20.0), _randn(n, hkv, d, dtype=torch.bfloat16, mul=0.3)
    slots = torch.randperm(4 * 16, device=DEVICE)[:n]
    caches = [torch.zeros(4, 16, hkv, d, device=DEVICE).to(FP8) for _ in range(4)]
    scales = dict(k_scale=torch.tensor([0.0137], device=DEVICE),
                  v_scale=torch.tensor([0.00291], device=DEVICE))  # fmt: skip
    attn.write_kv_cache(k, v, caches[0], caches[1], slots, **scales)
    ref.write_kv_cache_ref(k, v, caches[2], caches[3], slots, **scales)
    assert torch.equal(caches[0].view(torch.uint8), caches[2].view(torch.uint8))
    assert torch.equal(caches[1].view(torch.uint8), caches[3].view(torch.uint8))


def test_decode_block_ids_past_int32_offsets_interpreted():
    # Offsets block_id * stride exceed 2**31 elements (and bytes) in a cache that is only
    # reserved (torch.empty): the blocks read are the ones written. Catches int32 overflow.
    if DEVICE != "cpu":
        pytest.skip("the CUDA twin below covers GPUs")
    d, bs, hkv = 256, 16, 1
    num_blocks = (2**31) // (bs * hkv * d) + 64
    k_cache = torch.empty(num_blocks, bs, hkv, d, dtype=FP8)
    v_cache = torch.empty_like(k_cache)
    tables = torch.tensor([[num_blocks - 1, num_blocks - 3]], dtype=torch.int32)
    pos = torch.arange(20)
    slots = tables[0, pos // bs].long() * bs + pos % bs
    kv = dict(k_scale=torch.tensor([0.02]), v_scale=torch.tensor([0.01]))
    k, v = _randn(20, hkv, d), _randn(20, hkv, d)
    attn.write_kv_cache(k, v, k_cache, v_cache, slots, **kv)
    q, ctx = _randn(1, 8, d, dtype=torch.bfloat16), torch.tensor([20], dtype=torch.int32)
    for splits in (1, 3):
        out = attn.paged_decode_attention(q, k_cache, v_cache, tables, ctx, scale=d**-0.5,
                                          num_splits=splits, **kv)  # fmt: skip
        expected = ref.paged_decode_attention_ref(q, k_cache, v_cache, tables, ctx,
                                                  scale=d**-0.5, **kv)  # fmt: skip
        _close(out, expected, TOL[torch.bfloat16])
        _close(out.double(), _naive(q.float(), k, v, scale=d**-0.5), 0.1)



@pytest.mark.parametrize("cc", [(8, 0), (8, 9), (9, 0)])
def test_compile_specs_name_every_argument_and_follow_the_configs(cc):
    specs = attn.compile_specs(cc)
    assert len({s.name for s in specs}) == len(specs)
    for s in specs:
        assert set(s.args) | set(s.constexprs) == set(s.fn.arg_names), s.name
        assert ("fp8" in s.name) == any("fp8" in t for t in s.args.values()), s.name
        assert cc >= (8, 9) or "fp8" not in s.name
    by_name = {s.name: s for s in specs}
    for hd in (128, 256):
        p = by_name[f"prefill[bf16,hd{hd},window,softcap]"]
        bm, bn, warps, stages = attn.prefill_config(hd, torch.bfloat16, cc)
        assert (p.constexprs["BLOCK_M"], p.constexprs["BLOCK_N"]) == (bm, bn)
        assert (p.num_warps, p.num_stages) == (warps, stages) and stages >= 2
        d = by_name[f"decode_split[bf16,hd{hd}]"]
        assert (d.constexprs["BLOCK_N"], d.num_warps, d.num_stages) == attn.decode_config(
            hd, torch.bfloat16, cc)
        assert d.constexprs["ONE_SPLIT"] is False and d.constexprs["ROW_ALIGN"] == 16

# --------------------------------------------------------------------------- larger / GPU-only


@pytest.mark.slow
def test_long_context_window_many_splits():
    d, lens = 256, [300, 129]
    ks = [_randn(n, 2, d, dtype=torch.bfloat16) for n in lens]
    vs = [_randn(n, 2, d, dtype=torch.bfloat16) for n in lens]
    k_cache, v_cache, tables, ctx = _paged(ks, vs, 16, torch.bfloat16)
    q = _randn(2, 4, d, dtype=torch.bfloat16, mul=3.0)
    kw = dict(scale=d**-0.5, sliding_window=128, softcap=50.0)
    out = attn.paged_decode_attention(q, k_cache, v_cache, tables, ctx, num_splits=5, **kw)
    _close(out, ref.paged_decode_attention_ref(q, k_cache, v_cache, tables, ctx, **kw), 2e-2)
    qp = _randn(sum(lens), 4, d, dtype=torch.bfloat16)
    kp, vp = torch.cat(ks), torch.cat(vs)
    out = attn.prefill_attention(qp, kp, vp, _cu(lens), _cu(lens), **kw)
    _close(out, ref.prefill_attention_ref(qp, kp, vp, _cu(lens), _cu(lens), **kw), 2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (2+ GiB cache)")
def test_decode_block_ids_past_int32_offsets():
    # Offsets block_id * stride exceed 2**31 elements: catches int32 index overflow.
    d, bs, hkv = 256, 16, 1
    num_blocks = (2**31) // (bs * hkv * d) + 64
    k_cache = torch.zeros(num_blocks, bs, hkv, d, dtype=FP8, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    tables = torch.tensor([[num_blocks - 1, num_blocks - 3]], dtype=torch.int32, device="cuda")
    k, v = _randn(20, hkv, d), _randn(20, hkv, d)
    slots = (tables[0, torch.arange(20, device="cuda") // bs].long() * bs
             + torch.arange(20, device="cuda") % bs)  # fmt: skip
    attn.write_kv_cache(k, v, k_cache, v_cache, slots, k_scale=0.02, v_scale=0.01)
    q, ctx = _randn(1, 8, d, dtype=torch.bfloat16), torch.tensor([20], dtype=torch.int32).cuda()
    kw = dict(scale=d**-0.5, k_scale=0.02, v_scale=0.01)
    out = attn.paged_decode_attention(q, k_cache, v_cache, tables, ctx, **kw)
    _close(out, ref.paged_decode_attention_ref(q, k_cache, v_cache, tables, ctx, **kw), 2e-2)
    assert out.abs().sum() > 0
