"""SynthID-Text detection: the weighted mean g-value score and its p-value.

Scoring follows the reference (transformers' processor helpers plus synthid-text's
``detector_mean.weighted_mean_score``, as its Hugging Face notebook combines them):
- the g-values of every n-gram of the text (``Watermarker.g_values``), one per n-gram end
  position and depth;
- masked out: n-grams whose context (the ngram_len - 1 tokens before the scored one) repeats one
  of the previous ``context_history_size`` contexts (the history starts full of zero hashes), and
  every position from the first end-of-sequence token on (the reference masks from the first
  ``eos_token_id``; we accept a set, e.g. Gemma's ``<eos>`` and ``<end_of_turn>``);
- score = sum over unmasked positions and depths of ``w_d * g`` / (depth * unmasked positions),
  with ``w = linspace(10, 1, depth)`` normalised to sum to depth (earlier layers carry more
  signal).

The p-value tests H0 "not watermarked with this config": then every scored g-value is a fresh
hash into the sampling table, so the g-values are i.i.d. Bernoulli(q) with q the table's fraction
of ones (0.5 up to the table's sampling noise: we use the exact fraction, e.g. 0.4996 for seed 0,
size 2^16). The weighted mean S has mean q and variance q(1-q) * sum(w_d^2) / (depth^2 * N) for N
scored positions; the p-value is the one-sided normal tail P(Z >= (S - q) / sd). The normal
approximation is good once N * depth is a few hundred; below ~10 scored tokens treat it as rough.
A watermark raises S; human text, other models' text and paraphrase leave S near q.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch

from trt_gemma.responsible.synthid import LCG_MULTIPLIER, Watermarker


@dataclass(frozen=True)
class DetectionResult:
    score: float  # weighted mean g-value (0.5-ish unwatermarked, higher when watermarked)
    mean_score: float  # unweighted mean of the same g-values
    num_scored_tokens: int  # positions whose g-values entered the score
    z_score: float  # (score - null mean) / null standard deviation
    p_value: float  # one-sided, under the unwatermarked null (see the module docstring)

    def to_dict(self) -> dict:
        return asdict(self)


def default_weights(depth: int) -> torch.Tensor:
    """linspace(10, 1, depth) normalised to sum to depth, float64."""
    w = torch.linspace(10, 1, depth, dtype=torch.float64)
    return w * (depth / w.sum())


def weighted_mean_score(g_values: torch.Tensor, mask: torch.Tensor,
                        weights: torch.Tensor | None = None) -> torch.Tensor:
    """[B] scores of g_values [B, N, depth] under mask [B, N] (the reference's formula)."""
    depth = g_values.shape[-1]
    w = default_weights(depth) if weights is None else weights.to(torch.float64)
    g = g_values.to(torch.float64) * w[None, None, :]
    m = mask.to(torch.float64)
    return (g * m[:, :, None]).sum(dim=(1, 2)) / (depth * m.sum(dim=1))


def context_repetition_mask(watermarker: Watermarker, token_ids: torch.Tensor) -> torch.Tensor:
    """[B, L - ngram_len + 1] bool, True where the n-gram's context is new (scored), False where
    it repeats one of the last context_history_size contexts, as the reference's sequential
    FIFO computes it; vectorised with a stable sort per row."""
    n = watermarker.config.ngram_len
    history = watermarker.config.context_history_size
    ids = token_ids.to(torch.int64)
    num = ids.shape[1] - n + 1
    if num <= 0:
        return torch.zeros(ids.shape[0], 0, dtype=torch.bool)
    h = torch.ones(ids.shape[0], num, dtype=torch.int64)
    for i in range(n - 1):
        h = (h + ids[:, i:i + num]) * LCG_MULTIPLIER + 1
    positions = torch.arange(num)
    fresh = torch.empty(ids.shape[0], num, dtype=torch.bool)
    for b in range(ids.shape[0]):
        order = torch.sort(h[b], stable=True).indices  # equal hashes stay in position order
        sorted_h = h[b][order]
        previous = torch.full((num,), -(history + 1) - num, dtype=torch.int64)
        same = sorted_h[1:] == sorted_h[:-1]
        previous[order[1:][same]] = order[:-1][same]
        repeated = (positions - previous) <= history
        # The history starts as context_history_size zero hashes, pushed out one per context.
        repeated |= (h[b] == 0) & (positions < history)
        fresh[b] = ~repeated
    return fresh


def eos_mask(token_ids: torch.Tensor, eos_token_ids: Iterable[int]) -> torch.Tensor:
    """[B, L] bool, False from each row's first end-of-sequence token on."""
    eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.int64)
    is_eos = torch.isin(token_ids.to(torch.int64), eos) if eos.numel() else \
        torch.zeros_like(token_ids, dtype=torch.bool)
    return is_eos.cumsum(dim=1) == 0


def score_tokens(watermarker: Watermarker, token_ids: torch.Tensor,
                 eos_token_ids: Iterable[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """(g-values [B, N, depth], mask [B, N]) of token_ids [B, L], N = L - ngram_len + 1."""
    n = watermarker.config.ngram_len
    g = watermarker.g_values(token_ids).cpu()
    mask = context_repetition_mask(watermarker, token_ids.cpu())
    mask &= eos_mask(token_ids.cpu(), eos_token_ids)[:, n - 1:]
    return g, mask


def detect(watermarker: Watermarker, token_ids: Sequence[int],
           eos_token_ids: Iterable[int] = ()) -> DetectionResult:
    """Score one token sequence (the generated tokens only, without the prompt)."""
    ids = torch.tensor([list(token_ids)], dtype=torch.int64).reshape(1, -1)
    g, mask = score_tokens(watermarker, ids, eos_token_ids)
    num = int(mask.sum())
    depth = watermarker.config.depth
    q = float(watermarker.sampling_table.double().mean())
    if num == 0:
        return DetectionResult(score=float("nan"), mean_score=float("nan"), num_scored_tokens=0,
                               z_score=0.0, p_value=1.0)
    score = float(weighted_mean_score(g, mask)[0])
    mean = float(g[mask].double().mean())
    w = default_weights(depth)
    sd = math.sqrt(q * (1 - q) * float((w * w).sum()) / (depth * depth * num))
    z = (score - q) / sd
    p_value = 0.5 * math.erfc(z / math.sqrt(2))
    return DetectionResult(score=score, mean_score=mean, num_scored_tokens=num, z_score=z,
                           p_value=p_value)
