"""The quantized GEMMs' GPU paths against their references, on CPU under the Triton interpreter.

W4A16: every configuration ``choose_config`` can pick (small-M with and without split-K, mid-M,
the large-M dequantize + matmul path), forced on small shapes so the interpreter stays fast, and
the choice itself on Gemma's shapes. FP8: the activation-quantization kernel bit for bit against
``reference.quantize_fp8``, and the code around ``torch._scaled_mm`` (which cannot run on CPU)
through a stand-in that checks torch's argument rules and computes the product. The capability
gate of ``quant.runtime.prepare_for_device`` with a faked compute capability.

Tolerances: fp32 1e-5 of the output's scale; fp16/bf16 4 epsilons of it (the interpreter
truncates rather than rounds on casts to bf16).
"""

import logging

import pytest
import torch

from trt_gemma.kernels import gemm_fp8, gemm_w4a16
from trt_gemma.kernels.gemm_fp8 import fp8_path, quantize_activation, scaled_mm_linear
from trt_gemma.kernels.gemm_w4a16 import (
    LARGE_M,
    W4A16Config,
    choose_config,
    dequantize_rows,
    w4a16_linear,
)
from trt_gemma.kernels.reference import quantize_fp8 as cast_to_fp8
from trt_gemma.kernels.reference_gemm import fp8_linear_ref, w4a16_linear_ref
from trt_gemma.quant import quantize_fp8, quantize_int4_awq, quantize_int4_rtn
from trt_gemma.quant import runtime as quant_runtime

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    # Without a GPU the kernels run interpreted; they are built at their first launch, so
    # rebuild them in that mode here.
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    caches = (gemm_w4a16._kernel, gemm_w4a16._dequant_kernel, gemm_fp8._quant_kernel)
    for cache in caches:
        cache.cache_clear()
    yield
    for cache in caches:
        cache.cache_clear()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _int4(n, k, group, zeros, pre_scale, dtype, g):
    w = torch.randn(n, k, generator=g) * 0.05
    if pre_scale:
        s = torch.rand(k, generator=g) * 3 + 0.25
        return quantize_int4_awq(w, scales=s, group_size=group, symmetric=not zeros,
                                 scale_dtype=dtype)
    return quantize_int4_rtn(w, group, symmetric=not zeros, scale_dtype=dtype)


def _assert_close(y, ref):
    assert y.shape == ref.shape and y.dtype == ref.dtype and torch.isfinite(y.float()).all()
    scale = ref.float().abs().max().item()
    eps = 1e-5 if ref.dtype == torch.float32 else 4 * torch.finfo(ref.dtype).eps
    torch.testing.assert_close(y.float(), ref.float(), rtol=0, atol=eps * scale)


# W4A16 ---------------------------------------------------------------------------------------

SMALL, SPLIT4, SPLIT3, MID = (
    W4A16Config("fused", 16, 64, 64, 1, 4, 4),
    W4A16Config("fused", 16, 64, 64, 4, 4, 4),
    W4A16Config("fused", 16, 32, 32, 3, 4, 4),  # 3 splits of 7 K tiles: uneven
    W4A16Config("fused", 64, 64, 64, 1, 8, 3),
)
DEQUANT = W4A16Config("dequant", 0, 64, 64, 1, 4, 1)

W4A16_CASES = [
    # (M, N, K, group, zeros, pre_scale, dtype, config); N = 80 and 100 are not tile multiples
    (1, 80, 256, 64, False, False, torch.float32, SMALL),
    (3, 80, 256, 64, True, True, torch.bfloat16, SMALL),
    (16, 100, 256, 64, True, False, torch.float16, SMALL),
    (1, 80, 256, 64, False, True, torch.bfloat16, SPLIT4),
    (3, 80, 224, 32, True, True, torch.float32, SPLIT3),
    (16, 48, 512, 128, False, True, torch.float16, W4A16Config("fused", 16, 64, 64, 16, 4, 4)),
    (17, 80, 256, 64, True, True, torch.bfloat16, MID),
    (33, 80, 256, 64, False, True, torch.float16, None),  # chosen: the 64-row mid tile
    (64, 100, 128, 32, False, False, torch.float32, W4A16Config("fused", 64, 32, 32, 1, 8, 3)),
    (17, 80, 256, 64, False, True, torch.float32, DEQUANT),
    (64, 100, 192, 64, True, True, torch.bfloat16, DEQUANT),
    (3, 72, 160, 32, True, False, torch.float16, None),  # K = 5 tiles of 32: fused, chosen
    (2, 32, 96, 48, False, True, torch.bfloat16, None),  # group 48: only the dequantize path
]


