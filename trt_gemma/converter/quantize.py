"""Turn canonical dense tensors into the tensors an engine stores, one decoder layer at a time.

``quantize_tensors`` is a generator (the engine writer streams it to disk), filling a
``QuantReport`` as it goes: per group of linears the range of the scales it chose and, for AWQ,
the relative output error on the calibration activations of plain RTN, of AWQ (the scale, RTN
codes) and of AWQ + GPTQ (what is stored), so the summary shows what each step bought.

Per mode (weights of one group share their input, hence one AWQ ``s`` and one activation scale):

- ``fp8``: per-output-channel E4M3 weights with a static per-tensor input scale
  ``amax(|x|) / 448`` from calibration (what TensorRT-LLM's FP8 GEMM and ``torch._scaled_mm`` take).
- ``int4``: group-wise INT4 with zero points by round-to-nearest; no calibration.
- ``int4-awq``: INT4 (zero points) of ``W * s`` with ``pre_quant_scale = 1 / s``: the scale
  from ``awq_search_scales`` (llm-awq's auto_scale, judged by output error on the calibration
  inputs), then RTN's per-group grid of ``W * s`` and, on that fixed grid, the codes by GPTQ's
  error-compensated rounding (``quant/gptq.py``) with the Hessian ``X'.T X'`` of the AWQ-scaled
  inputs ``X' = X / s`` over all calibration tokens. With ``INT4_AWQ_GPTQ = False`` the previous
  method: each group's range from ``search_clip`` (llm-awq's auto_clip), RTN codes. Then, layer by
  layer, the group scales and AWQ input scales are refined (``quant/refine.py``): fitted so that
  the quantized layer, fed the quantized model's hidden states, reproduces the float layer's
  output on the calibration windows; last, all layers' scales at once, to the float model's
  next-token distribution (``quant/distill.py``; the linears are held until then). Codes stay
  GPTQ's.

Embeddings and norms stay dense in the activation dtype. The LM head (tied to the embedding on
every Gemma) is quantized only with ``quantize_lm_head``; it then becomes a separate
``lm_head.weight`` and the engine's config is untied. Its INT4 is always RTN: AWQ's search would
multiply calibration activations by a vocabulary-sized matrix 21 times.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from trt_gemma.config import GemmaConfig, QuantConfig
from trt_gemma.errors import CheckpointError
from trt_gemma.quant import (
    awq_search_scales,
    fp8_activation_scale,
    kv_cache_scale,
    quantize_fp8,
    quantize_int4_rtn,
)
from trt_gemma.quant.calibrate import CalibrationStats, LinearGroup, linear_groups
from trt_gemma.quant.clip import search_clip
from trt_gemma.quant.gptq import quantize_int4_gptq, scale_hessian, split_int4_rows
from trt_gemma.quant.distill import DistillOptions, distill_scales
from trt_gemma.quant.refine import LayerwiseRefiner, RefineOptions

AWQ_GRID = 20  # llm-awq's n_grid
# INT4 with zero points (asymmetric), llm-awq's default: on Gemma 3 270M it cuts the perplexity
# cost of RTN and AWQ against symmetric INT4 by a third to a half (docs/quantization.md).
INT4_SYMMETRIC = False
# GPTQ codes on the AWQ grid for int4-awq (docs/quantization.md has the measured gain).
INT4_AWQ_GPTQ = True
# Columns by descending diag(H) (static grid, codes stay in place: same format).
GPTQ_ACT_ORDER = True
# Layer i's statistics re-collected with layers < i already quantized (GPTQ's sequential mode).
# Off: on Gemma 3 270M it moved perplexity within noise (docs/quantization.md) for 3.5x the
# quantization time (one forward pass of the first i + 1 layers per layer).
GPTQ_SEQUENTIAL = False
# Damping, as a fraction of mean(diag H). Not GPTQ's usual 0.01: with a few thousand calibration
# tokens against inputs up to 2048 wide, small damping fits the calibration text and loses on
# other text. 0.3 was chosen on a validation split of the bundled calibration data (calibrate on
# calibration_more.txt, score calibration.txt: 0.1 -> 41.42, 0.3 -> 41.34, 1.0 -> 41.57 ppl);
# docs/quantization.md. Re-checked on today's ~34k tokens (0.03 / 0.1 / 0.3 / 1.0 on four
# texts): no setting won on every text, so 0.3 stays.
GPTQ_DAMP = 0.3


def needs_calibration(quant: QuantConfig) -> bool:
    return quant.mode in ("fp8", "int4-awq") or quant.kv_cache_dtype == "fp8"


@dataclass
class GroupReport:
    group: str
    layer: int | None
    scale_min: float  # smallest / largest weight scale (fp8: per channel; int4: per group)
    scale_max: float
    input_scale: float | None = None  # fp8 static activation scale
    awq_s_min: float | None = None  # AWQ s = 1 / pre_quant_scale
    awq_s_max: float | None = None
    rtn_error: float | None = None  # relative output error on calibration rows, RTN
    awq_error: float | None = None  # ... with the AWQ scale (+ clip without GPTQ), RTN codes
    gptq_error: float | None = None  # ... and with GPTQ codes on that grid (what is stored)


@dataclass
class QuantReport:
    groups: list[GroupReport] = field(default_factory=list)
    k_scales: list[float] = field(default_factory=list)
    v_scales: list[float] = field(default_factory=list)
    # int4-awq refinement, per layer: the layer's output MSE on calibration windows before/after
    refine_loss: list[tuple[float, float]] = field(default_factory=list)
    # then the whole model's truncated KL to the float model on calibration tokens, before/after
    distill_loss: tuple[float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"groups": [vars(g) for g in self.groups], "k_scales": self.k_scales,
                "v_scales": self.v_scales, "refine_loss": self.refine_loss,
                "distill_loss": self.distill_loss}

    def per_layer_lines(self) -> list[str]:
        """One summary line per layer: scale ranges, AWQ s range and error, KV scales."""
        by_layer: dict[Any, list[GroupReport]] = {}
        for g in self.groups:
            by_layer.setdefault(g.layer, []).append(g)
        lines = []
        for layer, groups in by_layer.items():
            name = "lm_head" if layer is None else f"layer {layer:>3}"
            parts = [f"w-scale {min(g.scale_min for g in groups):.2e}.."
                     f"{max(g.scale_max for g in groups):.2e}"]
            xs = [g.input_scale for g in groups if g.input_scale is not None]
            if xs:
                parts.append(f"x-scale {min(xs):.2e}..{max(xs):.2e}")
            ss = [g for g in groups if g.awq_s_min is not None]
            if ss:
                parts.append(f"awq s {min(g.awq_s_min for g in ss):.2f}.."
                             f"{max(g.awq_s_max for g in ss):.2f}")
                rtn = sum(g.rtn_error for g in ss) / len(ss)
                awq = sum(g.awq_error for g in ss) / len(ss)
                err = f"out-err rtn {rtn:.4f} -> awq {awq:.4f}"
                gq = [g.gptq_error for g in ss if g.gptq_error is not None]
                if gq:
                    err += f" -> awq+gptq {sum(gq) / len(gq):.4f}"
                parts.append(err)
            if layer is not None and layer < len(self.refine_loss):
                before, after = self.refine_loss[layer]
                parts.append(f"refine mse {before:.3g} -> {after:.3g}")
            if layer is not None and self.k_scales:
                parts.append(f"kv {self.k_scales[layer]:.2e}/{self.v_scales[layer]:.2e}")
            lines.append(f"{name}: " + ", ".join(parts))
        return lines


def _check_finite(name: str, t: torch.Tensor, source: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise CheckpointError(f"{source}: tensor {name} holds NaN or Inf values "
                              "(corrupted checkpoint?)")


def _output_error(ws: list[torch.Tensor], qs: list[Any], x: torch.Tensor) -> float:
    """``||X W.T - X Wq.T|| / ||X W.T||`` over a group's calibration rows."""
    w = torch.cat([t.float() for t in ws])
    wq = torch.cat([q.dequantize(torch.float32) for q in qs])
    ref = x @ w.T
    return float((x @ wq.T - ref).norm() / ref.norm().clamp(min=1e-30))


