"""Draft-model proposals: a second, cheaper Gemma with the same vocabulary guesses K tokens.

The draft keeps its own paged KV cache, run by its own ``BlockManager`` and ``ModelRunner`` under
the same rules as the target's (block size, prefix cache, per-window pools), with a full pool of
as many blocks as the target's. Each target sequence has a *shadow* sequence in it. A proposal
round, batched over the proposing sequences:

1. catch up: the shadow's uncomputed tokens (the whole prompt the first time, else the tokens
   the target emitted since) run as one chunk; its last row gives draft 1;
2. K - 1 decode steps, each appending the previous draft;
3. roll back: the shadow keeps the KV of the target's real tokens only (its drafts' slots are
   given back), so prefix hashes never cover an unverified token.

Greedy sequences take the draft's argmax (verification needs no q); random ones draw from the
draft's distribution processed as the target's sampler would (``q``), kept for rejection sampling.
A shadow that cannot get blocks simply does not propose this step.
"""

from __future__ import annotations

import torch

from trt_gemma.runtime.block_manager import BlockManager, plan_groups
from trt_gemma.runtime.config import EngineConfig
from trt_gemma.runtime.model_runner import ModelRunner
from trt_gemma.runtime.scheduler import SchedulerOutput
from trt_gemma.runtime.sequence import Sequence
from trt_gemma.runtime.speculative.verify import RowView


class DraftProposer:
    def __init__(self, draft_model, kv_dtype: torch.dtype, config: EngineConfig,
                 num_full_blocks: int, max_model_len: int, sampler):
        mc = draft_model.config
        self.model = draft_model
        self.sampler = sampler  # the target's: its process() and generators
        per_layer = 2 * config.block_size * mc.kv_size * kv_dtype.itemsize
        groups = plan_groups(mc, per_layer, 0, config.block_size, config.max_num_seqs,
                             config.max_num_batched_tokens, num_full_blocks)
        self.block_manager = BlockManager(groups, config.block_size,
                                          config.enable_prefix_caching)
        self.runner = ModelRunner(draft_model, self.block_manager, kv_dtype, True, (),
                                  max_model_len, 0, 0, config.max_num_seqs,
                                  config.max_num_batched_tokens)
        self.shadows: dict[int, Sequence] = {}  # target seq_id -> its shadow

    def _shadow(self, seq: Sequence) -> Sequence:
        shadow = self.shadows.get(seq.seq_id)
        if shadow is None:
            shadow = Sequence(seq.seq_id, seq.request_id, seq.index, [], seq.params,
                              seq.arrival, len(self.block_manager.groups))
            self.shadows[seq.seq_id] = shadow
        shadow.token_ids = list(seq.token_ids)  # the target's only ever grow
        shadow.num_prompt_tokens = seq.num_prompt_tokens
        return shadow

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], ks: list[int]) -> None:
        bm = self.block_manager
        live, shadows, kmax = [], [], []
        for seq, k in zip(seqs, ks, strict=True):
            shadow = self._shadow(seq)
            if shadow.num_computed_tokens == 0:
                bm.match_prefix(shadow)
            need = shadow.num_uncomputed_tokens + k - 1  # catch-up chunk, then K - 1 decodes
            if not bm.can_allocate(shadow, need):
                self._drop(seq.seq_id)
                continue
            bm.allocate(shadow, need)
            live.append(seq)
            shadows.append(shadow)
            kmax.append(k)
            seq.spec_tokens, seq.spec_probs = [], None
        if not live:
            return
        real_lengths = [s.num_tokens for s in shadows]
        q_rows: list[list[torch.Tensor]] = [[] for _ in live]
        # 1. catch up (decodes first, as the scheduler orders a step), giving draft 1
        order = sorted(range(len(live)), key=lambda i: shadows[i].num_uncomputed_tokens > 1)
        counts = [shadows[i].num_uncomputed_tokens for i in order]
        out = SchedulerOutput([shadows[i] for i in order], counts,
                              sum(1 for n in counts if n == 1))
        self._step(out, [live[i] for i in order], [q_rows[i] for i in order], commit=True)
        # 2. the remaining drafts, one decode step each
        for j in range(1, max(kmax)):
            active = [i for i in range(len(live)) if kmax[i] > j]
            for i in active:
                shadows[i].token_ids.append(live[i].spec_tokens[-1])
            out = SchedulerOutput([shadows[i] for i in active], [1] * len(active), len(active))
            self._step(out, [live[i] for i in active], [q_rows[i] for i in active],
                       commit=False)
        # 3. keep the KV of real tokens only
        for seq, shadow, length, rows in zip(live, shadows, real_lengths, q_rows, strict=True):
            del shadow.token_ids[length:]
            shadow.num_computed_tokens = length
            bm.roll_back(shadow)
            if rows and any(r is not None for r in rows):
                seq.spec_probs = torch.stack(rows)

    def _step(self, out: SchedulerOutput, seqs: list[Sequence], q_rows: list[list],
              commit: bool) -> None:
        batch = self.runner.prepare(out)
        hidden = self.runner.run(batch)  # one row per shadow: every chunk ends at its last token
        for shadow, n in zip(out.seqs, out.num_new_tokens, strict=True):
            shadow.num_computed_tokens += n
            if commit:  # real tokens only: blocks they fill may enter the prefix cache
                self.block_manager.commit(shadow)
        logits = self.model.compute_logits(hidden)
        views = [RowView(seq, seq.spec_tokens) for seq in seqs]
        rows = self.sampler.process(logits, views)
        tokens = rows.argmax
        if rows.random_rows:
            idx = torch.tensor(rows.random_rows, device=logits.device)
            tokens[idx] = self.sampler.draw(rows.probs, [views[i] for i in rows.random_rows])
        random = {r: j for j, r in enumerate(rows.random_rows)}
        for i, (seq, token) in enumerate(zip(seqs, tokens.tolist(), strict=True)):
            seq.spec_tokens.append(token)
            q_rows[i].append(rows.probs[random[i]] if i in random else None)

    def release(self, seq_ids) -> None:
        for seq_id in seq_ids:
            self._drop(seq_id)

    def _drop(self, seq_id: int) -> None:
        shadow = self.shadows.pop(seq_id, None)
        if shadow is not None:
            self.block_manager.free(shadow)