@pytest.mark.parametrize(("m", "n", "k", "group", "zeros", "pre", "dtype", "cfg"), W4A16_CASES)
def test_w4a16_paths_match_reference(m, n, k, group, zeros, pre, dtype, cfg):
    g = _gen(m * 1000 + n + k)
    w = _int4(n, k, group, zeros, pre, dtype, g).to(DEVICE)
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    _assert_close(w4a16_linear(x, w, config=cfg), w4a16_linear_ref(x, w))


def test_w4a16_fused_config_refuses_shapes_it_cannot_take():
    w = _int4(32, 96, 48, False, False, torch.float32, _gen(7)).to(DEVICE)
    with pytest.raises(ValueError, match="fused kernel cannot take"):
        w4a16_linear(torch.randn(2, 96, device=DEVICE), w, config=SPLIT3)


def test_w4a16_split_k_is_deterministic_and_leaves_counters_zero():
    g = _gen(1)
    w = _int4(80, 512, 64, True, True, torch.float32, g).to(DEVICE)
    x = torch.randn(5, 512, generator=g).to(DEVICE)
    cfg = W4A16Config("fused", 16, 32, 32, 8, 4, 4)
    y1, y2 = w4a16_linear(x, w, config=cfg), w4a16_linear(x, w, config=cfg)
    assert torch.equal(y1, y2)
    stream = gemm_w4a16._device_info(x.device)[2]
    assert int(gemm_w4a16._arrival_counters(x.device, stream).abs().sum()) == 0
    # Summed in split order, the same partials as one program: equal to fp32 rounding.
    unsplit = w4a16_linear(x, w, config=W4A16Config("fused", 16, 32, 32, 1, 4, 4))
    torch.testing.assert_close(y1, unsplit, rtol=0, atol=1e-5)


def test_w4a16_decode_is_one_launch(monkeypatch):
    """A decode GEMM (M <= 16) is one Triton launch, split or not, and no cuBLAS call."""
    launches, real = [], gemm_w4a16._kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return real()[grid]

    monkeypatch.setattr(gemm_w4a16, "_kernel", lambda: Counting())
    monkeypatch.setattr(torch, "mm", lambda *a, **k: pytest.fail("cuBLAS on the decode path"))
    g = _gen(2)
    w = _int4(64, 2048, 128, False, True, torch.bfloat16, g).to(DEVICE)
    x = torch.randn(1, 2048, generator=g).to(DEVICE, torch.bfloat16)
    cc, sms, _ = gemm_w4a16._device_info(x.device)  # CPU tensors pose as sm90, 132 SMs
    cfg = choose_config(1, 64, 2048, 128, torch.bfloat16, cc, sms)
    assert cfg.split_k > 1
    y = w4a16_linear(x, w)
    assert launches == [(1, cfg.split_k)]
    _assert_close(y, w4a16_linear_ref(x, w))


def test_w4a16_dequantize_kernel_is_int4weight_dequantize():
    g = _gen(3)
    for zeros, pre in ((False, False), (True, True)):
        w = _int4(70, 320, 64, zeros, pre, torch.float32, g).to(DEVICE)
        assert torch.equal(dequantize_rows(w, 5, 60, torch.float32),
                           w.dequantize(torch.float32)[5:65])


def test_w4a16_large_m_chunks_write_their_columns(monkeypatch):
    monkeypatch.setattr(gemm_w4a16, "_DEQUANT_CHUNK_BYTES", 64 * 128 * 4)  # 64 rows per chunk
    g = _gen(4)
    w = _int4(150, 128, 64, True, False, torch.float32, g).to(DEVICE)
    x = torch.randn(LARGE_M, 128, generator=g).to(DEVICE)
    assert choose_config(LARGE_M, 150, 128, 64, x.dtype, (9, 0)).path == "dequant"
    _assert_close(w4a16_linear(x, w), w4a16_linear_ref(x, w))


GEMMA_DECODE_SHAPES = [(2048, 2048), (2304, 9216), (73728, 4608), (5376, 21504), (4608, 36864)]


