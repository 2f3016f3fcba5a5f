"""Weight quantization (trt_gemma/quant) and the quantized GEMMs (kernels/gemm_*.py).

Round trips and error bounds per mode, exact INT4 packing, FP8 scale math, AWQ against RTN on
activations with outlier channels, and the Triton W4A16 kernel against its reference. Without CUDA
the kernel runs under the Triton interpreter on CPU tensors (small shapes: it is slow).

Tolerances, kernel vs reference on the same quantized weight: fp32 1e-4 relative; fp16/bf16 a few
units of the dtype's epsilon times the output's scale (both round the fp32 sum once, and the
interpreter truncates rather than rounds on casts to bf16).
"""

import pytest
import torch

from trt_gemma.kernels import gemm_w4a16
from trt_gemma.kernels.gemm_fp8 import Fp8Weight, fp8_linear, uses_scaled_mm
from trt_gemma.kernels.gemm_w4a16 import Int4Weight, pack_int4, unpack_int4, w4a16_linear
from trt_gemma.kernels.reference_gemm import fp8_linear_ref, w4a16_linear_ref
from trt_gemma.quant import (
    awq_output_error,
    awq_search_scales,
    fake_quantize_int4,
    fold_into_gemma_norm,
    fp8_activation_scale,
    kv_cache_scale,
    quantize_fp8,
    quantize_int4_awq,
    quantize_int4_rtn,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    # Interpreter only inside this module's tests (ops.py reads the variable to route every CPU op
    # through Triton). The kernel is built at its first launch, so rebuild it in this mode.
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        gemm_w4a16._kernel.cache_clear()
        gemm_w4a16._dequant_kernel.cache_clear()
    yield
    if not CUDA:
        gemm_w4a16._kernel.cache_clear()
        gemm_w4a16._dequant_kernel.cache_clear()


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _activations(n: int, k: int, outliers: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """LLM-like inputs: unit Gaussian channels, a few of them 50x larger."""
    x = torch.randn(n, k, generator=g)
    x[:, outliers] *= 50.0
    return x


# INT4 packing and RTN ------------------------------------------------------------------------


def test_pack_unpack_is_exact_and_documented_nibble_order():
    codes = torch.randint(0, 16, (5, 74), dtype=torch.uint8, generator=_gen())
    packed = pack_int4(codes)
    assert packed.shape == (5, 37) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    every_byte = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(pack_int4(unpack_int4(every_byte)), every_byte)
    # Channel 2j in the low nibble, 2j + 1 in the high nibble.
    assert pack_int4(torch.tensor([[1, 2]], dtype=torch.uint8)).item() == 0x21
    with pytest.raises(ValueError, match="0..15"):
        pack_int4(torch.tensor([[16, 0]], dtype=torch.uint8))
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.uint8))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(
    ("in_features", "group_size", "scale_dtype"),
    [(256, 128, torch.float32), (384, 128, torch.bfloat16), (160, 64, torch.float16)],
)
def test_rtn_error_is_within_half_a_step(symmetric, in_features, group_size, scale_dtype):
    w = torch.randn(24, in_features, generator=_gen(1)) * 0.05
    w[3, 7] = 0.9  # an outlier widens its own group's step only
    q = quantize_int4_rtn(w, group_size, symmetric=symmetric, scale_dtype=scale_dtype)
    assert q.n_groups == -(-in_features // group_size) and q.scales.dtype == scale_dtype
    assert q.symmetric == symmetric and q.in_features == in_features and q.out_features == 24
    deq = q.dequantize(torch.float32)
    step = q.scales.float().repeat_interleave(group_size, dim=1)[:, :in_features]
    assert ((deq - w).abs() <= step / 2 * (1 + 1e-5) + 1e-12).all()
    assert torch.equal(deq, fake_quantize_int4(w, group_size, symmetric=symmetric,
                                               scale_dtype=scale_dtype))
    # Typical error ~ step / sqrt(12), step ~ 3 sigma / 7: about 0.12 of the weights' norm.
    assert (deq - w).norm() / w.norm() < 0.2


def test_rtn_zero_rows_and_dtype_defaults():
    w = torch.zeros(4, 64, dtype=torch.bfloat16)
    q = quantize_int4_rtn(w, 32)
    assert q.scales.dtype == torch.bfloat16  # 16-bit weights keep 16-bit scales by default
    assert torch.equal(q.dequantize(torch.bfloat16), w)
    assert torch.isfinite(q.scales.float()).all() and (q.scales.float() > 0).all()


def test_int4_weight_rejects_inconsistent_tensors():
    q = quantize_int4_rtn(torch.randn(8, 64), 32)
    with pytest.raises(ValueError, match="scales"):
        Int4Weight(q.qweight, q.scales[:, :1], None, None, 32)
    with pytest.raises(ValueError, match="zeros"):
        Int4Weight(q.qweight, q.scales, torch.zeros(8, 2), None, 32)
    with pytest.raises(ValueError, match="pre_quant_scale"):
        Int4Weight(q.qweight, q.scales, None, torch.ones(63), 32)
    with pytest.raises(ValueError, match="qweight"):
        Int4Weight(q.qweight.int(), q.scales, None, None, 32)


# FP8 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_channel", [True, False])
def test_fp8_round_trip_error_bound(per_channel):
    w = torch.randn(32, 96, generator=_gen(2)) * torch.logspace(-3, 0, 32)[:, None]
    q = quantize_fp8(w, per_channel=per_channel)
    assert q.weight.dtype == torch.float8_e4m3fn and q.per_channel == per_channel
    assert q.weight_scale.shape == ((32,) if per_channel else ())
    scale = q.weight_scale[:, None] if per_channel else q.weight_scale
    # e4m3: 3 mantissa bits (half an ulp = 2**-4 relative); subnormal step 2**-9 (times scale).
    bound = torch.maximum(w.abs() * 2**-4, scale * 2**-10) * (1 + 1e-6)
    assert ((q.dequantize() - w).abs() <= bound).all()
    assert q.weight.float().abs().max() <= 448


def test_fp8_per_channel_beats_per_tensor_on_uneven_rows():
    # Rows 10**6 apart: one per-tensor scale flushes the smallest rows to e4m3 zero.
    w = torch.randn(32, 96, generator=_gen(3)) * torch.logspace(-6, 0, 32)[:, None]
    err = {pc: ((quantize_fp8(w, pc).dequantize() - w).norm(dim=1) / w.norm(dim=1)).max()
           for pc in (True, False)}
    assert err[True] < 0.05 and err[False] > 0.5


def test_fp8_scale_math():
    assert fp8_activation_scale(448.0) == 1.0
    assert fp8_activation_scale(torch.tensor(44.8)) == pytest.approx(0.1)
    assert fp8_activation_scale(0.0) == 1.0  # never activated: a neutral scale, not 0
    with pytest.raises(ValueError, match="finite"):
        fp8_activation_scale(float("nan"))
    per_layer = kv_cache_scale(torch.tensor([4.48, 0.0, 896.0]))
    assert torch.allclose(per_layer, torch.tensor([0.01, 1.0, 2.0]))
    assert kv_cache_scale(8.96) == pytest.approx(0.02)
    w = quantize_fp8(torch.randn(16, 32), input_scale=0.5)
    assert w.input_scale.dtype == torch.float32 and w.input_scale.item() == 0.5


def test_fp8_weight_rejects_inconsistent_tensors():
    q = quantize_fp8(torch.randn(8, 32))
    with pytest.raises(ValueError, match="weight_scale"):
        Fp8Weight(q.weight, q.weight_scale[:4])
    with pytest.raises(ValueError, match="input_scale"):
        Fp8Weight(q.weight, q.weight_scale, torch.ones(1))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        Fp8Weight(q.weight.float(), q.weight_scale)


@pytest.mark.parametrize("static", [True, False])
def test_fp8_linear_reference_and_fallback(static):
    g = _gen(4)
    w_dense = torch.randn(48, 64, generator=g) * 0.1
    x = torch.randn(5, 64, generator=g)
    q = quantize_fp8(w_dense, input_scale=fp8_activation_scale(x.abs().max()) if static else None)
    exact = x @ w_dense.T
    for quantize_input in (True, False):
        y = fp8_linear_ref(x, q, quantize_input=quantize_input)
        assert (y - exact).norm() / exact.norm() < 0.08
    # The activation is quantized at the static scale (or each token's own amax) as documented.
    xs = q.input_scale if static else x.abs().amax(dim=-1, keepdim=True) / 448
    xq = (x / xs).to(torch.float8_e4m3fn).float() * xs
    torch.testing.assert_close(fp8_linear_ref(x, q), xq @ q.dequantize().T)
    if not uses_scaled_mm(x, q):  # CPU: the W8A16 fallback
        torch.testing.assert_close(fp8_linear(x, q), fp8_linear_ref(x, q, quantize_input=False))
        torch.testing.assert_close(q.linear(x[None]), fp8_linear(x, q)[None])
    with pytest.raises(ValueError, match="x must be"):
        fp8_linear(torch.randn(3, 63), q)


# AWQ -----------------------------------------------------------------------------------------


def test_awq_beats_rtn_on_outlier_channels():
    g = _gen(5)
    k, out, group = 512, 256, 128
    outliers = torch.randperm(k, generator=g)[:8]
    w = torch.randn(out, k, generator=g) * 0.02
    calib, held_out = _activations(256, k, outliers, g), _activations(256, k, outliers, g)
    s = awq_search_scales(w, calib, group, n_grid=20)
    rtn_err = awq_output_error(w, held_out, None, group)
    awq_err = awq_output_error(w, held_out, s, group)
    print(f"relative output error: RTN {rtn_err:.4f}, AWQ {awq_err:.4f}")
    assert awq_err < 0.7 * rtn_err
    assert s[outliers].min() > s.median()  # the salient channels are the ones scaled up
    # The packed weight carries 1/s, and behaves as the search measured.
    q = quantize_int4_awq(w, scales=s, group_size=group)
    assert torch.allclose(q.pre_quant_scale * s, torch.ones(k), rtol=1e-6)
    y = held_out @ q.dequantize().T
    exact = held_out @ w.T
    assert float((y - exact).norm() / exact.norm()) == pytest.approx(awq_err, rel=1e-3)


def test_awq_never_loses_to_rtn_on_its_calibration_set():
    g = _gen(6)
    w = torch.randn(64, 256, generator=g)
    x = torch.randn(64, 256, generator=g)  # no outliers: scaling has little to gain
    s = awq_search_scales(w, x, 64, n_grid=5)
    assert awq_output_error(w, x, s, 64) <= awq_output_error(w, x, None, 64) * (1 + 1e-6)


def test_awq_shared_scales_and_gemma_norm_fold():
    """q/k/v share one s; folding 1/s into the (1 + w) norm gives the same layer output."""
    g = _gen(7)
    hidden, group = 256, 64
    outliers = torch.randperm(hidden, generator=g)[:4]
    h = _activations(32, hidden, outliers, g)
    norm_w = torch.randn(hidden, generator=g) * 0.1
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    x = normed * (1 + norm_w)
    qkv = [torch.randn(n, hidden, generator=g) * 0.05 for n in (128, 64, 64)]
    s = awq_search_scales(qkv, x, group, n_grid=10)
    ws = [quantize_int4_awq(w, scales=s, group_size=group) for w in qkv]
    assert all(torch.equal(w.pre_quant_scale, ws[0].pre_quant_scale) for w in ws)
    folded_norm, plain = fold_into_gemma_norm(norm_w, ws)
    assert all(w.pre_quant_scale is None for w in plain)
    x_folded = normed * (1 + folded_norm)
    for w, p in zip(ws, plain, strict=True):
        torch.testing.assert_close(w4a16_linear_ref(x_folded, p), w4a16_linear_ref(x, w),
                                   rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="different pre_quant_scale"):
        fold_into_gemma_norm(norm_w, [ws[0], quantize_int4_rtn(qkv[1], group)])


# W4A16 kernel against its reference ------------------------------------------------------------

KERNEL_CASES = [
    # (M, N, K, group, symmetric, awq pre-scale, dtype)
    (1, 64, 128, 128, True, False, torch.float32),  # decode: one row
    (19, 80, 384, 128, True, True, torch.float32),  # odd group count; M, N not tile multiples
    (33, 48, 160, 64, False, True, torch.float32),  # partial last group, asymmetric
    (5, 64, 256, 32, False, False, torch.float16),
    (17, 96, 192, 64, True, True, torch.bfloat16),
    (2, 32, 96, 48, True, False, torch.bfloat16),  # group 48: K tile 16 divides it
]


def _int4(n, k, group, symmetric, pre_scale, dtype, g):
    w = torch.randn(n, k, generator=g) * 0.05
    if pre_scale:
        s = torch.rand(k, generator=g) * 3 + 0.25
        return quantize_int4_awq(w, scales=s, group_size=group, symmetric=symmetric,
                                 scale_dtype=dtype)
    return quantize_int4_rtn(w, group, symmetric=symmetric, scale_dtype=dtype)


@pytest.mark.parametrize(("m", "n", "k", "group", "symmetric", "pre_scale", "dtype"), KERNEL_CASES)
def test_w4a16_kernel_matches_reference(m, n, k, group, symmetric, pre_scale, dtype):
    g = _gen(8)
    w = _int4(n, k, group, symmetric, pre_scale, dtype, g).to(DEVICE)
    x = torch.randn(m, k, generator=g).to(device=DEVICE, dtype=dtype)
    y = w4a16_linear(x, w)
    ref = w4a16_linear_ref(x, w)
    assert y.shape == (m, n) and y.dtype == dtype and torch.isfinite(y.float()).all()
    scale = ref.float().abs().max().item()
    tol = 1e-4 * scale if dtype == torch.float32 else 4 * torch.finfo(dtype).eps * scale
    torch.testing.assert_close(y.float(), ref.float(), rtol=0, atol=tol)


def test_w4a16_batched_input_and_dispatch():
    g = _gen(9)
    w = _int4(32, 64, 32, True, True, torch.float32, g)
    x = torch.randn(2, 3, 64, generator=g)
    y = w.linear(x)  # Triton (interpreted here) since TRITON_INTERPRET=1 or CUDA
    assert y.shape == (2, 3, 32)
    torch.testing.assert_close(y, w4a16_linear_ref(x, w), rtol=1e-4, atol=1e-5)
    assert w4a16_linear(torch.empty(0, 64), w).shape == (0, 32)


def test_w4a16_rejects_bad_arguments():
    w = quantize_int4_rtn(torch.randn(32, 64), 32)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 64\]"):
        w4a16_linear(torch.randn(4, 65), w)
    with pytest.raises(ValueError, match="x must be fp16, bf16 or fp32"):
        w4a16_linear(torch.randn(4, 64).double(), w)
    with pytest.raises(TypeError, match="Int4Weight"):
        w4a16_linear(torch.randn(4, 64), torch.randn(32, 64))
    odd = quantize_int4_rtn(torch.randn(32, 64), 40)
    with pytest.raises(ValueError, match="group_size must be a multiple of 16"):
        w4a16_linear(torch.randn(4, 64), odd)


