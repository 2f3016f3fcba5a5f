"""Tensor parallelism's per-step message: rank 0 tells the other ranks what to run.

Rank 0 owns the scheduler, the block manager's bookkeeping and sampling; ranks 1..N-1 own only
their shard of the model and their heads' share of the paged KV cache. Each step, after rank 0
has filled and uploaded its packed step buffer (``step_inputs.StepBuffer``), it sends:

1. a small int64 header over the control group (``TensorParallel.broadcast_control``, host
   memory): what to do after the forward (``op``) and every size ``reserve_step`` lays the buffer
   out from, so a worker's buffer gets the same fields at the same offsets;
2. the used words of the step buffer over the main group (device memory on CUDA: the one
   host-to-device upload of rank 0 becomes one NCCL broadcast to the others);
3. the block manager's copy-on-write pairs, when there are any (forks of n > 1 requests).

The workers then run the same forward (its all-reduces keep the ranks in step) and the same
tail collective: ``OP_GREEDY`` the vocab-parallel argmax (two numbers per row gathered),
``OP_LOGITS`` the gathered logits. ``OP_STOP`` ends a worker's loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

OP_STOP, OP_GREEDY, OP_LOGITS = 0, 1, 2
_FIXED = 9  # header words before the per-group widths and key counts


@dataclass(frozen=True)
class StepHeader:
    op: int
    graph_size: int = 0  # > 0: a CUDA-graph decode step of that captured size
    num_tokens: int = 0
    num_samples: int = 0
    num_decodes: int = 0  # decode rows (drafts included)
    num_prefills: int = 0
    key_counts: tuple[int, ...] | None = None  # keys per group of keyed prefills, else None
    widths: tuple[int, ...] = ()  # block-table width per group
    used_words: int = 0  # words of the step buffer to broadcast
    num_copies: int = 0  # copy-on-write (group, src, dst) triples that follow


class StepSync:
    """Both ends of the per-step message for one ``TensorParallel`` group of ``num_groups`` KV
    groups. Rank 0 calls ``send``/``stop``; the others ``receive`` then ``receive_payload``."""

    def __init__(self, tp, num_groups: int):
        self.tp = tp
        self.num_groups = num_groups
        self.header = torch.zeros(_FIXED + 2 * num_groups, dtype=torch.int64)
        self.stopped = False

    def send(self, h: StepHeader, words: torch.Tensor, copies: list[tuple[int, int, int]]) -> None:
        """Rank 0: the header, then ``words`` (the step buffer's used prefix), then the copies."""
        g = self.num_groups
        keys = h.key_counts or (0,) * g
        self.header[:] = torch.tensor(
            [h.op, h.graph_size, h.num_tokens, h.num_samples, h.num_decodes, h.num_prefills,
             h.key_counts is not None, h.used_words, len(copies), *h.widths, *keys])
        self.tp.broadcast_control(self.header)
        if h.used_words:
            self.tp.broadcast(words)
        if copies:
            self.tp.broadcast_control(torch.tensor(copies, dtype=torch.int64).view(-1))

    def stop(self) -> None:
        """Rank 0: end the workers' loops (once)."""
        if not self.stopped:
            self.stopped = True
            self.header.zero_()
            self.tp.broadcast_control(self.header)

    def receive(self) -> StepHeader:
        """Ranks 1..N-1: the next header (waits while rank 0 idles; RankFailure if it died)."""
        v = self.tp.broadcast_control(self.header).tolist()
        g = self.num_groups
        widths = tuple(v[_FIXED:_FIXED + g])
        keys = tuple(v[_FIXED + g:_FIXED + 2 * g]) if v[6] else None
        return StepHeader(op=v[0], graph_size=v[1], num_tokens=v[2], num_samples=v[3],
                          num_decodes=v[4], num_prefills=v[5], key_counts=keys, widths=widths,
                          used_words=v[7], num_copies=v[8])

    def receive_payload(self, h: StepHeader, words: torch.Tensor) -> list[tuple[int, int, int]]:
        """Ranks 1..N-1: the step buffer's words into ``words``; returns the copy triples."""
        if h.used_words:
            self.tp.broadcast(words)
        if not h.num_copies:
            return []
        flat = self.tp.broadcast_control(torch.zeros(3 * h.num_copies, dtype=torch.int64))
        return [tuple(c) for c in flat.view(-1, 3).tolist()]
