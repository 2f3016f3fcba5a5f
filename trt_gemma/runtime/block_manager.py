"""Paged KV-cache bookkeeping: fixed-size blocks, reference counts, prefix cache, windows.

Layers are split into *KV groups* with one block pool each: the full-attention layers, and the
sliding-window layers (one group per window size). A sequence has one block table per group. This
is what lets a sliding layer give back blocks that fell out of its window while the full layers of
the same tokens keep theirs (Gemma 3: 15 of 18 layers slide, so past the window ~5/6 of a
sequence's KV memory is bounded by the window).

Prefix caching: a full, computed block is registered under the chained hash of its tokens (the
hash of the previous block and these tokens, sha256 so a crafted prompt cannot collide with
another user's prefix). A new sequence looks its prompt's full blocks up and shares the hits
(ref count + 1). Blocks whose count drops to zero stay cached and are evicted least recently freed
first, tail blocks before head blocks. Only full blocks are shared this way, and they are never
written again; the one block written while shared is the partly filled last block of forked
samples (n > 1), which is copied on write.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

from trt_gemma.config import GemmaConfig
from trt_gemma.runtime.sequence import Sequence


@dataclass(frozen=True)
class KVGroup:
    layers: tuple[int, ...]  # model layers whose K/V live in this group's pool
    sliding_window: int | None  # None: full attention (blocks kept until the sequence ends)
    num_blocks: int  # blocks in the pool


def layer_groups(config: GemmaConfig) -> list[tuple[tuple[int, ...], int | None]]:
    """(layers, window) of each KV group: full layers first, then one group per window."""
    by_window: dict[int | None, list[int]] = {}
    for layer in range(config.num_hidden_layers):
        by_window.setdefault(config.layer_window(layer), []).append(layer)
    order = sorted(by_window, key=lambda w: (w is not None, w or 0))
    return [(tuple(by_window[w]), w) for w in order]


def plan_groups(config: GemmaConfig, block_bytes_per_layer: int, budget_bytes: int,
                block_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                num_full_blocks: int | None = None) -> list[KVGroup]:
    """Split a byte budget (or a given full-pool block count) between the groups' pools.

    A sliding group never needs more blocks per sequence than a full one, and never more than
    its window plus one chunk: its pool gets as many blocks as the full pool, capped at what
    ``max_num_seqs`` sequences could ever hold in their windows; the full pool gets the rest.
    """
    layout = layer_groups(config)

    def window_cap(window: int) -> int:
        per_seq = -(-window // block_size) + 1
        return max_num_seqs * per_seq + -(-max_num_batched_tokens // block_size)

    cost = [len(layers) * block_bytes_per_layer for layers, _ in layout]
    if num_full_blocks is None:
        n = max(1, budget_bytes // sum(cost))  # equal counts: what one shared table would get
        capped = {i: min(n, window_cap(w)) for i, (_, w) in enumerate(layout) if w is not None}
        uncapped = [i for i in range(len(layout)) if i not in capped]
        if uncapped:  # the full pool(s) get every byte the sliding pools do not need
            rest = budget_bytes - sum(c * cost[i] for i, c in capped.items())
            n = max(1, rest // sum(cost[i] for i in uncapped))
        counts = [capped.get(i, n) for i in range(len(layout))]
    else:
        counts = [num_full_blocks if w is None else min(num_full_blocks, window_cap(w))
                  for _, w in layout]
    return [KVGroup(layers, w, c) for (layers, w), c in zip(layout, counts, strict=True)]


class BlockPool:
    """The blocks of one group: reference counts, the free list and the prefix-cache map."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref_count = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.free_uncached = list(range(num_blocks - 1, -1, -1))  # stack: pop() gives block 0
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, unused: LRU order
        self.cached: dict[bytes, int] = {}  # block hash -> block holding those tokens

    @property
    def num_free(self) -> int:
        return len(self.free_uncached) + len(self.evictable)

    def allocate(self) -> int:
        if self.free_uncached:
            block = self.free_uncached.pop()
        else:  # evict the least recently freed cached block
            block, _ = self.evictable.popitem(last=False)
            del self.cached[self.block_hash[block]]
            self.block_hash[block] = None
        self.ref_count[block] = 1
        return block

    def incref(self, block: int) -> None:
        if self.ref_count[block] == 0:
            del self.evictable[block]  # only cached blocks are revived at count 0
        self.ref_count[block] += 1

    def decref(self, block: int) -> None:
        self.ref_count[block] -= 1
        if self.ref_count[block] == 0:
            if self.block_hash[block] is None:
                self.free_uncached.append(block)
            else:
                self.evictable[block] = None

    def register(self, block: int, block_hash: bytes) -> None:
        if self.block_hash[block] is None and block_hash not in self.cached:
            self.cached[block_hash] = block
            self.block_hash[block] = block_hash

    def forget_unused(self) -> None:
        """Drop the hashes of cached blocks no sequence holds (they become plain free blocks);
        blocks in use keep theirs, so a running sequence's later commits stay consistent."""
        for block in self.evictable:
            del self.cached[self.block_hash[block]]
            self.block_hash[block] = None
            self.free_uncached.append(block)
        self.evictable.clear()