def _quantize_group(group: LinearGroup, ws: list[torch.Tensor], quant: QuantConfig,
                    stats: CalibrationStats | None, dtype: torch.dtype,
                    report: QuantReport, device: torch.device) -> list[Any]:
    """Quantize one group's weights; the math runs on ``device``, results come back on CPU."""
    ws = [w.to(device) for w in ws]
    out = _quantize_on_device(group, ws, quant, stats, dtype, report)
    return [q.to("cpu") for q in out]


def _quantize_on_device(group: LinearGroup, ws: list[torch.Tensor], quant: QuantConfig,
                        stats: CalibrationStats | None, dtype: torch.dtype,
                        report: QuantReport) -> list[Any]:
    mode, gs, device = quant.mode, quant.group_size, ws[0].device
    if mode == "fp8":
        xs = fp8_activation_scale(stats.inputs[group.name].amax)
        out = [quantize_fp8(w, per_channel=True, input_scale=xs) for w in ws]
        scales = torch.cat([q.weight_scale.flatten() for q in out])
        report.groups.append(GroupReport(group.name, group.layer, float(scales.min()),
                                         float(scales.max()), input_scale=xs))
        return out
    awq = mode == "int4-awq" and group.name != "lm_head"
    gptq = awq and INT4_AWQ_GPTQ
    if awq:
        inputs = stats.inputs[group.name]
        x = inputs.activations().to(device)
        s = awq_search_scales(ws, x, gs, AWQ_GRID, symmetric=INT4_SYMMETRIC, scale_dtype=dtype)
        # The GEMM multiplies x by the stored (rounded) 1/s: scale W by exactly its reciprocal.
        pqs = (1.0 / s).to(dtype)
        s = 1.0 / pqs.float()
        if gptq:  # all tokens' x.T x when calibration kept it, else the sampled rows'
            h = inputs.xtx.to(device) if inputs.xtx is not None else x.T @ x
            h = scale_hessian(h, s)
        # GPTQ takes the unclipped grid: the clip search is tuned for RTN codes and, under GPTQ,
        # raised both the output error and the perplexity (docs/quantization.md).
        scaled = [w.float() * s if gptq else
                  search_clip(w.float() * s, x / s, gs, symmetric=INT4_SYMMETRIC,
                              scale_dtype=dtype) for w in ws]
        awq_rtn = [dataclasses.replace(quantize_int4_rtn(c, gs, symmetric=INT4_SYMMETRIC,
                                                         scale_dtype=dtype), pre_quant_scale=pqs)
                   for c in scaled]
        out = awq_rtn
        if gptq:  # one sweep over the group's stacked rows: they share the input, hence H
            q = quantize_int4_gptq(torch.cat(scaled), h, gs, symmetric=INT4_SYMMETRIC,
                                   scale_dtype=dtype, damp=GPTQ_DAMP,
                                   act_order=GPTQ_ACT_ORDER)
            out = [dataclasses.replace(r, pre_quant_scale=pqs)
                   for r in split_int4_rows(q, [w.shape[0] for w in ws])]
    else:
        out = [quantize_int4_rtn(w, gs, symmetric=INT4_SYMMETRIC, scale_dtype=dtype) for w in ws]
    scales = torch.cat([q.scales.float().flatten() for q in out])
    rep = GroupReport(group.name, group.layer, float(scales.min()), float(scales.max()))
    if awq:
        rep.awq_s_min, rep.awq_s_max = float(s.min()), float(s.max())
        rtn = [quantize_int4_rtn(w, gs, symmetric=INT4_SYMMETRIC, scale_dtype=dtype) for w in ws]
        rep.rtn_error = _output_error(ws, rtn, x)
        rep.awq_error = _output_error(ws, awq_rtn, x)
        if gptq:
            rep.gptq_error = _output_error(ws, out, x)
    report.groups.append(rep)
    return out


