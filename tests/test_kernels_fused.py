"""Fused decode-step kernels (kernels/norm.py, activation.py, rope_kv.py) against their references
(kernels/reference.py), and the references against the model math they replace.

Without CUDA the Triton kernels run under the Triton interpreter on CPU tensors; with CUDA natively.

Tolerances are in units of the activation dtype's ulp (``_assert_ulps``). Exact (``torch.equal``)
where the kernels claim it: the residual add, GeGLU's product, non-fp8 cache entries (the returned
keys), and fp8 cache entries (the reference's quantization of the returned keys / of v). Within
one ulp for 16-bit dtypes: normed outputs (rsqrt, order of the sum of squares) and GeGLU (fp32
tanh); a few fp32 ulps for fp32. The rope rounds once where the reference rounds three times, so
its bound scales with the inputs' magnitude, not the output's (cancellation).
"""

import os
import sys

import torch

# Interpreter only for this module (see tests/test_kernels_attention.py): set while the kernels
# are decorated and while they launch, unset for other tests that use ops.py.
_INTERPRET = not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
_MODULES = ("norm", "activation", "rope_kv", "attention_jit")
if _INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in _MODULES:
        sys.modules.pop(f"trt_gemma.kernels.{_name}", None)  # re-decorate if imported natively

import importlib  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

norm = importlib.import_module("trt_gemma.kernels.norm")
act = importlib.import_module("trt_gemma.kernels.activation")
rope_kv = importlib.import_module("trt_gemma.kernels.rope_kv")
from trt_gemma.kernels import reference as ref  # noqa: E402
from trt_gemma.kernels.compile_spec import KernelSpec  # noqa: E402

if _INTERPRET:
    del os.environ["TRITON_INTERPRET"]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = torch.float8_e4m3fn
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MANTISSA = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
EPS = 1e-6
NAN = float("nan")


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    if _INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)


def _randn(*shape, dtype=torch.float32, mul=1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=DEVICE) * mul).to(dtype)


