"""Activation-aware weight quantization (AWQ, Lin et al. 2023) to group-wise INT4.

A few input channels of a linear carry activations far larger than the rest; their weights matter
most, yet RTN gives them the same coarse grid. AWQ multiplies input channel k of W by s_k > 1 before
quantizing (a finer relative grid for the salient columns) and divides x by s_k, so the product is
unchanged: ``x @ W.T = (x / s) @ (W * s).T ~ (x / s) @ Q(W * s).T``.

The search (as in llm-awq's ``auto_scale``): with per-channel statistics ``x_mean = mean|x|`` and
``w_mean`` (mean of |W| normalised by its group's max), try ``s = x_mean**a / w_mean**(1 - a)``
(``duo_scaling``; else ``x_mean**a``) for ``a = i / n_grid``, normalise s to geometric mid-range 1,
and keep the s minimising the output error ``|| X W.T - (X / s) Q(W * s).T ||^2`` on calibration
activations X. ``s = 1`` (plain RTN) is always a candidate, so on X AWQ is never worse than RTN.
Linears that read the same input (q/k/v, gate/up) share one s: pass them together.

Where 1/s goes: the ``Int4Weight`` keeps it as ``pre_quant_scale`` and the GEMM multiplies x by it
(one vector load per K tile; TensorRT-LLM's ``prequant_scaling_factor`` is the same thing). That
works for every linear, including o_proj, whose input under GQA cannot be rescaled per channel by
editing v_proj. For q/k/v and gate/up the converter may instead fold 1/s into the preceding Gemma
RMSNorm with ``fold_into_gemma_norm`` (the norm multiplies by ``1 + w``, so
``w' = (1 + w) / s - 1``) and drop the vector. llm-awq's clipping search (``auto_clip``) is in
``clip.py``; the converter's default codes on the AWQ grid come from GPTQ (``gptq.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from trt_gemma.kernels.gemm_w4a16 import Int4Weight
from trt_gemma.quant.int4 import _scale_dtype, fake_quantize_int4, quantize_int4_rtn

Weights = torch.Tensor | Sequence[torch.Tensor]


def _stack(weights: Weights, in_features: int) -> torch.Tensor:  # [sum(out), in] fp32
    ws = [weights] if isinstance(weights, torch.Tensor) else list(weights)
    if not ws:
        raise ValueError("awq: no weights given")
    for i, w in enumerate(ws):
        if w.dim() != 2 or w.shape[1] != in_features:
            raise ValueError(
                f"awq: weights[{i}] must be [out, {in_features}] (the activations' width), "
                f"got {list(w.shape)}"
            )
    # Groups never cross rows, so quantizing the stack equals quantizing each weight alone.
    return torch.cat([w.float() for w in ws], dim=0)


def _group_normalised_mean(w: torch.Tensor, group_size: int) -> torch.Tensor:  # [in]
    """Per input channel: mean over rows of |W| divided by its group's max |W|."""
    out, k = w.shape
    pad = -k % group_size
    a = torch.nn.functional.pad(w.abs(), (0, pad)).view(out, -1, group_size)
    a = a / (a.amax(dim=-1, keepdim=True) + 1e-6)
    return a.view(out, -1)[:, :k].mean(dim=0)


def awq_output_error(
    weights: Weights,
    input_activations: torch.Tensor,  # [n_tokens, in]
    scales: torch.Tensor | None,  # [in] AWQ s; None = plain RTN
    group_size: int = 128,
    *,
    symmetric: bool = True,
    scale_dtype: torch.dtype | None = None,
) -> float:
    """Relative output error ``||X W.T - X W_q.T|| / ||X W.T||`` of the quantized weight(s)."""
    x = input_activations.reshape(-1, input_activations.shape[-1]).float()
    w = _stack(weights, x.shape[1])
    ref = x @ w.T
    if scales is None:
        wq = fake_quantize_int4(w, group_size, symmetric=symmetric, scale_dtype=scale_dtype)
    else:
        s = scales.float()
        wq = fake_quantize_int4(w * s, group_size, symmetric=symmetric, scale_dtype=scale_dtype) / s
    return float((x @ wq.T - ref).norm() / ref.norm().clamp(min=1e-30))


