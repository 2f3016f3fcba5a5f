"""Speculator: which decoding sequences propose drafts this step, how many, and the counts.

The engine calls ``propose`` before scheduling (drafts land in ``seq.spec_tokens``; the scheduler
packs each speculating decode as 1 + K query tokens in the step's one forward) and ``record``
after verifying. K per sequence is capped so that no draft reaches past ``max_tokens`` or the
context, and, with ``speculative_adaptive``, follows its acceptance: after a rejection the next
proposal has one token more than were accepted, after a full acceptance K again. Steps with more
decoding sequences than ``speculative_disable_by_batch_size`` propose nothing. Sequences under a
grammar never speculate (their drafts would need the matcher rolled back: not worth it), nor
do watermarked ones: exactness would need verification under the watermarked distribution with a
WatermarkState per draft row (WatermarkState.along); plain decoding is the simple exact choice.
"""

from __future__ import annotations

from trt_gemma.runtime.config import EngineConfig


class Speculator:
    def __init__(self, config: EngineConfig, proposer, max_model_len: int):
        self.config = config
        self.proposer = proposer  # NgramProposer or DraftProposer: propose(seqs, ks), release
        self.max_model_len = max_model_len
        self.num_draft_tokens = 0  # totals since the engine started
        self.num_accepted_tokens = 0
        self.num_drafts = 0  # verifications (sequences x steps that checked drafts)
        self.accepted_per_position = [0] * config.num_speculative_tokens

    def propose(self, running: list) -> None:
        decoding = [s for s in running if s.num_uncomputed_tokens == 1]
        limit = self.config.speculative_disable_by_batch_size
        if not decoding or (limit and len(decoding) > limit):
            return
        seqs, ks = [], []
        for seq in decoding:
            k = self._k(seq)
            if k > 0 and seq.grammar is None and seq.watermark is None:
                seqs.append(seq)
                ks.append(k)
        if seqs:
            self.proposer.propose(seqs, ks)

    def _k(self, seq) -> int:
        k = self.config.num_speculative_tokens
        if self.config.speculative_adaptive and seq.spec_k:
            k = seq.spec_k
        left = min(seq.params.max_tokens - seq.num_output_tokens,
                   self.max_model_len - seq.num_tokens) - 1
        return max(0, min(k, left))

    def record(self, seq, num_drafts: int, num_accepted: int) -> None:
        """A verification of num_drafts drafts accepted num_accepted of them."""
        seq.num_draft_tokens += num_drafts
        seq.num_accepted_tokens += num_accepted
        seq.num_verifications += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        self.num_drafts += 1
        for j in range(num_accepted):
            self.accepted_per_position[j] += 1
        full = self.config.num_speculative_tokens
        seq.spec_k = full if num_accepted == num_drafts else min(full, num_accepted + 1)

    def release(self, seq_ids) -> None:
        self.proposer.release(seq_ids)
