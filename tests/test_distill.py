"""End-to-end distillation of INT4 scales (trt_gemma/quant/distill.py).

The loss it minimises is checked against transformers: with ``top_k`` = the whole vocabulary the
truncated KL is the full KL, so the loss ``distill_scales`` reports must equal
KL(float HF model || HF model carrying the quantized weights) computed from transformers' own
logits, before and after tuning, on every architecture (Gemma 2's final soft-cap included). The
tuning is then checked for what it promises: codes and zero points untouched, lower KL on scales
deliberately detuned, and never worse than its start.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hf_tiny import TINY_VARIANTS, make_tiny_hf_model

from trt_gemma.checkpoint import open_checkpoint
from trt_gemma.quant.distill import DistillOptions, distill_scales
from trt_gemma.quant.int4 import quantize_int4_rtn
from trt_gemma.quant.refine import LINEARS, LayerwiseRefiner, layer_weights, run_layer

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 512  # hf_tiny's vocabulary: top_k = VOCAB makes the truncated KL the full one


def _prefix(n):
    return "self_attn." if n[0] in "qkvo" else "mlp."


def _setup(tmp_path, variant, windows=3, length=12):
    hf = make_tiny_hf_model(variant)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ckpt = open_checkpoint(tmp_path)
    config, weights = ckpt.config, {n: t.float() for n, t in ckpt.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    ids = [[2, *torch.randint(3, VOCAB, (length - 1,), generator=g).tolist()]
           for _ in range(windows)]
    refiner = LayerwiseRefiner(config, weights["embed_tokens.weight"], ids)
    x = refiner.float_hidden
    norms = []
    with torch.no_grad():
        for i in range(config.num_hidden_layers):
            p = f"layers.{i}."
            norms.append({n: t for n, t in weights.items() if n.startswith(p) and "norm" in n})
            dense = {n: weights[p + _prefix(n) + n + ".weight"] for n in LINEARS}
            w, ns = layer_weights(config, i, norms[i], dense)
            x = run_layer(config, i, w, ns, x)
    return hf, config, weights, norms, refiner.embedded, x, refiner.valid, torch.tensor(ids)


def _quantized(weights, config, detune=False):
    layers = []
    for i in range(config.num_hidden_layers):
        layer = {}
        for k, n in enumerate(LINEARS):
            w = weights[f"layers.{i}.{_prefix(n)}{n}.weight"]
            q = quantize_int4_rtn(w, 32, symmetric=False)
            if detune:  # scales off by up to +-25%: something to repair
                g = torch.Generator().manual_seed(100 * i + k)
                q = dataclasses.replace(q, scales=q.scales * (1 + 0.5 * (torch.rand(
                    q.scales.shape, generator=g) - 0.5)))
            layer[n] = dataclasses.replace(q, pre_quant_scale=torch.ones(w.shape[1]))
        layers.append(layer)
    return layers


def _hf_kl(hf, layers, ids):
    """KL(float || quantized) per token, both from transformers' logits."""
    student = copy.deepcopy(hf)
    params = dict(student.named_parameters())
    with torch.no_grad():
        for i, layer in enumerate(layers):
            for n, q in layer.items():
                params[f"model.layers.{i}.{_prefix(n)}{n}.weight"].copy_(
                    q.dequantize(torch.float32))
        log_t = hf(input_ids=ids).logits.float().log_softmax(-1)
        log_s = student(input_ids=ids).logits.float().log_softmax(-1)
    return float(F.kl_div(log_s, log_t, log_target=True, reduction="sum") / ids.numel())


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_the_loss_is_the_kl_between_transformers_models(tmp_path, variant):
    hf, config, weights, norms, embedded, teacher, valid, ids = _setup(tmp_path, variant)
    start = _quantized(weights, config)
    result = distill_scales(config, weights["embed_tokens.weight"], weights["norm.weight"], norms,
                            start, embedded, teacher, valid,
                            DistillOptions(steps=3, lr=0.01, batch_windows=2, top_k=VOCAB))
    assert result.loss_before == pytest.approx(_hf_kl(hf, start, ids), rel=2e-3, abs=1e-7)
    # what it exports is what it scored
    assert result.loss_after == pytest.approx(_hf_kl(hf, result.layers, ids), rel=2e-3, abs=1e-7)


def test_distillation_repairs_detuned_scales_and_keeps_the_codes(tmp_path):
    hf, config, weights, norms, embedded, teacher, valid, ids = _setup(tmp_path, "gemma3-gqa",
                                                                      windows=4, length=16)
    start = _quantized(weights, config, detune=True)
    result = distill_scales(config, weights["embed_tokens.weight"], weights["norm.weight"], norms,
                            start, embedded, teacher, valid,
                            DistillOptions(steps=30, lr=0.02, batch_windows=2, eval_every=5,
                                           top_k=64))
    for before, after in zip(start, result.layers, strict=True):
        for n, q in after.items():
            assert torch.equal(q.qweight, before[n].qweight)
            assert torch.equal(q.zeros, before[n].zeros)
            assert q.scales.dtype == before[n].scales.dtype
        # shared inputs keep sharing one pre_quant_scale
        assert torch.equal(after["q_proj"].pre_quant_scale, after["k_proj"].pre_quant_scale)
        assert torch.equal(after["gate_proj"].pre_quant_scale, after["up_proj"].pre_quant_scale)
    assert result.loss_after < 0.7 * result.loss_before
    # the full-vocabulary KL follows the truncated one down
    assert _hf_kl(hf, result.layers, ids) < 0.8 * _hf_kl(hf, start, ids)


def test_distillation_never_returns_a_worse_model(tmp_path):
    """A learning rate far too large wrecks every step: the starting point must come back."""
    hf, config, weights, norms, embedded, teacher, valid, ids = _setup(tmp_path, "gemma2-gqa")
    start = _quantized(weights, config)
    result = distill_scales(config, weights["embed_tokens.weight"], weights["norm.weight"], norms,
                            start, embedded, teacher, valid,
                            DistillOptions(steps=4, lr=5.0, batch_windows=2, eval_every=2,
                                           top_k=VOCAB))
    assert result.loss_after <= result.loss_before
    assert _hf_kl(hf, result.layers, ids) <= _hf_kl(hf, start, ids) * 1.001


def test_distill_scales_rejects_mismatched_inputs(tmp_path):
    hf, config, weights, norms, embedded, teacher, valid, ids = _setup(tmp_path, "gemma1-mqa")
    start = _quantized(weights, config)
    args = (config, weights["embed_tokens.weight"], weights["norm.weight"])
    with pytest.raises(ValueError, match="do not match"):
        distill_scales(*args, norms, start, embedded, teacher[:, :-1], valid)
    with pytest.raises(ValueError, match="norm sets"):
        distill_scales(*args, norms[:-1], start, embedded, teacher, valid)
    with pytest.raises(ValueError, match="needs the linears"):
        distill_scales(*args, norms, [*start[:-1], {"q_proj": start[-1]["q_proj"]}], embedded,
                       teacher, valid)
