"""Quantized weights that read the same input fuse into one GEMM (q/k/v, gate/up) at model load."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from trt_gemma.kernels.gemm_fp8 import Fp8Weight
from trt_gemma.kernels.gemm_w4a16 import Int4Weight
from trt_gemma.kernels.reference_gemm import fp8_linear_ref, w4a16_linear_ref
from trt_gemma.model import _fuse
from trt_gemma.quant.fp8 import quantize_fp8
from trt_gemma.quant.int4 import quantize_int4_rtn


def _weights(rows=(32, 16, 16), cols=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(r, cols, generator=g) for r in rows]


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_parts_fuse_and_compute_the_same_rows(symmetric):
    pqs = torch.rand(64, generator=torch.Generator().manual_seed(1)) + 0.5
    parts = [dataclasses.replace(quantize_int4_rtn(w, 32, symmetric=symmetric),
                                 pre_quant_scale=pqs.clone()) for w in _weights()]
    fused = _fuse(parts)
    assert isinstance(fused, Int4Weight) and fused.out_features == 64
    x = torch.randn(5, 64)
    want = torch.cat([w4a16_linear_ref(x, p) for p in parts], dim=-1)
    torch.testing.assert_close(w4a16_linear_ref(x, fused), want, rtol=0, atol=0)


def test_int4_parts_with_different_awq_scales_stay_apart():
    parts = [dataclasses.replace(quantize_int4_rtn(w, 32), pre_quant_scale=torch.full((64,), s))
             for w, s in zip(_weights(), (1.0, 2.0, 1.0))]
    assert isinstance(_fuse(parts), tuple)
    mixed = [quantize_int4_rtn(w, 32) for w in _weights()[:2]] + [quantize_int4_rtn(
        _weights()[2], 64)]
    assert isinstance(_fuse(mixed), tuple)  # group sizes differ


@pytest.mark.parametrize(("per_channel", "input_scale"), [(True, None), (False, 0.02),
                                                          (True, 0.05)])
def test_fp8_parts_fuse_and_compute_the_same_rows(per_channel, input_scale):
    parts = [quantize_fp8(w, per_channel, input_scale=input_scale) for w in _weights()]
    fused = _fuse(parts)
    assert isinstance(fused, Fp8Weight) and fused.per_channel and fused.out_features == 64
    x = torch.randn(3, 64)
    # dynamic activation scales are per token: a row's scale is the same fused or not
    want = torch.cat([fp8_linear_ref(x, p) for p in parts], dim=-1)
    torch.testing.assert_close(fp8_linear_ref(x, fused), want, rtol=0, atol=0)


def test_fp8_parts_with_different_activation_scales_stay_apart():
    parts = [quantize_fp8(w, input_scale=s) for w, s in zip(_weights(), (0.02, 0.03, 0.02))]
    assert isinstance(_fuse(parts), tuple)