@pytest.mark.parametrize(("n", "k"), GEMMA_DECODE_SHAPES)
@pytest.mark.parametrize("cc", [(8, 0), (8, 9), (9, 0)])
def test_w4a16_decode_configs_fill_the_gpu_in_one_launch(n, k, cc):
    sms = {(8, 0): 108, (8, 9): 142, (9, 0): 132}[cc]
    cfg = choose_config(1, n, k, 128, torch.bfloat16, cc, sms)
    assert cfg.path == "fused" and cfg.block_m == 16
    programs = -(-n // cfg.block_n) * cfg.split_k
    k_per_split = k // cfg.split_k
    # Enough programs for ~4 per SM where K allows it, never a split under 512 channels.
    assert programs >= 4 * sms or cfg.split_k == 16 or k_per_split < 1024
    assert k_per_split >= 512 and k_per_split % cfg.block_k == 0
    assert choose_config(LARGE_M, n, k, 128, torch.bfloat16, cc, sms).path == "dequant"


def test_w4a16_compile_specs_cover_every_chosen_config():
    """What the launcher can choose is what the compile check compiles (same constexprs)."""
    for cc in ((8, 0), (9, 0)):
        names = {s.name for s in gemm_w4a16.compile_specs(cc)}
        for m in (1, 7, 16, 20, 48, 100, 255, 256, 4096):
            for n, k in GEMMA_DECODE_SHAPES + [(1152, 6912), (640, 2048)]:
                for dtype, t in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
                    cfg = choose_config(m, n, k, 128, dtype, cc)
                    if cfg.path == "dequant":
                        assert f"w4a16_dequant[{t},g128,zeros,pqs,N64]" in names
                        continue
                    split = ",splitk" if cfg.split_k > 1 else ""
                    name = (f"w4a16_gemm[{t},g128,zeros,pqs,{cfg.block_m}x{cfg.block_n}{split},"
                            f"s{cfg.num_stages}]")
                    assert name in names, (m, n, k, cfg)


# FP8 -----------------------------------------------------------------------------------------


def _activations(m, k, dtype, g):
    x = torch.randn(m, k, generator=g) * torch.logspace(-5, 3, m)[:, None]
    x[0, :7] = torch.tensor([0.0, -0.0, 1e-8, -1e-8, 3e-5, -3e-5, 65000.0])
    if m > 2:
        x[2] = 0.0  # an all-zero token: the floored scale
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("static", [None, 0.02, 3.0])
@pytest.mark.parametrize("k", [96, 1000, 5000])  # one step, a partial step, two steps of 4096
def test_fp8_activation_quant_is_bit_identical(dtype, static, k):
    g = _gen(k)
    x = _activations(5, k, dtype, g).to(DEVICE)
    input_scale = None if static is None else torch.tensor(static, device=DEVICE)
    xq, scales = quantize_activation(x, input_scale)
    ref_scale = gemm_fp8.activation_scale(x, input_scale)
    assert xq.dtype == torch.float8_e4m3fn and scales.shape == (5, 1)
    assert torch.equal(scales, ref_scale.expand(5, 1))
    assert torch.equal(xq.view(torch.uint8), cast_to_fp8(x, ref_scale).view(torch.uint8))


def test_fp8_activation_quant_rounds_ties_to_even_and_saturates():
    # At scale 1: e4m3 neighbours 1.0 | 1.125, 1.125 | 1.25, 0 | 2**-9 (subnormal), 256 | 288.
    ties = [1.0625, 1.1875, 2.0**-10, 3 * 2.0**-10, 272.0, -1.0625, 500.0, -1000.0]
    x = torch.tensor([ties + [0.0] * 8], dtype=torch.bfloat16, device=DEVICE)
    xq, _ = quantize_activation(x, torch.tensor(1.0, device=DEVICE))
    expected = [1.0, 1.25, 0.0, 2.0**-8, 256.0, -1.0, 448.0, -448.0]
    assert xq.float()[0, :8].tolist() == expected
    assert torch.equal(xq.view(torch.uint8), cast_to_fp8(x, 1.0).view(torch.uint8))


class _FakeScaledMM:
    """Stands in for torch._scaled_mm on CPU: checks torch's rules for its arguments, records the
    call, and returns (a @ b) * scale_a * scale_b in out_dtype."""

    def __init__(self):
        self.calls = []

    def __call__(self, a, b, *, scale_a, scale_b, out_dtype):
        m, k = a.shape
        n = b.shape[1]
        assert a.dtype == b.dtype == torch.float8_e4m3fn
        assert a.stride() == (k, 1) and b.stride() == (1, k), "a row-major, b column-major"
        assert k % 16 == 0 and n % 16 == 0
        assert scale_a.dtype == scale_b.dtype == torch.float32
        if scale_a.numel() == 1 and scale_b.numel() == 1:
            kind = "tensorwise"
        else:
            kind = "rowwise"
            assert scale_a.shape == (m, 1) and scale_b.shape == (1, n)
            assert scale_a.is_contiguous() and scale_b.is_contiguous()
            assert out_dtype == torch.bfloat16
        # torch's own shape checks, on meta copies
        meta = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
                for t in (a, b, scale_a, scale_b)]
        torch.ops.aten._scaled_mm.default(*meta, out_dtype=out_dtype)
        self.calls.append((kind, out_dtype))
        return ((a.float() @ b.float()) * scale_a * scale_b).to(out_dtype)


