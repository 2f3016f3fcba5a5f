"""BlockManager: allocation, ref counts, prefix cache, windows, fork, copy-on-write (no model)."""

from __future__ import annotations

import pytest

from trt_gemma.config import preset
from trt_gemma.runtime.block_manager import BlockManager, BlockPool, KVGroup, plan_groups
from trt_gemma.runtime.sequence import Sequence
from trt_gemma.sampling_params import SamplingParams

BS = 4


def _seq(tokens, seq_id=0, groups=1):
    return Sequence(seq_id, f"r{seq_id}", 0, list(tokens), SamplingParams(), seq_id, groups)


def _compute(bm, seq, n):
    """What a step does for seq: allocate, (forward), advance, commit."""
    assert bm.can_allocate(seq, n)
    bm.allocate(seq, n)
    seq.num_computed_tokens += n
    bm.commit(seq)


@pytest.fixture
def full():
    bm = BlockManager([KVGroup((0,), None, 8)], BS)
    yield bm
    assert bm.all_free()  # every test gives every block back


@pytest.fixture
def mixed():
    bm = BlockManager([KVGroup((1,), None, 32), KVGroup((0, 2), 6, 16)], BS)
    yield bm
    assert bm.all_free()


def test_allocate_and_free(full):
    seq = _seq(range(10))
    _compute(full, seq, 10)
    assert len(seq.block_tables[0]) == 3
    assert full.pools[0].num_free == 5
    assert 0 < full.usage() < 1
    full.free(seq)
    assert full.usage() == 0.0


def test_cannot_allocate_past_the_pool(full):
    seq = _seq(range(40))
    assert not full.can_allocate(seq, 33)
    assert full.can_allocate(seq, 32)


def test_prefix_cache_hits_full_blocks_and_leaves_one_token(full):
    a = _seq(range(12), 0)
    _compute(full, a, 12)  # 3 full blocks, all registered
    b = _seq(range(12), 1)
    assert full.match_prefix(b) == 8  # not 12: the last token must be computed for its logits
    assert b.block_tables[0] == a.block_tables[0][:2]
    assert full.pools[0].ref_count[a.block_tables[0][0]] == 2
    c = _seq([*range(6), 99, 98], 2)  # diverges inside block 1
    assert full.match_prefix(c) == 4
    for s in (a, b, c):
        full.free(s)


def test_cached_blocks_survive_free_and_are_evicted_lru(full):
    a = _seq(range(9), 0)
    _compute(full, a, 9)
    full.free(a)
    assert full.pools[0].num_free == 8 and len(full.pools[0].cached) == 2
    b = _seq(range(9), 1)
    assert full.match_prefix(b) == 8  # revived from the evictable list
    full.free(b)
    # Filling the pool evicts cached blocks (tail first) instead of failing.
    big = _seq(range(100, 132), 2)
    _compute(full, big, 32)
    assert not full.pools[0].cached or all(
        full.pools[0].ref_count[blk] for blk in full.pools[0].cached.values())
    full.free(big)
    assert full.match_prefix(_seq(range(9), 3)) == 0


def test_reset_prefix_cache_forgets_unused_blocks_only(full):
    a = _seq(range(9), 0)
    _compute(full, a, 9)
    full.free(a)  # its 2 full blocks stay cached, unused
    held = _seq(range(50, 59), 1)
    _compute(full, held, 9)  # still running: its cached blocks must survive the reset
    full.reset_prefix_cache()
    assert full.match_prefix(_seq(range(9), 2)) == 0
    assert full.pools[0].num_free == 8 - 3
    again = _seq(range(50, 59), 3)
    assert full.match_prefix(again) == 8
    for s in (held, again):
        full.free(s)


def test_prefix_cache_can_be_disabled():
    bm = BlockManager([KVGroup((0,), None, 8)], BS, enable_prefix_caching=False)
    a = _seq(range(12))
    _compute(bm, a, 12)
    assert bm.match_prefix(_seq(range(12), 1)) == 0
    bm.free(a)
    assert bm.all_free()