def _recalibrate(config: GemmaConfig, weights: dict[str, Any], stats: CalibrationStats,
                 groups: list[LinearGroup], layer: int, device: torch.device) -> CalibrationStats:
    """Statistics of ``groups`` (all in ``layer``) from the model's first ``layer + 1`` layers on
    the calibration windows, with whatever (dequantized) weights ``weights`` holds."""
    from trt_gemma.quant.calibrate import calibrate

    sub = dataclasses.replace(config, num_hidden_layers=layer + 1,
                              layer_types=config.layer_types[:layer + 1])
    return calibrate(sub, weights, stats.windows, groups=groups, max_rows=stats.max_rows,
                     hessians=stats.hessians, dtype=stats.dtype, device=device)


def quantize_tensors(
    config: GemmaConfig,
    weights: dict[str, torch.Tensor],  # canonical dense tensors; entries are popped as emitted
    quant: QuantConfig,
    stats: CalibrationStats | None,
    dtype: torch.dtype,
    report: QuantReport,
    *,
    source: str = "checkpoint",
    on_layer: Callable[[], None] | None = None,
    device: str | torch.device = "cpu",  # where the quantization math (AWQ, clip search) runs
    refine: RefineOptions | None = None,  # int4-awq: fit scales to the float layers (refine.py)
    distill: DistillOptions | None = None,  # then to the float model's outputs (distill.py)
) -> Iterator[tuple[str, Any]]:
    """(name, tensor | Int4Weight | Fp8Weight) for the engine, in model order.

    With ``quantize_lm_head`` on a tied model the caller must write the config untied (see
    ``output_config``).
    """
    if needs_calibration(quant) and stats is None:
        raise ValueError(f"quant mode {quant.mode!r} / kv {quant.kv_cache_dtype!r} needs "
                         "calibration statistics")
    lm_head = quant.quantize_lm_head and quant.mode != "none"
    groups = linear_groups(config, lm_head=lm_head)
    device = torch.device(device)

    def dense(name: str) -> torch.Tensor:
        t = weights.pop(name)
        _check_finite(name, t, source)
        return t.to(dtype)

    embed = weights.pop("embed_tokens.weight")
    _check_finite("embed_tokens.weight", embed, source)
    yield "embed_tokens.weight", embed.to(dtype)
    sequential = (quant.mode == "int4-awq" and INT4_AWQ_GPTQ and GPTQ_SEQUENTIAL
                  and stats is not None and bool(stats.windows))
    model_weights = {**weights, "embed_tokens.weight": embed} if sequential else None
    refiner = None
    if quant.mode == "int4-awq" and refine is not None and stats is not None and stats.windows:
        refiner = LayerwiseRefiner(config, embed, stats.windows, refine, device)
    # Distillation tunes all layers at once, so their linears are held until the last layer.
    distill_layers = [] if refiner is not None and distill is not None else None
    for i in range(config.num_hidden_layers):
        p = f"layers.{i}."
        layer_groups = [g for g in groups if g.layer == i]
        layer_stats = stats
        if sequential and i > 0:
            layer_stats = _recalibrate(config, model_weights, stats, layer_groups, i, device)
        grouped = {n for g in layer_groups for n in g.weights}
        norms = {}
        for name in sorted(n for n in weights if n.startswith(p) and n not in grouped):
            norms[name] = weights[name]
            yield name, dense(name)  # norms
        if quant.mode == "none":
            for group in layer_groups:
                for name in group.weights:
                    yield name, dense(name)
        else:
            dense_ws, quantized = {}, {}
            for group in layer_groups:
                ws = [weights.pop(n) for n in group.weights]
                for n, w in zip(group.weights, ws):
                    _check_finite(n, w, source)
                qs = _quantize_group(group, ws, quant, layer_stats, dtype, report, device)
                dense_ws.update(zip(group.weights, ws))
                quantized.update(zip(group.weights, qs))
            if refiner is not None:
                quantized = _refine(refiner, i, norms, dense_ws, quantized, report)
            if sequential:
                for n, q in quantized.items():
                    model_weights[n] = q.dequantize(torch.float32)
            if distill_layers is not None:
                distill_layers.append((norms, quantized))  # emitted once the model is tuned
            else:
                yield from quantized.items()
        if quant.kv_cache_dtype == "fp8":
            k, v = float(kv_cache_scale(stats.k_amax[i])), float(kv_cache_scale(stats.v_amax[i]))
            report.k_scales.append(k)
            report.v_scales.append(v)
            yield p + "self_attn.k_scale", torch.tensor(k, dtype=torch.float32)
            yield p + "self_attn.v_scale", torch.tensor(v, dtype=torch.float32)
        if on_layer is not None:
            on_layer()
    if distill_layers is not None:
        yield from _distill(config, refiner, embed, weights["norm.weight"], distill_layers,
                            distill, report)
    yield "norm.weight", dense("norm.weight")
    head = weights.pop("lm_head.weight", embed)  # untied checkpoints carry their own head
    if lm_head:
        _check_finite("lm_head.weight", head, source)
        (q,) = _quantize_group(groups[-1], [head], quant, stats, dtype, report, device)
        yield "lm_head.weight", q
    elif not config.tie_word_embeddings:
        _check_finite("lm_head.weight", head, source)
        yield "lm_head.weight", head.to(dtype)


