"""Scheduler: which tokens of which sequences the next step computes.

Each step fills a token budget (``max_num_batched_tokens``) under a sequence cap (``max_num_seqs``):

1. Running sequences, oldest first. A decode costs one token (plus its draft tokens when it
   speculates: they are verified in the same forward) and its budget is reserved before any
   prefill chunk takes the rest, so a long prompt never stalls running decodes: it is prefilled in
   chunks over several steps (chunked prefill). Drafts go first when blocks or budget are short:
   a sequence drops its drafts before anything is preempted.
2. When a running sequence needs a block and the pools are empty, the newest running sequences
   are preempted: their blocks are freed and they go back to the front of the waiting queue, to
   be recomputed later (their tokens are kept; the prefix cache often still holds their blocks).
3. Waiting sequences are admitted first come, first served, only in steps without preemption and
   never out of order (a request that does not fit blocks the ones behind it).
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import dataclass, field

from trt_gemma.runtime.block_manager import BlockManager
from trt_gemma.runtime.config import EngineConfig
from trt_gemma.runtime.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    """What one step computes. Decodes come first, then prefill chunks. A decode computes its
    last token, plus its draft tokens (``seq.spec_tokens``) when it speculates: each of those
    positions is a decode query of its own, and each gives logits to verify a draft with."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)  # per seq, tokens computed this step
    num_decodes: int = 0  # the leading seqs that decode (1 + len(spec_tokens) tokens each)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


def _order(seq: Sequence) -> tuple[int, int]:
    return seq.arrival, seq.index


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()  # FCFS; preempted sequences return to the front
        self.running: list[Sequence] = []  # sorted by arrival: the last one is the newest
        self.num_preemptions = 0
        # request id -> time.monotonic() when its first sequence was first admitted. The engine
        # moves it into the request's metrics with its first output; a request that leaves
        # without a token never gets one, so finish() drops it here.
        self.first_scheduled_times: dict[str, float] = {}

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step --------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        bm = self.block_manager
        decodes: list[Sequence] = []
        prefills: list[tuple[Sequence, int]] = []
        # Budget left for prefill chunks once every running decode has its token and drafts.
        num_decoding = self._fit_drafts()
        budget = self.config.max_num_batched_tokens - num_decoding
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            is_decode = seq.num_uncomputed_tokens == 1
            num_new = 1 + len(seq.spec_tokens) if is_decode else min(seq.num_uncomputed_tokens,
                                                                     budget)
            if num_new <= 0:
                i += 1
                continue
            if num_new > 1 and is_decode and not bm.can_allocate(seq, num_new):
                seq.clear_drafts()  # drafts are dropped before anyone is preempted
                num_new = 1
            while not bm.can_allocate(seq, num_new):
                victim = self.running[-1]  # the newest; never one scheduled before seq
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # seq preempted itself: everything after it is gone too
            bm.allocate(seq, num_new)
            if is_decode:
                decodes.append(seq)
            else:
                prefills.append((seq, num_new))
                budget -= num_new
            i += 1
        # What is left, now that preempted decodes no longer hold their reserved token.
        decode_tokens = [1 + len(s.spec_tokens) for s in decodes]
        budget = (self.config.max_num_batched_tokens - sum(decode_tokens)
                  - sum(n for _, n in prefills))
        if not out.preempted:
            self._admit(prefills, budget)
        out.seqs = decodes + [s for s, _ in prefills]
        out.num_new_tokens = decode_tokens + [n for _, n in prefills]
        out.num_decodes = len(decodes)
        return out

    def _fit_drafts(self) -> int:
        """Tokens the running decodes take with their drafts, after dropping the drafts that do
        not fit the token budget (newest sequences' first)."""
        decoding = [s for s in self.running if s.num_uncomputed_tokens == 1]
        spare = self.config.max_num_batched_tokens - len(decoding)
        for seq in decoding:
            if len(seq.spec_tokens) > spare:
                seq.spec_tokens = seq.spec_tokens[:max(spare, 0)]
                if seq.spec_probs is not None:
                    seq.spec_probs = seq.spec_probs[:len(seq.spec_tokens)]
            spare -= len(seq.spec_tokens)
        return sum(1 + len(s.spec_tokens) for s in decoding)

    def _admit(self, prefills: list[tuple[Sequence, int]], budget: int) -> None:
        bm = self.block_manager
        cap = self.config.max_num_seqs
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if len(self.running) + 1 + seq.num_forks_pending > cap:
                break
            fresh = seq.num_computed_tokens == 0
            if fresh:
                bm.match_prefix(seq)
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not bm.can_allocate(seq, num_new):
                if fresh:
                    bm.free(seq)  # undo the prefix match; retried when blocks are free
                    seq.num_computed_tokens = seq.num_cached_tokens = 0
                break
            self.waiting.popleft()
            if fresh:
                bm.prefix_queried_tokens += seq.num_tokens
                bm.prefix_hit_tokens += seq.num_computed_tokens
                if not seq.num_output_tokens:  # not a recompute after preemption
                    self.first_scheduled_times.setdefault(seq.request_id, time.monotonic())
            bm.allocate(seq, num_new)
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=_order)
            prefills.append((seq, num_new))
            budget -= num_new

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Free the newest running sequence; it will be recomputed from its tokens."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.clear_drafts()
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)  # the newest is preempted first, so arrival order holds
        out.preempted.append(seq)

    # -- after the forward -----------------------------------------------------------------------
    def advance(self, out: SchedulerOutput) -> None:
        """The scheduled tokens are computed: record it, cache full blocks, drop dead windows."""
        bm = self.block_manager
        for i, (seq, n) in enumerate(zip(out.seqs, out.num_new_tokens, strict=True)):
            if i < out.num_decodes and seq.spec_tokens:
                continue  # how many of its tokens count is known once its drafts are checked
            seq.num_computed_tokens += n
            bm.commit(seq)

    def settle(self, seq: Sequence, num_valid: int) -> None:
        """A speculating decode is verified: the first num_valid of its computed positions hold
        accepted tokens (its last token and the accepted drafts). Count them, give back the
        slots of the rejected drafts, cache the blocks they complete."""
        seq.num_computed_tokens += num_valid
        self.block_manager.roll_back(seq)
        self.block_manager.commit(seq)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Run child beside parent, sharing its blocks."""
        self.block_manager.fork(parent, child)
        child.status = SequenceStatus.RUNNING
        bisect.insort(self.running, child, key=_order)

    def finish(self, seqs: list[Sequence]) -> None:
        """Finished or aborted sequences leave at once and give their blocks back."""
        done = set()
        for seq in seqs:
            if seq.status is SequenceStatus.RUNNING:
                self.block_manager.free(seq)
                done.add(id(seq))
            elif seq.status is SequenceStatus.WAITING:
                self.block_manager.free(seq)
                self.waiting.remove(seq)
            seq.status = SequenceStatus.FINISHED
            if not seq.num_output_tokens:  # aborted before its first token: no output to come
                self.first_scheduled_times.pop(seq.request_id, None)
        if done:
            self.running = [s for s in self.running if id(s) not in done]
