"""Verification of draft tokens against the target's distributions (exact, greedy or sampled).

A sequence that speculates K drafts ``d_1 .. d_K`` gets K + 1 rows of target logits: row j was
computed with ``d_1 .. d_j`` appended, so it is the target's next-token distribution ``p_j`` after
them, processed exactly as the sampler would (penalties over the output including the drafts,
``min_tokens`` counted with them, temperature, top-k / top-p / min-p): ``RowView`` is the sequence
as row j sees it.

- Greedy rows: ``d_{j+1}`` is accepted while it equals row j's argmax; the first row whose argmax
  differs gives the correction, and when all K are accepted row K gives a bonus token. The tokens
  emitted are those plain greedy decoding emits.
- Random rows: rejection sampling (Leviathan et al. 2023; Chen et al. 2023). Draft ``x = d_{j+1}``,
  drawn from the proposer's ``q_j``, is accepted with probability ``min(1, p_j(x) / q_j(x))``; on
  rejection the token is drawn from ``norm(max(0, p_j - q_j))`` and verification stops; after K
  acceptances the bonus token is drawn from ``p_K``. Every emitted token is then distributed
  exactly as the target's own. N-gram drafts are point masses (``q_j(x) = 1``): accepted with
  probability ``p_j(x)``, the residual is ``p_j`` without x. Uniforms and draws come from the
  sequence's generator when seeded (reproducible), else from the sampler's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trt_gemma.runtime.sampler import Sampler, TokenLogprobs


class RowView:
    """A sequence as verification row j sees it: its tokens plus the first j drafts. Has what
    the sampler reads of a sequence (params, tokens, output count, generator, grammar)."""

    grammar = None  # constrained sequences never speculate
    watermark = None  # nor do watermarked ones (speculator.py)

    def __init__(self, seq, drafts: list[int]):
        self.seq = seq
        self.params = seq.params
        self.generator = seq.generator
        self.token_ids = seq.token_ids + drafts if drafts else seq.token_ids
        self.num_output_tokens = seq.num_output_tokens + len(drafts)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.seq.num_prompt_tokens:]


def row_views(seq) -> list[RowView]:
    """The K + 1 rows of a speculating sequence."""
    drafts = seq.spec_tokens
    return [RowView(seq, drafts[:j]) for j in range(len(drafts) + 1)]


def accept_greedy(drafts: list[int], targets: list[int]) -> list[int]:
    """Tokens greedy decoding emits: targets [K + 1] are the rows' argmaxes."""
    out = [targets[0]]
    for j, draft in enumerate(drafts):
        if draft != targets[j]:
            break
        out.append(targets[j + 1])
    return out


@dataclass
class Verified:
    tokens: list[int]  # emitted: the accepted drafts, then one correction or bonus token
    logprobs: list[TokenLogprobs | None]  # per emitted token
    num_accepted: int  # drafts accepted


def verify(sampler: Sampler, logits: torch.Tensor, seqs: list) -> list[Verified]:
    """Verify every speculating sequence of a step: logits [sum(K_i + 1), vocab] float32 (rows of
    each sequence consecutive, modified in place)."""
    views = [v for seq in seqs for v in row_views(seq)]
    rows = sampler.process(logits, views)
    random_index = {row: j for j, row in enumerate(rows.random_rows)}
    argmax = rows.argmax.tolist()
    chosen = list(argmax)  # per row: the token it emits (where it emits one)
    results, first = [], 0
    for seq in seqs:
        k = len(seq.spec_tokens)
        span = range(first, first + k + 1)
        if first not in random_index:
            tokens = accept_greedy(seq.spec_tokens, argmax[first:first + k + 1])
        else:
            probs = rows.probs[[random_index[r] for r in span]]  # [K + 1, vocab]
            tokens = _rejection_sample(sampler, seq, probs)
        for j, t in enumerate(tokens):
            chosen[first + j] = t
        results.append((seq, first, tokens))
        first += k + 1
    logprobs = rows.logprobs(chosen, views)
    return [Verified(tokens, logprobs[start:start + len(tokens)],
                     min(len(tokens) - 1, len(seq.spec_tokens)))
            for seq, start, tokens in results]


def _rejection_sample(sampler: Sampler, seq, probs: torch.Tensor) -> list[int]:
    """probs [K + 1, vocab]: the target's rows. Returns the emitted tokens."""
    drafts, q = seq.spec_tokens, seq.spec_probs  # q: [K, vocab] or None (point masses)
    gen = seq.generator if seq.generator is not None else sampler.generator
    uniforms = torch.rand(len(drafts), generator=gen, device=probs.device).tolist()
    out = []
    for j, x in enumerate(drafts):
        p_x = float(probs[j, x])
        q_x = 1.0 if q is None else float(q[j, x])
        if uniforms[j] * q_x < p_x:  # u < p(x) / q(x), without dividing by a zero q(x)
            out.append(x)
            continue
        if q is None:
            residual = probs[j].clone()
            residual[x] = 0.0
        else:
            residual = (probs[j] - q[j].to(probs.dtype)).clamp_(min=0.0)
        if not float(residual.sum()) > 0.0:  # p == q up to rounding: p itself is exact
            residual = probs[j]
        out.append(_draw(residual, gen))
        return out
    out.append(_draw(probs[len(drafts)], gen))  # every draft accepted: the bonus token
    return out


def _draw(weights: torch.Tensor, generator: torch.Generator) -> int:
    """One token from unnormalised weights [vocab], by the exponential race (as the sampler)."""
    noise = torch.empty_like(weights).exponential_(generator=generator)
    return int((weights / noise).argmax())