@pytest.mark.parametrize(("dtype", "per_channel", "static", "rowwise"), [
    (torch.bfloat16, True, False, True),
    (torch.bfloat16, True, True, True),
    (torch.float16, True, False, False),
    (torch.bfloat16, False, True, False),
])
def test_fp8_scaled_mm_arguments(monkeypatch, dtype, per_channel, static, rowwise):
    fake = _FakeScaledMM()
    monkeypatch.setattr(torch, "_scaled_mm", fake, raising=False)
    g = _gen(5)
    x = (_activations(7, 64, dtype, g) * 0.01).to(DEVICE)
    q = quantize_fp8(torch.randn(48, 64, generator=g) * 0.1, per_channel,
                     input_scale=float(x.abs().max()) / 448 if static else None).to(DEVICE)
    y = scaled_mm_linear(x, q, rowwise=rowwise)
    assert fake.calls == [("rowwise" if rowwise else "tensorwise",
                           torch.bfloat16 if rowwise else torch.float32)]
    _assert_close(y, fp8_linear_ref(x, q))


def test_fp8_path_by_capability_and_dtype():
    w = quantize_fp8(torch.randn(32, 64))
    w_tensor = quantize_fp8(torch.randn(32, 64), per_channel=False)
    assert fp8_path((9, 0), torch.bfloat16, w) == "rowwise"
    assert fp8_path((8, 9), torch.bfloat16, w) == "rowwise"
    assert fp8_path((10, 0), torch.bfloat16, w) == "unit-scales"  # no row-wise cuBLAS there
    assert fp8_path((9, 0), torch.float16, w) == "unit-scales"
    assert fp8_path((9, 0), torch.bfloat16, w_tensor) == "unit-scales"
    assert fp8_path((8, 6), torch.bfloat16, w) == "w8a16"
    assert fp8_path((9, 0), torch.float32, w) == "w8a16"
    assert fp8_path(None, torch.bfloat16, w) == "w8a16"
    assert fp8_path((9, 0), torch.bfloat16, quantize_fp8(torch.randn(40, 64))) == "w8a16"


def test_fp8_compile_specs_only_on_fp8_gpus():
    assert gemm_fp8.compile_specs((8, 0)) == []
    specs = gemm_fp8.compile_specs((9, 0))
    blocks = {gemm_fp8._quant_block(k)[0] for k in (640, 2048, 4608, 21504, 36864)}
    assert blocks <= {s.constexprs["BLOCK_K"] for s in specs}
    assert {s.constexprs["STATIC"] for s in specs} == {False, True}


# Capability gate -----------------------------------------------------------------------------


def test_prepare_for_device_gates_on_capability(monkeypatch, caplog):
    quant_runtime._warn_dequantized.cache_clear()
    fp8 = quantize_fp8(torch.randn(32, 64))
    int4 = quantize_int4_rtn(torch.randn(32, 64), 32)
    plain = torch.randn(4)
    weights = {"a.fp8": fp8, "b.fp8": fp8, "c.int4": int4, "d": plain}
    monkeypatch.setattr(quant_runtime, "device_capability", lambda device: (8, 0))
    with caplog.at_level(logging.WARNING, logger=quant_runtime.__name__):
        out = quant_runtime.prepare_for_device(weights, "cuda")
        again = quant_runtime.prepare_for_device(weights, "cuda")
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "compute capability 8.0" in warnings[0] and "FP8" in warnings[0]
    for result in (out, again):
        assert torch.equal(result["a.fp8"], fp8.dequantize(torch.bfloat16))
        assert result["c.int4"] is int4 and result["d"] is plain  # INT4 runs on sm80
    monkeypatch.setattr(quant_runtime, "device_capability", lambda device: (9, 0))
    kept = quant_runtime.prepare_for_device(weights, "cuda")
    assert kept["a.fp8"] is fp8 and kept["c.int4"] is int4
    monkeypatch.setattr(quant_runtime, "device_capability", lambda device: (7, 5))
    with caplog.at_level(logging.WARNING, logger=quant_runtime.__name__):
        old = quant_runtime.prepare_for_device(weights, "cuda", torch.float16)
    assert torch.equal(old["c.int4"], int4.dequantize(torch.float16))
    assert len(caplog.records) == 3  # + FP8 and INT4 on 7.5, once each


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m", [1, 3, 16, 17, 64, 300])
def test_w4a16_gemma_shape_on_gpu(m):
    """gemma-2-2b's down projection (2304 x 9216): split-K at decode, dequantize at prefill."""
    g = _gen(6)
    w = _int4(2304, 9216, 128, True, True, torch.bfloat16, g).to("cuda")
    x = torch.randn(m, 9216, generator=g).to("cuda", torch.bfloat16)
    _assert_close(w4a16_linear(x, w), w4a16_linear_ref(x, w))