def _scale(d: int) -> torch.Tensor:  # a Gemma norm factor 1 + w, fp32
    return 1.0 + _randn(d, mul=0.3)


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` at |x| (fp32 tensor); subnormal-range values get the smallest."""
    tiny = torch.finfo(dtype).tiny
    e = torch.floor(torch.log2(x.float().abs().clamp_min(tiny)))
    return torch.exp2(e - _MANTISSA[dtype])


def _assert_ulps(out, expected, ulps: float, *, atol: float = 0.0, bound=None) -> None:
    """|out - expected| <= ulps * ulp(expected) + atol, elementwise (or <= `bound` when given)."""
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert torch.isfinite(out.float()).all()
    diff = (out.float() - expected.float()).abs()
    if bound is None:
        bound = ulps * _ulp(expected, expected.dtype) + atol
    if not diff.numel():
        return
    worst = (diff - bound).argmax()
    assert (diff <= bound).all(), (
        f"{int((diff > bound).sum())} elements out of bound; worst {out.flatten()[worst]} vs "
        f"{expected.flatten()[worst]}"
    )


def _view(buf_cols: int, t: int, d: int, dtype, mul=1.0, offset=0) -> torch.Tensor:
    """A strided [t, d] row view into a wider buffer (as a slice of a fused GEMM output)."""
    return _randn(t, buf_cols, dtype=dtype, mul=mul)[:, offset : offset + d]


# --------------------------------------------------------------------------- references vs model
# The model's math before the fused kernels (trt_gemma/ops.py at the commit that introduced them),
# copied verbatim: the references must keep its bits, and its speed (same ops).


def _model_rms_norm(x, scale, eps):
    dim = (x.shape[-1],)
    if scale.shape == dim:
        return F.rms_norm(x.float(), dim, scale, eps).to(x.dtype)
    return (F.rms_norm(x.float(), dim, None, eps) * scale).to(x.dtype)


def _model_rope_cos_sin(positions, head_dim, base, scaling, dtype):
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float()
    inv_freq = 1.0 / (base ** (exponent / head_dim)) / scaling
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    sin = emb.sin()
    sin[:, : head_dim // 2].neg_()
    return emb.cos().to(dtype)[:, None, :], sin.to(dtype)[:, None, :]


def _model_apply_rope(x, cos, signed_sin):
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def _hf_rope(x, positions, head_dim, base, scaling):
    """transformers' rope, written out independently: unsigned sin and rotate_half by cat."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = positions.float()[:, None] * (inv / scaling)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(x.dtype)[:, None], emb.sin().to(x.dtype)[:, None]
    half = head_dim // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_references_reproduce_model_math(dtype):
    t, d, hq, hkv, hd = 5, 48, 3, 1, 32
    x, h = _randn(t, d, dtype=dtype, mul=4), _randn(t, d, dtype=dtype, mul=4)
    s, pre = _scale(d), _scale(d)
    assert torch.equal(ref.rms_norm_ref(x, s, EPS), _model_rms_norm(x, s, EPS))
    # gemma_pytorch's formula op by op: fp32, x * rsqrt(mean(x^2) + eps), times (1 + w).
    xf = x.float()
    naive = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS) * s).to(dtype)
    _assert_ulps(ref.rms_norm_ref(x, s, EPS), naive, 1 if dtype != torch.float32 else 4)
    new_res, normed = ref.add_rms_norm_ref(h, x, s, EPS, pre_scale=pre)
    expected_res = x + _model_rms_norm(h, pre, EPS)
    assert torch.equal(new_res, expected_res)
    assert torch.equal(normed, _model_rms_norm(expected_res, s, EPS))
    assert ref.add_rms_norm_ref(h, x, None, EPS)[1] is None
    gate, up = _randn(t, 40, dtype=dtype, mul=3), _randn(t, 40, dtype=dtype)
    assert torch.equal(ref.gelu_tanh_and_mul_ref(gate, up), F.gelu(gate, approximate="tanh") * up)

    positions = torch.tensor([0, 1, 77, 4095, 100_000], device=DEVICE)
    for base, scaling in ((10_000.0, 1.0), (1_000_000.0, 8.0)):
        inv = ref.rope_inv_freq(hd, base, scaling, DEVICE)
        cos, sin = ref.rope_cos_sin_ref(positions, inv, dtype)
        model_cos, model_sin = _model_rope_cos_sin(positions, hd, base, scaling, dtype)
        assert torch.equal(cos, model_cos) and torch.equal(sin, model_sin)
        qk = _randn(t, hq + hkv, hd, dtype=dtype, mul=2)
        qk_scale = torch.cat([_scale(hd).expand(hq, -1), _scale(hd).expand(hkv, -1)])
        for n in (None, qk_scale):
            got = ref.qk_norm_rope_kv_write_ref(qk, None, positions, inv, n, EPS, hq)
            normed_qk = qk if n is None else _model_rms_norm(qk, n, EPS)
            assert torch.equal(got, _model_apply_rope(normed_qk, model_cos, model_sin))
            assert torch.equal(got, _hf_rope(normed_qk, positions, hd, base, scaling))
        shared = ref.qk_norm_rope_kv_write_ref(qk, None, positions, inv, None, EPS, hq,
                                               cos_sin=(cos, sin))  # fmt: skip
        assert torch.equal(shared, _model_apply_rope(qk, model_cos, model_sin))


def test_references_are_differentiable_and_fill_out_buffers():
    x = _randn(3, 16).requires_grad_()
    h = _randn(3, 16).requires_grad_()
    s = _scale(16)
    res, normed = ref.add_rms_norm_ref(h, x, s, EPS, pre_scale=s)
    qk = _randn(3, 3, 8).requires_grad_()
    roped = ref.qk_norm_rope_kv_write_ref(qk, None, torch.arange(3), ref.rope_inv_freq(8, 1e4, 1),
                                          _scale(8).expand(3, -1), EPS, 2)  # fmt: skip
    loss = normed.sum() + res.sum() + ref.gelu_tanh_and_mul_ref(x, h).sum() + roped.sum()
    loss.backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (x, h, qk))
    with torch.no_grad():
        out, res_out = torch.empty(3, 16), x.detach().clone()
        r, n = ref.add_rms_norm_ref(h, res_out, s, EPS, out=out, residual_out=res_out)
        assert r is res_out and n is out and torch.equal(r, (x + h).detach())


# --------------------------------------------------------------------------- RMSNorm kernels


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t, d", [(4, 1000), (1, 64), (2, 5376), (0, 640)])
def test_rms_norm_matches_reference(dtype, t, d):
    x = _view(d + 24, t, d, dtype, mul=5.0, offset=8)  # strided rows
    s = _scale(d)
    expected = ref.rms_norm_ref(x, s, EPS)
    _assert_ulps(norm.rms_norm(x, s, EPS), expected, 1 if dtype != torch.float32 else 4)
    out = torch.full((t, d + 3), float("nan"), dtype=dtype, device=DEVICE)[:, 3:]
    assert norm.rms_norm(x, s, EPS, out=out) is out
    _assert_ulps(out, expected, 1 if dtype != torch.float32 else 4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pre, post", [(False, True), (True, True), (True, False), (False, False)])
def test_add_rms_norm_matches_reference(dtype, pre, post):
    t, d = 5, 1152
    gemm_out = _view(d + 16, t, d, dtype, mul=30.0)  # strided h, large: the residual add rounds
    residual = _randn(t, d, dtype=dtype, mul=8.0)
    s = _scale(d) if post else None
    kw = dict(pre_scale=_scale(d) if pre else None)
    expected_res, expected = ref.add_rms_norm_ref(gemm_out, residual, s, EPS, **kw)
    in_place = residual.clone()
    new_res, normed = norm.add_rms_norm(gemm_out, in_place, s, EPS, residual_out=in_place, **kw)
    assert new_res is in_place
    ulps = 1 if dtype != torch.float32 else 4
    if pre:  # h is post-normed first: within an ulp, so the sum is too (of the sum's magnitude)
        bound = _ulp(expected_res, dtype) + _ulp(ref.rms_norm_ref(gemm_out, kw["pre_scale"],
                                                                  EPS), dtype) * ulps
        _assert_ulps(new_res, expected_res, 0, bound=bound)
    else:  # one fp32 add, rounded once: torch's `residual + h` bit for bit
        assert torch.equal(new_res, expected_res)
    if post:
        # Normed from the kernel's own residual: within an ulp of the reference norm of it.
        _assert_ulps(normed, ref.rms_norm_ref(new_res, s, EPS), ulps)
    else:
        assert normed is None
    fresh_res, fresh = norm.add_rms_norm(gemm_out, residual, s, EPS, **kw)  # new buffers
    assert torch.equal(fresh_res, new_res) and fresh_res.data_ptr() != residual.data_ptr()
    assert (fresh is None) == (not post)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_residual_add_rounds_ties_to_even(dtype):
    """Sums exactly between two representable values (and one that carries into the exponent)
    round to even, as torch's add does: a truncating cast would fail here."""
    u = 2.0 ** -(_MANTISSA[dtype] + 1)  # half an ulp of 1
    residual = torch.tensor([[1.0, 1.0, 2.0 - 2 * u, -1.0, 1.0, 3.0]], device=DEVICE).to(dtype)
    h = torch.tensor([[u, 3 * u, u, -3 * u, 1.5 * u, NAN]], device=DEVICE).to(dtype)
    new_res, _ = norm.add_rms_norm(h, residual, None, EPS)
    expected = residual + h
    assert torch.equal(new_res[:, :-1], expected[:, :-1]) and new_res[0, -1].isnan()
    assert expected[0, 1] == 1 + 4 * u and expected[0, 2] == 2  # the ties were ties


def test_add_rms_norm_empty_and_out_buffer():
    h = torch.zeros(0, 64, dtype=torch.bfloat16, device=DEVICE)
    res, normed = norm.add_rms_norm(h, h.clone(), _scale(64), EPS)
    assert res.shape == (0, 64) and normed.shape == (0, 64)
    h, r = _randn(2, 64, dtype=torch.bfloat16), _randn(2, 64, dtype=torch.bfloat16)
    out = torch.empty(2, 64, dtype=torch.bfloat16, device=DEVICE)
    assert norm.add_rms_norm(h, r, _scale(64), EPS, out=out)[1] is out


# --------------------------------------------------------------------------- GeGLU kernel


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t, inner", [(3, 1500), (1, 2048), (0, 64)])
def test_gelu_tanh_and_mul_matches_reference(dtype, t, inner):
    gate_up = _randn(t, 2 * inner, dtype=dtype, mul=3.0)
    gate, up = gate_up[:, :inner], gate_up[:, inner:]  # the fused GEMM output's two halves
    expected = ref.gelu_tanh_and_mul_ref(gate, up)
    # Within an ulp; absolutely ~1e-7 where torch's 1 + tanh cancels (gate < ~-5).
    _assert_ulps(act.gelu_tanh_and_mul(gate, up), expected, 1 if dtype != torch.float32 else 8,
                 atol=2e-6 * up.float().abs())  # fmt: skip
    out = torch.empty(t, inner, dtype=dtype, device=DEVICE)
    assert act.gelu_tanh_and_mul(gate, up, out=out) is out


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_tanh_and_mul_range_and_exact_product(dtype):
    big = 60.0 if dtype == torch.float16 else 1e4
    gate = torch.cat([torch.linspace(-12, 12, 4001), torch.tensor([-big, big, 0.0])]).to(dtype)
    gate = gate.to(DEVICE)[None]
    up = _randn(1, gate.shape[1], dtype=dtype)
    got = act.gelu_tanh_and_mul(gate, up)
    expected = ref.gelu_tanh_and_mul_ref(gate, up)
    _assert_ulps(got, expected, 1 if dtype != torch.float32 else 8, atol=2e-6 * up.abs().float())
    assert got[0, -3] == 0 and got[0, -2] == expected[0, -2] and got[0, -1] == 0
    # With up = 1 the output is the rounded gelu itself; the product of two rounded values is exact
    # in fp32, so any other up gives exactly round(that * up).
    g = act.gelu_tanh_and_mul(gate, torch.ones_like(gate))
    assert torch.equal(got, (g.float() * up.float()).to(dtype))


# --------------------------------------------------------------------------- q/k norm + rope + KV


def _rope_inputs(t, hq, hkv, hd, dtype, positions):
    qkv = _randn(t, (hq + 2 * hkv) * hd, dtype=dtype, mul=3.0)  # fused GEMM output
    qk = qkv[:, : (hq + hkv) * hd].view(t, hq + hkv, hd)
    v = qkv[:, (hq + hkv) * hd :].view(t, hkv, hd)
    return qk, v, torch.tensor(positions, device=DEVICE)


def _rope_bound(qk, norm_, dtype):
    """|kernel - reference| bound for the rope: the reference rounds x*cos and x'*sin and their
    sum, the kernel only the sum; inputs (after the norm) may differ by an ulp too."""
    x = qk if norm_ is None else ref.rms_norm_ref(qk, norm_, EPS)
    mag = x.float().abs() + x.float().roll(qk.shape[-1] // 2, dims=-1).abs()
    return (8 if dtype == torch.float32 else 3) * mag * 2.0 ** -_MANTISSA[dtype] + 1e-30


ROPE_CASES = [
    # (hq, hkv, hd), dtype, norm, cache dtype (None: no cache), slot dtype, positions dtype
    ((3, 1, 64), torch.float32, False, "same", torch.int64, torch.int64),
    ((4, 2, 48), torch.bfloat16, True, "same", torch.int32, torch.int32),  # hd not a power of 2
    ((4, 1, 256), torch.bfloat16, True, FP8, torch.int64, torch.int64),  # gemma-3-270m, fp8 KV
    ((32, 16, 128), torch.bfloat16, True, None, None, torch.int64),  # gemma-3-27b: 3 programs
    ((8, 4, 128), torch.float16, False, FP8, torch.int32, torch.int64),
    ((2, 2, 32), torch.float16, True, "same", torch.int64, torch.int64),
    ((2, 1, 32), torch.float32, True, FP8, torch.int64, torch.int32),
]


@pytest.mark.parametrize("heads, dtype, use_norm, cache, slot_dtype, pos_dtype", ROPE_CASES)
def test_qk_norm_rope_kv_write_matches_reference(heads, dtype, use_norm, cache, slot_dtype,
                                                 pos_dtype):  # fmt: skip
    hq, hkv, hd = heads
    t, nb, bs = 5, 4, 3
    qk, v, positions = _rope_inputs(t, hq, hkv, hd, dtype, [0, 7, 99_991, 4096, 131_071])
    positions = positions.to(pos_dtype)
    inv = ref.rope_inv_freq(hd, 10_000.0, 1.0, DEVICE)
    norm_ = torch.cat([_scale(hd).expand(hq, -1), _scale(hd).expand(hkv, -1)]) if use_norm else None
    kw, caches = {}, [None] * 4
    if cache is not None:
        cache_dtype = dtype if cache == "same" else cache
        caches = [torch.zeros(nb, bs, hkv, hd, device=DEVICE).to(cache_dtype) for _ in range(4)]
        slots = torch.tensor([0, -1, 11, 4, 7], dtype=slot_dtype, device=DEVICE)
        if cache == FP8:
            kw = dict(k_scale=torch.tensor([0.02], device=DEVICE),
                      v_scale=torch.tensor([0.01], device=DEVICE))  # fmt: skip
    else:
        slots = None
    expected = ref.qk_norm_rope_kv_write_ref(qk, v, positions, inv, norm_, EPS, hq, caches[2],
                                             caches[3], slots, **kw)  # fmt: skip
    work = qk.clone()
    got = rope_kv.qk_norm_rope_kv_write(work, v, positions, inv, norm_, EPS, hq, caches[0],
                                        caches[1], slots, **kw)  # fmt: skip
    assert got is work  # in place by default
    _assert_ulps(got, expected, 0, bound=_rope_bound(qk, norm_, dtype))
    if cache is None:
        return
    # The cache holds the returned keys (quantized as the reference would) and v, bit for bit.
    k_expected, v_expected = torch.zeros_like(caches[0]), torch.zeros_like(caches[1])
    ref.write_kv_cache_ref(got[:, hq:], v, k_expected, v_expected, slots, **kw)
    assert torch.equal(caches[0].view(torch.uint8), k_expected.view(torch.uint8))
    assert torch.equal(caches[1].view(torch.uint8), v_expected.view(torch.uint8))
    assert torch.equal(caches[1].view(torch.uint8), caches[3].view(torch.uint8))
    written = torch.zeros(nb * bs, dtype=torch.bool)
    written[[0, 11, 4, 7]] = True  # slot -1 skipped: everything else still zero
    assert caches[0].reshape(nb * bs, -1)[~written].float().abs().sum() == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_tables_accurate_at_long_positions(dtype):
    """A head of ones in its first half ropes to (cos, sin) of each frequency: compare them with
    fp64 cos/sin of the same fp32 angles, in a window of positions up to 100k."""
    hd, t = 64, 8
    positions = torch.arange(100_000 - t + 1, 100_001, device=DEVICE)
    qk = torch.zeros(t, 2, hd, dtype=dtype, device=DEVICE)
    qk[:, :, : hd // 2] = 1
    inv = ref.rope_inv_freq(hd, 10_000.0, 1.0, DEVICE)
    out = rope_kv.qk_norm_rope_kv_write(qk, qk[:, 1:], positions, inv, None, EPS, 1,
                                        out=torch.empty_like(qk))  # fmt: skip
    assert qk[:, :, hd // 2 :].abs().sum() == 0  # out= given: qk untouched
    angle = (positions.float()[:, None] * inv[None, :]).double()  # the fp32 angles, exactly
    cos, sin = angle.cos(), angle.sin()
    for h in range(2):
        _assert_ulps(out[:, h, : hd // 2], cos.to(dtype), 1, atol=1e-6)
        _assert_ulps(out[:, h, hd // 2 :], sin.to(dtype), 1, atol=1e-6)
    expected = ref.qk_norm_rope_kv_write_ref(qk, None, positions, inv, None, EPS, 1)
    # One nonzero product per element, so no double rounding: only sin/cos's own last bit differs.
    _assert_ulps(out, expected, 1, atol=1e-7)


def test_qk_norm_rope_accepts_expanded_norm_and_empty_batch():
    hq, hkv, hd = 2, 1, 32
    qk, v, positions = _rope_inputs(3, hq, hkv, hd, torch.bfloat16, [5, 6, 7])
    inv = ref.rope_inv_freq(hd, 10_000.0, 1.0, DEVICE)
    shared = _scale(hd).expand(hq + hkv, -1)  # head stride 0
    expected = ref.qk_norm_rope_kv_write_ref(qk, v, positions, inv, shared, EPS, hq)
    got = rope_kv.qk_norm_rope_kv_write(qk.clone(), v, positions, inv, shared, EPS, hq)
    _assert_ulps(got, expected, 0, bound=_rope_bound(qk, shared, torch.bfloat16))
    empty = qk[:0]
    assert rope_kv.qk_norm_rope_kv_write(empty, v[:0], positions[:0], inv, None, EPS, hq) is empty


# --------------------------------------------------------------------------- argument errors


def _rope_call(**override):
    hq, hkv, hd = 2, 1, 16
    args = dict(qk=torch.zeros(2, hq + hkv, hd), v=torch.zeros(2, hkv, hd),
                positions=torch.arange(2), inv_freq=torch.ones(hd // 2), norm=None, eps=EPS,
                num_q_heads=hq, k_cache=torch.zeros(2, 4, hkv, hd, dtype=FP8),
                v_cache=torch.zeros(2, 4, hkv, hd, dtype=FP8), slot_mapping=torch.arange(2),
                k_scale=torch.ones(1), v_scale=torch.ones(1))  # fmt: skip
    args.update(override)
    return lambda: rope_kv.qk_norm_rope_kv_write(**args)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: norm.rms_norm(torch.zeros(2, 8), torch.ones(7), EPS), "scale"),
        (lambda: norm.rms_norm(torch.zeros(2, 8), torch.ones(8, dtype=torch.bfloat16), EPS),
         "scale"),
        (lambda: norm.rms_norm(torch.zeros(2, 8).t(), torch.ones(2), EPS), "x"),
        (lambda: norm.rms_norm(torch.zeros(2, 8, dtype=torch.int32), torch.ones(8), EPS), "x"),
        (lambda: norm.rms_norm(torch.zeros(2, 8), torch.ones(8), EPS,
                               out=torch.zeros(2, 8, dtype=torch.float16)), "out"),
        (lambda: norm.rms_norm(torch.zeros(2, 8), torch.ones(8), -1.0), "eps"),
        (lambda: norm.add_rms_norm(torch.zeros(2, 8), torch.zeros(3, 8), None, EPS), "residual"),
        (lambda: norm.add_rms_norm(torch.zeros(2, 8), torch.zeros(2, 8), None, EPS,
                                   pre_scale=torch.ones(4)), "pre_scale"),
        (lambda: norm.add_rms_norm(torch.zeros(2, 8), torch.zeros(2, 8), None, EPS,
                                   out=torch.zeros(2, 8)), "out"),
        (lambda: (lambda r: norm.add_rms_norm(torch.zeros(2, 8), r, torch.ones(8), EPS, out=r))(
            torch.zeros(2, 8)), "out"),  # out aliases residual
        (lambda: norm.add_rms_norm(torch.zeros(2, 8), torch.zeros(2, 8), None, EPS,
                                   residual_out=torch.zeros(2, 9)), "residual_out"),
        (lambda: act.gelu_tanh_and_mul(torch.zeros(2, 8), torch.zeros(2, 7)), "up"),
        (lambda: act.gelu_tanh_and_mul(torch.zeros(2, 8), torch.zeros(2, 8, dtype=torch.float16)),
         "up"),
        (lambda: act.gelu_tanh_and_mul([1.0], torch.zeros(2, 8)), "gate"),
        (lambda: act.gelu_tanh_and_mul(torch.zeros(2, 8), torch.zeros(2, 8),
                                       out=torch.zeros(8, 2).t()), "out"),
        (_rope_call(qk=torch.zeros(2, 3, 15), v=torch.zeros(2, 1, 15)), "qk"),
        (_rope_call(num_q_heads=3), "num_q_heads"),
        (_rope_call(num_q_heads=0), "num_q_heads"),
        (_rope_call(v=torch.zeros(2, 2, 16)), "v"),
        (_rope_call(positions=torch.arange(2).float()), "positions"),
        (_rope_call(inv_freq=torch.ones(16)), "inv_freq"),
        (_rope_call(norm=torch.ones(2, 16)), "norm"),
        (_rope_call(k_cache=torch.zeros(2, 4, 2, 16)), "k_cache"),
        (_rope_call(v_cache=torch.zeros(2, 4, 1, 16)), "v_cache"),
        (_rope_call(slot_mapping=torch.arange(3)), "slot_mapping"),
        (_rope_call(k_scale=None), "k_scale"),
        (_rope_call(v_scale=0.5), "v_scale"),
        (_rope_call(k_cache=None, v_cache=None), "k_cache"),
        (_rope_call(out=torch.zeros(2, 3, 16, dtype=torch.float16)), "out"),
    ],
)
def test_bad_arguments_name_the_argument(call, name):
    with pytest.raises(ValueError, match=f"^{name}[: ]"):
        call()


# --------------------------------------------------------------------------- compile specs


@pytest.mark.parametrize("module", [norm, act, rope_kv])
def test_compile_specs_name_every_kernel_argument(module):
    for cc in ((8, 0), (9, 0)):
        specs = module.compile_specs(cc)
        assert specs and len({s.name for s in specs}) == len(specs)
        for spec in specs:
            assert isinstance(spec, KernelSpec)
            assert [*spec.args, *spec.constexprs] == spec.fn.arg_names, spec.name
            assert all(ty != "*fp8e4nv" for ty in spec.args.values()) or cc >= (8, 9)


def test_compile_specs_cover_launcher_choices():
    blocks = {s.constexprs["BLOCK"] for s in norm.compile_specs((9, 0))}
    assert blocks == {norm.row_config(d)[0] for d in norm.HIDDEN_SIZES} == {1024, 2048, 4096, 8192}
    tiles = {(s.constexprs["HEAD_DIM"], s.constexprs["HEAD_BLOCK"])
             for s in rope_kv.compile_specs((9, 0))}  # fmt: skip
    assert tiles == {(256, 8), (128, 16)}
    assert rope_kv.rope_config(48, 128) == (128, 16, 4)
    # fp8 caches where the GPU converts to e4m3 (Ada, Hopper), not on Ampere
    assert any(s.constexprs["IS_FP8"] for s in rope_kv.compile_specs((8, 9)))
    assert not any(s.constexprs["IS_FP8"] for s in rope_kv.compile_specs((8, 0)))