def test_sliding_group_frees_blocks_out_of_the_window(mixed):
    seq = _seq(range(30), groups=2)
    _compute(mixed, seq, 30)
    # Window 6: the next query (position 30) sees 25..30 -> blocks 6.. are live (25 // 4 = 6).
    assert seq.block_tables[1][:6] == [-1] * 6
    assert all(b >= 0 for b in seq.block_tables[1][6:])
    assert all(b >= 0 for b in seq.block_tables[0])  # full layers keep everything
    assert mixed.pools[1].num_free == 16 - 2
    for _ in range(5):  # decoding keeps the sliding group at about window / block_size blocks
        seq.token_ids.append(7)
        _compute(mixed, seq, 1)
        assert 16 - mixed.pools[1].num_free <= 3
    mixed.free(seq)


def test_prefix_hit_with_sliding_group_needs_only_the_window(mixed):
    a = _seq(range(30), 0, groups=2)
    _compute(mixed, a, 30)
    mixed.free(a)  # blocks 0..6 of both groups stay cached (block 7 was partial)
    # 11 sliding blocks for another prompt: 9 never-cached ones, then blocks 0 and 1 are evicted.
    other = _seq(range(100, 144), 1, groups=2)
    _compute(mixed, other, 44)
    mixed.free(other)
    b = _seq(range(30), 2, groups=2)
    # Full layers hit blocks 0..6; a query at 28 only reads 23.. (blocks 5, 6) in the sliding
    # layers, so the evicted blocks 0 and 1 do not matter.
    assert mixed.match_prefix(b) == 28
    assert b.block_tables[1][:5] == [-1] * 5 and min(b.block_tables[1][5:]) >= 0
    assert len(b.block_tables[0]) == 7 and min(b.block_tables[0]) >= 0
    mixed.free(b)
    # Now evict sliding block 6 too: the longest usable hit drops to 24 (needs blocks 4, 5).
    other = _seq(range(200, 260), 3, groups=2)
    _compute(mixed, other, 60)
    mixed.free(other)
    c = _seq(range(30), 4, groups=2)
    hit = mixed.match_prefix(c)
    assert hit < 28
    mixed.free(c)


def test_fork_shares_blocks_and_copies_the_partial_block_on_write(full):
    parent = _seq(range(6))
    _compute(full, parent, 6)
    child = parent.fork(1, 1, None)
    full.fork(parent, child)
    shared = parent.block_tables[0][1]
    assert full.pools[0].ref_count[shared] == 2
    for s in (parent, child):
        s.token_ids.append(42)
    _compute(full, child, 1)
    assert full.pending_copies == [(0, shared, child.block_tables[0][1])]
    assert child.block_tables[0][0] == parent.block_tables[0][0]  # full block still shared
    assert full.pools[0].ref_count[shared] == 1
    _compute(full, parent, 1)  # parent now owns it alone: writes in place, no copy
    assert len(full.pending_copies) == 1
    full.pending_copies.clear()
    full.free(parent)
    full.free(child)


def test_pool_allocates_uncached_blocks_before_evicting():
    pool = BlockPool(3)
    a = pool.allocate()
    pool.register(a, b"h")
    pool.decref(a)
    b = pool.allocate()
    assert b != a and pool.cached == {b"h": a}


def test_plan_groups_sizes_the_sliding_pool_to_the_windows():
    cfg = preset("gemma-3-270m")
    per_layer = 2 * 16 * cfg.kv_size * 4
    groups = plan_groups(cfg, per_layer, 1 << 30, 16, max_num_seqs=4, max_num_batched_tokens=64)
    full, sliding = groups
    assert full.sliding_window is None and len(full.layers) == 3
    assert sliding.sliding_window == 512 and len(sliding.layers) == 15
    assert sliding.num_blocks == 4 * (512 // 16 + 1) + 4  # capped: 4 sequences' windows
    used = full.num_blocks * 3 * per_layer + sliding.num_blocks * 15 * per_layer
    assert (1 << 30) - 3 * per_layer < used <= 1 << 30  # the spare bytes went to the full pool
    tight = plan_groups(cfg, per_layer, 18 * per_layer * 10, 16, 256, 2048)
    assert [g.num_blocks for g in tight] == [10, 10]
