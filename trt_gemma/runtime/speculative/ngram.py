"""N-gram prompt lookup: draft tokens copied from the sequence's own prompt and output.

vLLM's prompt-lookup semantics: the longest suffix of the tokens so far, between ``ngram_min`` and
``ngram_max`` tokens long, that also occurs earlier; the K tokens that followed its most recent
earlier occurrence are the proposal (fewer where the tokens end first). No second model: on
input-grounded text (quoting, editing, summarising a passage given in the prompt) the output keeps
repeating runs of the prompt, and those runs are what gets proposed.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def propose_ngram(tokens: np.ndarray, k: int, ngram_min: int, ngram_max: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix
    n-gram of tokens [L] (ngram_min <= n <= ngram_max); [] when no suffix n-gram recurs."""
    length = tokens.shape[0]
    if k <= 0:
        return []
    for n in range(min(ngram_max, length - 1), ngram_min - 1, -1):
        # windows starting at 0 .. L-n-1: every occurrence but the suffix itself
        windows = sliding_window_view(tokens[:-1], n)
        hits = np.flatnonzero((windows == tokens[length - n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n  # the most recent occurrence
            return tokens[start:start + k].tolist()
    return []


class NgramProposer:
    """Proposes for a batch of sequences; keeps each one's tokens as a growing numpy array, so a
    step converts only the tokens appended since the last one."""

    def __init__(self, ngram_min: int, ngram_max: int):
        self.ngram_min, self.ngram_max = ngram_min, ngram_max
        self._arrays: dict[int, tuple[np.ndarray, int]] = {}  # seq_id -> (buffer, tokens in it)

    def propose(self, seqs, ks: list[int]) -> None:
        for seq, k in zip(seqs, ks, strict=True):
            seq.spec_tokens = propose_ngram(self._tokens(seq), k, self.ngram_min, self.ngram_max)
            seq.spec_probs = None  # point masses

    def _tokens(self, seq) -> np.ndarray:
        n = seq.num_tokens
        buf, have = self._arrays.get(seq.seq_id, (None, 0))
        if buf is None or buf.shape[0] < n:
            grown = np.empty(max(2 * n, 64), dtype=np.int64)
            if buf is not None:
                grown[:have] = buf[:have]
            buf = grown
        buf[have:n] = seq.token_ids[have:n]
        self._arrays[seq.seq_id] = (buf, n)
        return buf[:n]

    def release(self, seq_ids) -> None:
        """Forget sequences that left the engine."""
        for seq_id in seq_ids:
            self._arrays.pop(seq_id, None)
