"""End-to-end distillation of INT4 scales: the whole quantized model against the float model.

``refine.py`` fits each decoder layer to the float layer's hidden states. Hidden-state error is
only a proxy: much of it lies in directions the LM head ignores, and layers cannot trade errors
with one another. This last stage tunes the same parameters (every layer's group scales and AWQ
input scales, codes fixed) of all layers at once for what the model is for, its next-token
distribution:

    min  KL( p_float(. | window) || p_quant(. | window) )   averaged over calibration tokens

``p`` is truncated to the float model's ``top_k`` tokens per position (the union over a batch,
renormalised on both sides): the LM head of a Gemma has 256k rows, and the mass outside the
teacher's top 64 is tiny while its logits would dominate the step's cost. The float model's
final hidden states come from ``LayerwiseRefiner`` (it has carried them up the layers already).
Adam with a small learning rate for ~90 steps (each window seen ~5 times on the bundled text);
the loss on all windows is checked every ``eval_every`` steps with the parameters rounded as the
engine stores them, and the best point is kept, the starting point included (never worse on
calibration data). Each layer's forward runs under activation checkpointing, so memory holds one
layer's dense weights and activations, not the whole model's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from trt_gemma import ops
from trt_gemma.config import GemmaConfig
from trt_gemma.kernels.gemm_w4a16 import Int4Weight
from trt_gemma.quant.refine import (
    LINEARS,
    Factors,
    fit_keeping_best,
    layer_weights,
    run_layer,
)


@dataclass(frozen=True)
class DistillOptions:
    steps: int = 90  # Adam steps over the whole model
    lr: float = 0.002  # on the log of the factors; decays linearly to 0
    batch_windows: int = 4  # calibration windows per step
    top_k: int = 64  # the float model's most likely tokens per position the KL is taken over
    eval_every: int = 30  # steps between full-calibration loss checks (best point kept)
    eval_windows: int = 4  # windows per forward in those checks (memory bound)
    seed: int = 0


@dataclass
class DistillResult:
    layers: list[dict[str, Int4Weight]]  # per layer, canonical linear name -> tuned weight
    loss_before: float  # truncated KL to the float model on all calibration tokens
    loss_after: float


def head_logits(config: GemmaConfig, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Logits of the tied head restricted to ``rows`` of it (Gemma 2's soft-cap applied)."""
    return ops.softcap(hidden @ rows.T, config.final_logit_softcapping)


def truncated_kl(config: GemmaConfig, embed: torch.Tensor, teacher: torch.Tensor,
                 student: torch.Tensor, top: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over valid positions of KL(teacher || student), both softmaxed over the union of
    ``top`` (token ids, [..., k]). ``teacher``/``student``: final-normed hidden states."""
    rows = embed[top[valid].unique()].float()
    log_t = head_logits(config, teacher[valid], rows).log_softmax(dim=-1)
    log_s = head_logits(config, student[valid], rows).log_softmax(dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(dim=-1).mean()


class _Student:
    """The quantized model as a differentiable function of the scale factors."""

    def __init__(self, config: GemmaConfig, norms: list[dict[str, torch.Tensor]],
                 layers: list[dict[str, Int4Weight]], final_norm: torch.Tensor):
        self.config, self.norms = config, norms
        self.factors = [Factors(layer) for layer in layers]
        self.final_norm = ops.norm_scale(final_norm.float())

    def parameters(self) -> list[torch.Tensor]:
        return [p for f in self.factors for p in f.parameters()]

    def _layer(self, i: int, x: torch.Tensor) -> torch.Tensor:
        w, ns = layer_weights(self.config, i, self.norms[i], self.factors[i].dense())
        return run_layer(self.config, i, w, ns, x)

    def final_hidden(self, x: torch.Tensor) -> torch.Tensor:  # embedded windows -> normed
        for i in range(len(self.factors)):
            if torch.is_grad_enabled():
                # Recomputed in backward: one layer's dense weights and activations live at a time.
                x = checkpoint(self._layer, i, x, use_reentrant=False)
            else:
                x = self._layer(i, x)
        return ops.rms_norm(x, self.final_norm, self.config.rms_norm_eps)


def distill_scales(
    config: GemmaConfig,
    embed: torch.Tensor,  # [vocab, hidden] the (tied) embedding = LM head
    final_norm: torch.Tensor,  # the model's final norm weight
    norms: list[dict[str, torch.Tensor]],  # per layer, its norm tensors (canonical names)
    layers: list[dict[str, Int4Weight]],  # per layer, its 7 linears by short name (LINEARS)
    embedded: torch.Tensor,  # [windows, length, hidden] the windows' scaled embeddings
    teacher_hidden: torch.Tensor,  # [windows, length, hidden] float model's last layer output
    valid: torch.Tensor,  # [windows, length] bool: real tokens (windows padded at the end)
    options: DistillOptions = DistillOptions(),
) -> DistillResult:
    """Tuned scales for every layer's INT4 weights (see the module docstring)."""
    if len(norms) != len(layers) or not layers:
        raise ValueError(f"distill_scales: {len(norms)} norm sets for {len(layers)} layers")
    for i, layer in enumerate(layers):
        if set(layer) != set(LINEARS):
            raise ValueError(f"distill_scales: layer {i} needs the linears {LINEARS}, "
                             f"got {sorted(layer)}")
    if not (embedded.shape == teacher_hidden.shape and embedded.shape[:2] == valid.shape):
        raise ValueError(f"distill_scales: embedded {list(embedded.shape)}, teacher "
                         f"{list(teacher_hidden.shape)} and valid {list(valid.shape)} do not "
                         "match")
    student = _Student(config, norms, layers, final_norm)
    embed = embed.to(embedded.device)
    with torch.no_grad():
        teacher = ops.rms_norm(teacher_hidden.float(), student.final_norm, config.rms_norm_eps)
        flat, head = teacher.reshape(-1, teacher.shape[-1]), embed.float()
        top = torch.cat([(h @ head.T).topk(options.top_k, dim=-1).indices
                         for h in flat.split(256)])  # [256, vocab] fp32 logits at a time
        del head
        top = top.view(*teacher.shape[:2], options.top_k)

    def loss_on(idx: torch.Tensor) -> torch.Tensor:
        hidden = student.final_hidden(embedded[idx].float())
        return truncated_kl(config, embed, teacher[idx], hidden, top[idx], valid[idx])

    def full_loss() -> float:
        with torch.no_grad():
            total = 0.0
            for idx in torch.arange(len(valid), device=valid.device).split(options.eval_windows):
                total += float(loss_on(idx)) * float(valid[idx].sum())
            return total / float(valid.sum())

    before, best = fit_keeping_best(student.parameters(), loss_on, full_loss,
                                    num_windows=len(valid), device=valid.device, options=options)
    return DistillResult([f.export() for f in student.factors], before, best)