def _short(name: str) -> str:
    """The refit modules' name of a linear: "layers.3.self_attn.q_proj.weight" -> "q_proj"."""
    return name.split(".")[-2]


def _refine(refiner: LayerwiseRefiner, layer: int, norms: dict[str, torch.Tensor],
            dense: dict[str, torch.Tensor], quantized: dict[str, Any],
            report: QuantReport) -> dict[str, Any]:
    """Run the layer's refinement; canonical names in and out (the refiner uses short ones)."""
    result = refiner.refine(layer, norms, {_short(n): w for n, w in dense.items()},
                            {_short(n): q for n, q in quantized.items()})
    report.refine_loss.append((result.loss_before, result.loss_after))
    return {n: result.weights[_short(n)].to("cpu") for n in quantized}


def _distill(config: GemmaConfig, refiner: LayerwiseRefiner, embed: torch.Tensor,
             final_norm: torch.Tensor, layers: list[tuple[dict[str, torch.Tensor], dict[str, Any]]],
             options: DistillOptions, report: QuantReport) -> Iterator[tuple[str, Any]]:
    """Every layer's linears, tuned by ``distill_scales`` (canonical names out)."""
    device = refiner.embedded.device
    result = distill_scales(
        config, embed.to(device), final_norm.to(device),
        [{n: t.to(device).float() for n, t in norms.items()} for norms, _ in layers],
        [{_short(n): q.to(device) for n, q in quantized.items()} for _, quantized in layers],
        refiner.embedded, refiner.float_hidden, refiner.valid, options)
    report.distill_loss = (result.loss_before, result.loss_after)
    for (_, quantized), tuned in zip(layers, result.layers, strict=True):
        for name in quantized:
            yield name, tuned[_short(name)].to("cpu")


def output_config(config: GemmaConfig, quant: QuantConfig) -> GemmaConfig:
    """The engine's config: untied when the LM head is quantized apart from the embedding."""
    if quant.quantize_lm_head and quant.mode != "none" and config.tie_word_embeddings:
        return dataclasses.replace(config, tie_word_embeddings=False)
    return config