class BlockManager:
    """Allocates, shares and frees the blocks of every sequence in every group."""

    def __init__(self, groups: list[KVGroup], block_size: int, enable_prefix_caching: bool = True):
        self.groups = groups
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pools = [BlockPool(g.num_blocks) for g in groups]
        self.windows = [g.sliding_window for g in groups]
        # (group, src block, dst block) copies the model runner must do before the next forward
        self.pending_copies: list[tuple[int, int, int]] = []
        self.prefix_queried_tokens = 0  # prompt tokens looked up at admission (by the scheduler)
        self.prefix_hit_tokens = 0  # of which found in the cache

    # -- capacity ---------------------------------------------------------------------------------
    def max_tokens_per_seq(self) -> int:
        """Longest sequence the pools can hold alone (the full pools bound it)."""
        full = [g.num_blocks for g in self.groups if g.sliding_window is None]
        return min(full) * self.block_size if full else 1 << 62

    def usage(self) -> float:
        """Share of blocks in use, 0..1 (cached but unused blocks count as free)."""
        pairs = [(len(g.layers), p) for g, p in zip(self.groups, self.pools, strict=True)]
        used = sum(w * (p.num_blocks - p.num_free) for w, p in pairs)
        return used / sum(w * p.num_blocks for w, p in pairs)

    def all_free(self) -> bool:
        return all(p.num_free == p.num_blocks for p in self.pools)

    # -- allocation -------------------------------------------------------------------------------
    def _num_new_blocks(self, seq: Sequence, num_new: int) -> list[int]:
        """Blocks each group must allocate to hold tokens up to num_computed + num_new."""
        bs, start = self.block_size, seq.num_computed_tokens
        needed = -(-(start + num_new) // bs)
        counts = []
        for g, table in enumerate(seq.block_tables):
            n = max(0, needed - len(table))
            if start % bs and start // bs < len(table):
                block = table[start // bs]
                n += self.pools[g].ref_count[block] > 1  # shared partial block: copy on write
            counts.append(n)
        return counts

    def can_allocate(self, seq: Sequence, num_new: int) -> bool:
        counts = self._num_new_blocks(seq, num_new)
        return all(n <= p.num_free for n, p in zip(counts, self.pools, strict=True))

    def allocate(self, seq: Sequence, num_new: int) -> None:
        """Reserve slots for the next num_new tokens (call can_allocate first)."""
        bs, start = self.block_size, seq.num_computed_tokens
        needed = -(-(start + num_new) // bs)
        for g, table in enumerate(seq.block_tables):
            pool = self.pools[g]
            if start % bs and start // bs < len(table):
                i = start // bs
                if pool.ref_count[table[i]] > 1:  # copy on write: this sequence diverges here
                    block = pool.allocate()
                    self.pending_copies.append((g, table[i], block))
                    pool.decref(table[i])
                    table[i] = block
            while len(table) < needed:
                table.append(pool.allocate())

    def free(self, seq: Sequence) -> None:
        """Give back every block (tail first, so the prompt head stays cached longest)."""
        for g, table in enumerate(seq.block_tables):
            pool = self.pools[g]
            for block in reversed(table):
                if block >= 0:
                    pool.decref(block)
            table.clear()
        seq.num_hashed_blocks = 0
        seq.num_dropped_blocks = [0] * len(self.groups)

    def roll_back(self, seq: Sequence) -> None:
        """Speculative decoding: give back the trailing blocks past the computed tokens (slots
        reserved for drafts that were rejected). They were allocated for those drafts alone, so
        they are unshared and were never registered in the prefix cache; the slots of rejected
        drafts in the last kept block are simply written again by later tokens."""
        keep = -(-seq.num_computed_tokens // self.block_size)
        rolled = False
        for g, table in enumerate(seq.block_tables):
            pool = self.pools[g]
            while len(table) > keep:
                block = table.pop()
                assert pool.ref_count[block] == 1 and pool.block_hash[block] is None, block
                pool.decref(block)
                rolled = True
        seq.num_block_rollbacks += rolled

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Child shares all of parent's blocks (copied on write when either appends)."""
        for g, table in enumerate(parent.block_tables):
            child.block_tables[g] = list(table)
            for block in table:
                if block >= 0:
                    self.pools[g].incref(block)
        child.num_hashed_blocks = parent.num_hashed_blocks
        child.num_dropped_blocks = list(parent.num_dropped_blocks)

    # -- prefix cache and windows -----------------------------------------------------------------
    def _update_hashes(self, seq: Sequence, num_tokens: int) -> None:
        bs, hashes, tokens = self.block_size, seq.block_hashes, seq.token_ids
        for j in range(len(hashes), num_tokens // bs):
            prev = hashes[j - 1] if j else b""
            chunk = tokens[j * bs:(j + 1) * bs]
            data = prev + b"".join(t.to_bytes(4, "little") for t in chunk)
            hashes.append(hashlib.sha256(data).digest())

    def _first_visible_block(self, g: int, position: int) -> int:
        """First block a query at `position` can read in group g (0 for full attention)."""
        window = self.windows[g]
        if window is None:
            return 0
        return max(0, position - window + 1) // self.block_size

    def match_prefix(self, seq: Sequence) -> int:
        """Share the cached blocks of the longest cached prompt prefix; returns its tokens.

        A hit of k blocks needs, in each group, the blocks a query at position k*block_size can
        still read: all k for full attention, the last window's worth for a sliding group (older
        ones may be evicted already; they stay -1 in its table). At least one token is always
        left to compute, since its logits give the next token.
        """
        if not self.enable_prefix_caching or seq.num_computed_tokens:
            return 0
        bs = self.block_size
        self._update_hashes(seq, seq.num_tokens)
        max_blocks = (seq.num_tokens - 1) // bs
        # Per group, found[g][j]: block j of the prompt is cached in group g's pool.
        found = [[p.cached.get(h) for h in seq.block_hashes[:max_blocks]] for p in self.pools]
        k = max_blocks
        for g, window in enumerate(self.windows):  # full groups: the run of hits from block 0
            if window is None and None in found[g][:k]:
                k = found[g].index(None)
        while k > 0 and not all(  # sliding groups: every block of the last window
            None not in found[g][self._first_visible_block(g, k * bs):k]
            for g, window in enumerate(self.windows) if window is not None
        ):
            k -= 1
        for g, pool in enumerate(self.pools):
            first = self._first_visible_block(g, k * bs)
            table = seq.block_tables[g]
            table.extend([-1] * first)
            for j in range(first, k):
                pool.incref(found[g][j])
                table.append(found[g][j])
            seq.num_dropped_blocks[g] = first
        seq.num_computed_tokens = seq.num_cached_tokens = k * bs
        seq.num_hashed_blocks = k
        return k * bs

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix no running sequence uses (vLLM's reset_prefix_cache):
        a benchmark's second round must not find its first round's prompts cached."""
        for pool in self.pools:
            pool.forget_unused()

    def commit(self, seq: Sequence) -> None:
        """After a forward: cache newly completed blocks, free blocks out of every window."""
        bs, computed = self.block_size, seq.num_computed_tokens
        if self.enable_prefix_caching and computed // bs > seq.num_hashed_blocks:
            self._update_hashes(seq, computed)
            for j in range(seq.num_hashed_blocks, computed // bs):
                for g, pool in enumerate(self.pools):
                    block = seq.block_tables[g][j]
                    if block >= 0:
                        pool.register(block, seq.block_hashes[j])
            seq.num_hashed_blocks = computed // bs
        for g, window in enumerate(self.windows):
            if window is None:
                continue
            table, dead = seq.block_tables[g], self._first_visible_block(g, computed)
            for j in range(seq.num_dropped_blocks[g], dead):
                if table[j] >= 0:
                    self.pools[g].decref(table[j])
                    table[j] = -1
            seq.num_dropped_blocks[g] = max(dead, seq.num_dropped_blocks[g])