# GPU-only ------------------------------------------------------------------------------------


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m", [1, 77, 512])
def test_w4a16_kernel_gemma_shapes_on_gpu(m):
    g = _gen(10)
    w = _int4(2304, 9216, 128, True, True, torch.bfloat16, g).to("cuda")
    x = torch.randn(m, 9216, generator=g).to("cuda", torch.bfloat16)
    ref = w4a16_linear_ref(x, w)
    tol = 4 * torch.finfo(torch.bfloat16).eps * ref.float().abs().max().item()
    torch.testing.assert_close(w4a16_linear(x, w).float(), ref.float(), rtol=0, atol=tol)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("static", [True, False])
def test_fp8_scaled_mm_matches_reference_on_gpu(per_channel, static):
    g = _gen(11)
    w_dense = torch.randn(1024, 2048, generator=g) * 0.02
    x = torch.randn(37, 2048, generator=g).to("cuda", torch.bfloat16)
    amax = x.abs().max().item()
    q = quantize_fp8(w_dense, per_channel, input_scale=amax / 448 if static else None).to("cuda")
    ref = fp8_linear_ref(x, q, quantize_input=uses_scaled_mm(x, q))
    tol = 4 * torch.finfo(torch.bfloat16).eps * ref.float().abs().max().item()
    torch.testing.assert_close(fp8_linear(x, q).float(), ref.float(), rtol=0, atol=tol)

