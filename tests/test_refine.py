"""Block-wise INT4 scale refinement (trt_gemma/quant/refine.py).

The layer it differentiates through is checked against the runtime's forward, which the parity
tests check against transformers: windows laid side by side (padded at the end), layer by layer,
must give the hidden states ``GemmaModel.forward`` gives each window alone, on every architecture
(GQA, MQA, sliding windows, soft-caps). The refinement is then checked for what it promises: codes
and zero points untouched, a loss it reports that the exported weights reproduce, never worse than
its start, and better on a layer whose scales were deliberately detuned.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hf_tiny import TINY_VARIANTS, save_tiny_checkpoint

from trt_gemma import ops
from trt_gemma.checkpoint import open_checkpoint
from trt_gemma.kv_cache import ContiguousKVCache
from trt_gemma.model import GemmaModel
from trt_gemma.quant.int4 import quantize_int4_rtn
from trt_gemma.quant.refine import (
    LINEARS,
    LayerwiseRefiner,
    RefineOptions,
    layer_weights,
    refine_layer,
    run_layer,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(tmp_path, variant):
    save_tiny_checkpoint(variant, tmp_path)
    ckpt = open_checkpoint(tmp_path)
    return ckpt.config, {n: t.float() for n, t in ckpt.state_dict().items()}


def _linears(weights, layer):
    p = f"layers.{layer}."
    return {n: weights[p + ("self_attn." if n[0] in "qkvo" else "mlp.") + n + ".weight"]
            for n in LINEARS}


def _norms(weights, layer):
    p = f"layers.{layer}."
    return {n: t for n, t in weights.items() if n.startswith(p) and "norm" in n}


def _windows(seed=0, lengths=(12, 9, 12)):
    g = torch.Generator().manual_seed(seed)
    return [[2, *torch.randint(3, 512, (n - 1,), generator=g).tolist()] for n in lengths]


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_layers_side_by_side_equal_the_runtime_forward(tmp_path, variant):
    config, weights = _tiny(tmp_path, variant)
    windows = _windows()
    refiner = LayerwiseRefiner(config, weights["embed_tokens.weight"], windows)
    x = refiner.float_hidden
    with torch.no_grad():
        for i in range(config.num_hidden_layers):
            w, ns = layer_weights(config, i, _norms(weights, i), _linears(weights, i))
            x = run_layer(config, i, w, ns, x)
    final = ops.rms_norm(x, ops.norm_scale(weights["norm.weight"]), config.rms_norm_eps)
    model = GemmaModel.from_state_dict(config, dict(weights), dtype=torch.float32)
    for b, ids in enumerate(windows):
        ref = ContiguousKVCache(config, 64, torch.float32).forward(model, torch.tensor(ids))
        got = final[b, :len(ids)]
        assert (got - ref).abs().max().item() < 1e-4, (variant, b)


def _quantized(weights, layer, group_size=32, detune=None):
    out = {}
    for k, (n, w) in enumerate(_linears(weights, layer).items()):
        q = quantize_int4_rtn(w, group_size, symmetric=False)
        pre = torch.ones(w.shape[1])
        if detune is not None:  # scales off by up to +-25%: something to repair
            g = torch.Generator().manual_seed(k)
            q = dataclasses.replace(q, scales=q.scales * (1 + 0.5 * (torch.rand(
                q.scales.shape, generator=g) - 0.5)))
        out[n] = dataclasses.replace(q, pre_quant_scale=pre)
    return out


def _layer_setup(tmp_path, variant="gemma3-gqa", layer=1):
    config, weights = _tiny(tmp_path, variant)
    refiner = LayerwiseRefiner(config, weights["embed_tokens.weight"], _windows(1, (16,) * 4))
    norms = _norms(weights, layer)
    with torch.no_grad():
        x = refiner.float_hidden
        for i in range(layer + 1):
            w, ns = layer_weights(config, i, _norms(weights, i), _linears(weights, i))
            x, prev = run_layer(config, i, w, ns, x), x
    return config, weights, norms, prev, x, refiner.valid


def _mse(config, layer, norms, quantized, x, target, valid):
    dense = {n: q.dequantize(torch.float32) for n, q in quantized.items()}
    w, ns = layer_weights(config, layer, norms, dense)
    with torch.no_grad():
        err = (run_layer(config, layer, w, ns, x) - target).pow(2).mean(-1)
    return float((err * valid).sum() / valid.sum())


def test_refinement_repairs_detuned_scales_and_keeps_the_codes(tmp_path):
    config, weights, norms, x, target, valid = _layer_setup(tmp_path)
    start = _quantized(weights, 1, detune=True)
    result = refine_layer(config, 1, norms, start, x, target, valid,
                          RefineOptions(steps=30, lr=0.02, batch_windows=2, eval_every=5))
    for n, q in result.weights.items():
        assert torch.equal(q.qweight, start[n].qweight) and torch.equal(q.zeros, start[n].zeros)
        assert q.scales.dtype == start[n].scales.dtype
    # q/k/v share one input, hence one pre_quant_scale, and so do gate/up
    assert torch.equal(result.weights["q_proj"].pre_quant_scale,
                       result.weights["v_proj"].pre_quant_scale)
    assert torch.equal(result.weights["gate_proj"].pre_quant_scale,
                       result.weights["up_proj"].pre_quant_scale)
    before = _mse(config, 1, norms, start, x, target, valid)
    after = _mse(config, 1, norms, result.weights, x, target, valid)
    assert result.loss_before == pytest.approx(before, rel=1e-4)
    assert result.loss_after == pytest.approx(after, rel=1e-4)  # what it exports is what it saw
    assert after < 0.7 * before


def test_refinement_never_returns_a_worse_layer(tmp_path):
    """A learning rate far too large wrecks every step: the starting point must come back."""
    config, weights, norms, x, target, valid = _layer_setup(tmp_path)
    start = _quantized(weights, 1)
    result = refine_layer(config, 1, norms, start, x, target, valid,
                          RefineOptions(steps=4, lr=5.0, batch_windows=2, eval_every=2))
    assert result.loss_after <= result.loss_before
    assert _mse(config, 1, norms, result.weights, x, target, valid) <= result.loss_before * 1.0001


def test_refine_layer_rejects_mismatched_inputs(tmp_path):
    config, weights, norms, x, target, valid = _layer_setup(tmp_path)
    start = _quantized(weights, 1)
    with pytest.raises(ValueError, match="do not match"):
        refine_layer(config, 1, norms, start, x, target[:, :-1], valid)
    with pytest.raises(ValueError, match="need the linears"):
        refine_layer(config, 1, norms, {"q_proj": start["q_proj"]}, x, target, valid)
