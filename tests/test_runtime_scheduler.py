"""Scheduler: token budget, sequence cap, chunked prefill, preemption, FCFS, abort (no model)."""

from __future__ import annotations

import pytest

from trt_gemma.runtime.block_manager import BlockManager, KVGroup
from trt_gemma.runtime.config import EngineConfig
from trt_gemma.runtime.scheduler import Scheduler
from trt_gemma.runtime.sequence import Sequence, SequenceStatus
from trt_gemma.sampling_params import SamplingParams

BS = 4


def _scheduler(num_blocks=64, **config):
    config.setdefault("max_num_batched_tokens", 16)
    config.setdefault("max_num_seqs", 4)
    bm = BlockManager([KVGroup((0,), None, num_blocks)], BS)
    return Scheduler(EngineConfig(block_size=BS, **config), bm)


def _seq(i, prompt_len, max_tokens=4):
    prompt = [(i * 31 + j) % 97 + 3 for j in range(prompt_len)]
    return Sequence(i, f"r{i}", 0, prompt, SamplingParams(max_tokens=max_tokens), i, 1)


def _step(sched):
    """A model-less engine step: compute, append a token to sequences that sample, finish."""
    out = sched.schedule()
    sched.advance(out)
    done = []
    for seq in out.seqs:
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(5)
            if seq.num_output_tokens >= seq.params.max_tokens:
                done.append(seq)
    sched.finish(done)
    return out


def _run(sched, limit=500):
    outs = []
    while sched.has_unfinished():
        outs.append(_step(sched))
        assert len(outs) < limit
    assert sched.block_manager.all_free()
    return outs


def test_budget_and_cap_are_respected():
    sched = _scheduler()
    seqs = [_seq(i, 10) for i in range(6)]
    for s in seqs:
        sched.add(s)
    for out in _run(sched):
        assert out.num_tokens <= 16
        assert len(out.seqs) <= 4
        assert all(n == 1 for n in out.num_new_tokens[: out.num_decodes])
    assert all(s.num_output_tokens == 4 for s in seqs)


def test_long_prompt_is_chunked_and_never_stalls_decodes():
    sched = _scheduler()
    short = _seq(0, 3, max_tokens=10)
    sched.add(short)
    _step(sched)  # short is decoding now
    long = _seq(1, 50)
    sched.add(long)
    chunks = []
    while long.num_computed_tokens < long.num_prompt_tokens:
        out = _step(sched)
        assert short in out.seqs[: out.num_decodes]  # the decode runs every step
        chunks.append(out.num_new_tokens[out.seqs.index(long)])
    assert sum(chunks) == 50 and max(chunks) == 15  # 16-token budget minus the decode
    _run(sched)


def test_fcfs_admission_in_arrival_order():
    sched = _scheduler(max_num_seqs=2)
    seqs = [_seq(i, 5) for i in range(4)]
    for s in seqs:
        sched.add(s)
    first = _step(sched)
    assert [s.seq_id for s in first.seqs] == [0, 1]  # the cap holds 2 and 3 back, in order
    admitted = []
    for out in _run(sched):
        admitted += [s.seq_id for s in out.seqs if s.seq_id not in admitted and s.seq_id > 1]
    assert admitted == [2, 3]


def test_preemption_frees_the_newest_and_everything_completes():
    # 6 blocks of 4 tokens: three sequences of 8 + 6 tokens cannot all fit.
    sched = _scheduler(num_blocks=6, max_num_seqs=3)
    seqs = [_seq(i, 7, max_tokens=6) for i in range(3)]
    for s in seqs:
        sched.add(s)
    preempted = []
    for out in _run(sched):
        preempted += [s.seq_id for s in out.preempted]
        running = sched.running
        assert running == sorted(running, key=lambda s: s.arrival)
    assert preempted and 0 not in preempted  # the oldest is never the victim
    assert sched.num_preemptions == len(preempted)
    assert all(s.num_output_tokens == 6 and s.status is SequenceStatus.FINISHED for s in seqs)


def test_abort_frees_blocks_at_once():
    sched = _scheduler()
    a, b = _seq(0, 9), _seq(1, 9)
    sched.add(a)
    sched.add(b)
    _step(sched)
    used = sched.block_manager.pools[0].num_free
    sched.finish([a])
    assert sched.block_manager.pools[0].num_free == used + 3
    assert a not in sched.running and a.status is SequenceStatus.FINISHED
    c = _seq(2, 5)
    sched.add(c)
    sched.finish([c])  # waiting sequences can be aborted too
    assert c not in sched.waiting
    _run(sched)


@pytest.mark.parametrize("budget", [4, 7, 16])
def test_every_token_is_computed_exactly_once(budget):
    sched = _scheduler(max_num_batched_tokens=budget, max_num_seqs=4)
    seqs = [_seq(i, n, max_tokens=3) for i, n in enumerate([1, 13, 4, 22])]
    for s in seqs:
        sched.add(s)
    computed = {s.seq_id: 0 for s in seqs}
    for out in _run(sched):
        for s, n in zip(out.seqs, out.num_new_tokens, strict=True):
            computed[s.seq_id] += n
    # Each prompt once, plus each generated token but the last (its K/V is never needed).
    assert computed == {s.seq_id: s.num_tokens - 1 for s in seqs}
