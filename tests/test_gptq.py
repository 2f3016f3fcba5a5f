"""GPTQ error-compensated rounding on a fixed INT4 grid (trt_gemma/quant/gptq.py).

Checked against independent computations: RTN's codes (a diagonal Hessian leaves nothing to
compensate), a direct, unblocked float64 implementation of the OBS column updates written here from
the paper's equations (explicit H^-1, no Cholesky, no lazy batches), and the output error computed
from the dequantized weights. Shapes are small: every test runs in well under a second.
"""

import pytest
import torch

from trt_gemma.kernels.gemm_w4a16 import SYMMETRIC_ZERO, unpack_int4
from trt_gemma.quant.calibrate import calibrate, calibration_windows, linear_groups
from trt_gemma.quant.gptq import gptq_codes, quantize_int4_gptq, scale_hessian, split_int4_rows
from trt_gemma.quant.int4 import quantize_int4_codes, quantize_int4_rtn


pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _correlated(n: int, k: int, g: torch.Generator, factors: torch.Tensor | None = None):
    """LLM-like inputs: strongly correlated channels (k // 8 shared latent factors) plus noise.
    Pass the same ``factors`` to draw calibration and held-out sets from one distribution."""
    if factors is None:
        factors = torch.randn(k // 8, k, generator=torch.Generator().manual_seed(99))
    return torch.randn(n, factors.shape[0], generator=g) @ factors + 0.3 * torch.randn(
        n, k, generator=g)


def _grid(codes, scales, zeros, group_size):
    """(codes - zero) * scale, expanded per input channel, in float64."""
    k = codes.shape[1]

    def per_channel(t):
        return t.double().repeat_interleave(group_size, dim=1)[:, :k]

    zero = per_channel(zeros) if zeros is not None else SYMMETRIC_ZERO
    return (codes.double() - zero) * per_channel(scales)


def _naive_gptq(w, h, scales, zeros, group_size, damp, order=None):
    """OBS updates column by column (in ``order``) with an explicit inverse Hessian, float64."""
    w = w.double().clone()
    k = w.shape[1]
    h = h.double() + damp * h.diagonal().mean() * torch.eye(k, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    zero = zeros.double() if zeros is not None else torch.full_like(scales.double(), 8.0)
    step = scales.double()
    codes = torch.empty(w.shape, dtype=torch.uint8)
    remaining = torch.ones(k, dtype=torch.bool)
    for j in (order.tolist() if order is not None else range(k)):
        g = j // group_size
        q = ((w[:, j] / step[:, g]).round() + zero[:, g]).clamp(0, 15)
        codes[:, j] = q.to(torch.uint8)
        err = (w[:, j] - (q - zero[:, g]) * step[:, g]) / hinv[j, j]
        remaining[j] = False
        w[:, remaining] -= err[:, None] * hinv[j, remaining][None, :]
        # Remove column j from the problem: H^-1 of the remaining columns.
        hinv = hinv - hinv[:, j:j + 1] @ hinv[j:j + 1, :] / hinv[j, j]
    return codes


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("k", "group_size", "scale_dtype"),
                         [(256, 64, torch.float32), (200, 64, torch.bfloat16)])
def test_diagonal_hessian_gives_rtn_codes_exactly(symmetric, k, group_size, scale_dtype,
                                                  act_order):
    g = _gen(1)
    w = torch.randn(48, k, generator=g) * 0.03
    h = torch.diag(torch.rand(k, generator=g) * 5 + 0.1)
    h[3, 3] = 0.0  # a channel that was never active
    codes, scales, zeros = quantize_int4_codes(w, group_size, symmetric=symmetric,
                                               scale_dtype=scale_dtype)
    got = gptq_codes(w, h, scales, zeros, group_size, block_size=32, act_order=act_order)
    assert torch.equal(got, codes)


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_lowers_output_error_on_correlated_inputs(symmetric):
    g = _gen(2)
    k, out, group = 256, 96, 64
    w = torch.randn(out, k, generator=g) * 0.02
    calib, held_out = _correlated(1024, k, g), _correlated(1024, k, g)
    h = calib.T @ calib
    codes, scales, zeros = quantize_int4_codes(w, group, symmetric=symmetric)
    gq = gptq_codes(w, h, scales, zeros, group)
    assert int(gq.max()) <= 15  # uint8, so >= 0 too

    def err(c, x):
        ref = x.double() @ w.double().T
        return float((x.double() @ _grid(c, scales, zeros, group).T - ref).norm() / ref.norm())

    print(f"relative output error: RTN {err(codes, calib):.4f}, GPTQ {err(gq, calib):.4f} "
          f"(held-out {err(codes, held_out):.4f} -> {err(gq, held_out):.4f})")
    assert err(gq, calib) < 0.5 * err(codes, calib)
    assert err(gq, held_out) < 0.5 * err(codes, held_out)


def test_blocked_cholesky_sweep_matches_the_unblocked_obs_updates():
    g = _gen(3)
    k, group = 96, 32
    w = torch.randn(40, k, generator=g)
    x = _correlated(512, k, g)
    h = x.T @ x
    _, scales, zeros = quantize_int4_codes(w, group, symmetric=False)
    want = _naive_gptq(w, h, scales, zeros, group, damp=0.01)
    for block in (1, 17, 128):
        got = gptq_codes(w, h, scales, zeros, group, damp=0.01, block_size=block)
        # Same math in a different order: only a value sitting on a rounding tie may differ.
        assert (got != want).float().mean() < 0.005, block
    # Act order: columns visited by descending diag(H), each on its own group's grid.
    order = torch.argsort(h.diagonal(), descending=True, stable=True)
    want = _naive_gptq(w, h, scales, zeros, group, damp=0.01, order=order)
    got = gptq_codes(w, h, scales, zeros, group, damp=0.01, block_size=17, act_order=True)
    assert (got != want).float().mean() < 0.005


def test_packed_weight_round_trips_and_keeps_rtns_grid():
    g = _gen(4)
    k, group = 192, 64
    w = torch.randn(24, k, generator=g)
    x = _correlated(300, k, g)
    q = quantize_int4_gptq(w, x.T @ x, group, symmetric=False, scale_dtype=torch.bfloat16)
    rtn = quantize_int4_rtn(w, group, symmetric=False, scale_dtype=torch.bfloat16)
    assert torch.equal(q.scales, rtn.scales) and torch.equal(q.zeros, rtn.zeros)
    assert q.pre_quant_scale is None and q.group_size == group
    codes = unpack_int4(q.qweight)
    assert codes.shape == (24, k) and int(codes.max()) <= 15
    assert torch.equal(codes, gptq_codes(w, x.T @ x, rtn.scales, rtn.zeros, group))
    torch.testing.assert_close(q.dequantize(torch.float64),
                               _grid(codes, q.scales, q.zeros, group), rtol=0, atol=0)


def test_scale_hessian_is_the_hessian_of_scaled_inputs():
    g = _gen(5)
    x = torch.randn(50, 32, generator=g, dtype=torch.float64)
    s = torch.rand(32, generator=g, dtype=torch.float64) + 0.5
    torch.testing.assert_close(scale_hessian(x.T @ x, s), (x / s).T @ (x / s))


def test_bad_arguments_name_the_argument():
    w, h = torch.randn(8, 64), torch.eye(64)
    _, scales, zeros = quantize_int4_codes(w, 32, symmetric=False)
    with pytest.raises(ValueError, match="hessian must be"):
        gptq_codes(w, torch.eye(32), scales, zeros, 32)
    with pytest.raises(ValueError, match="hessian must be a finite"):
        gptq_codes(w, torch.full((64, 64), float("nan")), scales, zeros, 32)
    with pytest.raises(ValueError, match="scales must be"):
        gptq_codes(w, h, scales[:, :1], zeros, 32)
    with pytest.raises(ValueError, match="zeros must be"):
        gptq_codes(w, h, scales, zeros[:4], 32)
    with pytest.raises(ValueError, match="group_size"):
        gptq_codes(w, h, scales, zeros, 0)
    with pytest.raises(ValueError, match="weight must be"):
        gptq_codes(w[0], h, scales, zeros, 32)
    with pytest.raises(ValueError, match="damp"):
        gptq_codes(w, h, scales, zeros, 32, damp=0.0)
    with pytest.raises(ValueError, match="block_size"):
        gptq_codes(w, h, scales, zeros, 32, block_size=0)
    with pytest.raises(ValueError, match="s must be"):
        scale_hessian(h, torch.ones(63))


def test_calibration_hessian_sums_every_token(tiny_gemma3_dir):
    """x.T x per group equals the product of the recorded rows when every row is sampled."""
    from trt_gemma.converter.engine import open_source

    config, weights, _, _ = open_source(tiny_gemma3_dir)
    windows = calibration_windows(list(range(10, 70)), 2, 16, 64)
    total = sum(len(w) for w in windows)
    groups = linear_groups(config)
    stats = calibrate(config, weights, windows, groups=groups, max_rows=total)
    for group in groups:
        st = stats.inputs[group.name]
        x = st.activations().double()
        assert x.shape[0] == total and st.xtx is not None
        torch.testing.assert_close(st.xtx.double(), x.T @ x, rtol=1e-5,
                                   atol=1e-5 * float(x.abs().max()) ** 2)
    off = calibrate(config, weights, windows, groups=groups, max_rows=8, hessians=False)
    assert all(st.xtx is None for st in off.inputs.values())


def test_split_rows_of_a_stacked_group():
    g = _gen(6)
    ws = [torch.randn(n, 128, generator=g) for n in (32, 8, 8)]
    x = _correlated(256, 128, g)
    q = quantize_int4_gptq(torch.cat(ws), x.T @ x, 64, symmetric=False)
    parts = split_int4_rows(q, [32, 8, 8])
    assert [p.out_features for p in parts] == [32, 8, 8]
    assert torch.equal(torch.cat([p.dequantize() for p in parts]), q.dequantize())
    alone = quantize_int4_gptq(ws[1], x.T @ x, 64, symmetric=False)
    # Rows never interact in GPTQ: the stacked sweep gives each weight its own codes.
    assert (unpack_int4(parts[1].qweight) != unpack_int4(alone.qweight)).float().mean() < 0.005
    with pytest.raises(ValueError, match="rows must"):
        split_int4_rows(q, [32, 8])