def awq_search_scales(
    weights: Weights,  # one [out, in] weight, or several sharing the same input
    input_activations: torch.Tensor,  # [n_tokens, in] calibration inputs of those linears
    group_size: int = 128,
    n_grid: int = 20,
    *,
    symmetric: bool = True,
    duo_scaling: bool = True,
    scale_dtype: torch.dtype | None = None,
) -> torch.Tensor:  # [in] fp32, s > 0
    """The per-input-channel AWQ scale s (weights are multiplied by s, activations divided).

    Cost: ``n_grid + 1`` fake quantizations and matmuls of ``[n_tokens, in] x [in, sum(out)]`` in
    fp32 on the tensors' device; a few hundred to a few thousand tokens are plenty.
    """
    if n_grid < 1:
        raise ValueError(f"awq_search_scales: n_grid must be >= 1, got {n_grid}")
    x = input_activations.reshape(-1, input_activations.shape[-1]).float()
    if x.shape[0] == 0:
        raise ValueError("awq_search_scales: input_activations has no tokens")
    w = _stack(weights, x.shape[1])
    ref = x @ w.T  # [n_tokens, sum(out)]
    x_mean = x.abs().mean(dim=0)  # [in]
    w_mean = _group_normalised_mean(w, group_size)  # [in]

    def loss(s: torch.Tensor) -> float:
        wq = fake_quantize_int4(w * s, group_size, symmetric=symmetric, scale_dtype=scale_dtype)
        return float((x @ (wq / s).T - ref).pow(2).mean())

    best_s = torch.ones_like(x_mean)
    best = loss(best_s)  # plain RTN: AWQ keeps it unless a scaling beats it
    for i in range(n_grid):
        a = i / n_grid
        s = x_mean.pow(a) / (w_mean.pow(1 - a) + 1e-4) if duo_scaling else x_mean.pow(a)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()  # geometric mid-range 1: keeps W * s well scaled
        err = loss(s)
        if err < best:
            best, best_s = err, s
    return best_s


def quantize_int4_awq(
    weight: torch.Tensor,  # [out, in] float
    input_activations: torch.Tensor | None = None,  # [n_tokens, in]; needed unless scales given
    group_size: int = 128,
    *,
    scales: torch.Tensor | None = None,  # [in] s from awq_search_scales (shared by a q/k/v group)
    symmetric: bool = True,
    n_grid: int = 20,
    scale_dtype: torch.dtype | None = None,
) -> Int4Weight:
    """INT4 of ``W * s`` with ``pre_quant_scale = 1 / s`` (stored in the scale dtype).

    The GEMM multiplies x by the stored (rounded) 1/s, so W is scaled by the reciprocal of that
    stored value, not by the unrounded s: the only error left is the INT4 grid's.
    """
    if scales is None:
        if input_activations is None:
            raise ValueError("quantize_int4_awq: give input_activations or scales")
        scales = awq_search_scales(weight, input_activations, group_size, n_grid,
                                   symmetric=symmetric, scale_dtype=scale_dtype)
    if scales.shape != (weight.shape[1],):
        raise ValueError(
            f"quantize_int4_awq: scales must be [{weight.shape[1]}], got {list(scales.shape)}"
        )
    pre_quant_scale = (1.0 / scales.float()).to(_scale_dtype(weight, scale_dtype))
    scaled = weight.float() / pre_quant_scale.float()[None, :]  # = W * s
    rtn = quantize_int4_rtn(scaled, group_size, symmetric=symmetric,
                            scale_dtype=_scale_dtype(weight, scale_dtype))
    return dataclasses.replace(rtn, pre_quant_scale=pre_quant_scale)


def fold_into_gemma_norm(
    norm_weight: torch.Tensor,  # [in] Gemma RMSNorm weight (the norm multiplies by 1 + w)
    weights: Sequence[Int4Weight],  # the linears that read this norm's output, sharing one s
) -> tuple[torch.Tensor, list[Int4Weight]]:
    """Move a shared ``pre_quant_scale`` (1/s) into the preceding Gemma RMSNorm.

    ``(1 + w') = (1 + w) * pre_quant_scale``, computed in fp32 and returned in the norm's dtype;
    the weights come back without their vector, so the GEMM skips the multiply.
    """
    if not weights:
        raise ValueError("fold_into_gemma_norm: no weights given")
    pqs = weights[0].pre_quant_scale
    if pqs is None:
        raise ValueError("fold_into_gemma_norm: weights[0] has no pre_quant_scale")
    for i, w in enumerate(weights):
        if w.pre_quant_scale is None or not torch.equal(w.pre_quant_scale, pqs):
            raise ValueError(f"fold_into_gemma_norm: weights[{i}] has a different pre_quant_scale")
    if norm_weight.shape != pqs.shape:
        raise ValueError(f"fold_into_gemma_norm: norm_weight must be {list(pqs.shape)}, got "
                         f"{list(norm_weight.shape)}")
    folded = (1.0 + norm_weight.float()) * pqs.float() - 1.0
    return folded.to(norm_weight.dtype), [
        dataclasses.replace(w, pre_quant_scale=None) for w in weights
    ]
