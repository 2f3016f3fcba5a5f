"""Per-sequence grammar state, and the token bitmask the sampler applies to a step's logits.

A constrained sequence holds a GrammarState (an xgrammar GrammarMatcher) from the moment it is
created; each sample of an n > 1 request forks its own. The engine advances it on every token it
appends, so whatever happens to the KV cache (preemption and recompute, prefix caching) the
state always matches the output tokens. Stop strings cut the text only, never the tokens.

Each step, ``mask_logits`` fills one bitmask row per constrained row (xgrammar, on the CPU) and
masks those rows of the [rows, vocab] logits in one op (xgrammar's kernel: C++ on CPU, Triton on
CUDA); unconstrained rows of the same step are not touched.
"""

from __future__ import annotations

import torch


class GrammarViolation(RuntimeError):
    """A token the grammar rejects was appended: the mask was not applied (a bug, never input)."""


class GrammarState:
    def __init__(self, matcher):
        self.matcher = matcher  # xgrammar.GrammarMatcher

    @classmethod
    def start(cls, compiled) -> GrammarState:
        """At the grammar's start, for a compiled grammar (xgrammar.CompiledGrammar)."""
        import xgrammar as xgr

        return cls(xgr.GrammarMatcher(compiled))

    def fork(self) -> GrammarState:
        """An independent copy at the same place (for a sibling sample)."""
        return GrammarState(self.matcher.fork())

    def accept(self, token: int) -> None:
        if not self.matcher.accept_token(token):
            raise GrammarViolation(f"token {token} was sampled but the grammar does not allow it "
                                   "here: the token bitmask was not applied")

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and a stop token was accepted: nothing more may follow."""
        return self.matcher.is_terminated()


def mask_logits(
    logits: torch.Tensor,  # [rows, vocab] float, masked in place
    rows: list[int],  # the constrained rows, ascending, unique
    states: list[GrammarState],  # the state of each of those rows
) -> None:
    """Set to -inf every logit of ``rows`` that the row's grammar forbids next."""
    import xgrammar as xgr

    vocab = logits.shape[1]
    bitmask = torch.empty((logits.shape[0], (vocab + 31) // 32), dtype=torch.int32)
    need = [row for row, state in zip(rows, states, strict=True)
            if state.matcher.fill_next_token_bitmask(bitmask, row)]
    if need:  # rows whose mask allows everything (rare) need nothing
        bitmask = bitmask.to(logits.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab, indices=need)


def unpack_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[rows, ceil(vocab / 32)] int32 -> [rows, vocab] bool, True = allowed (bit j % 32 of word
    j // 32, least significant first): the plain-torch definition the tests check against."""
    bits = (bitmask[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab].bool()
