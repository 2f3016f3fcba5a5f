"""Persistent buffers for a step's integer inputs: filled in place, copied to the device once.

A step's inputs are a dozen small integer tensors (token ids, positions, KV slots per group, the
decodes' block tables, context lengths, cumulative lengths, the rows to sample). Built as Python
lists and moved one ``torch.tensor(...).to(device)`` at a time, each is a pageable copy and a
launch. Here they are packed into one int64 buffer (each field 16-byte aligned; int32 fields are
read through an int32 view), written with numpy slicing, copied to the device with ONE non-blocking
copy from pinned memory, and handed out as views of the device buffer. On CPU the host buffer is
the device buffer: no copy at all.

Block tables are kept per KV group as persistent ``[rows, max_blocks]`` int32 host tables, one
row per decoding sequence (``BlockTableRows``); each step writes only what the block manager
changed since the last one, then gathers the rows in decode order into the step buffer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from trt_gemma.runtime.sequence import Sequence


def _words(n: int, dtype) -> int:
    """int64 words a field of n elements occupies, rounded up to an even count: every field
    starts 16-byte aligned, as Triton specializes (and the kernels' compile check assumes) for
    torch's own allocations."""
    words = n if dtype == np.int64 else (n + 1) // 2
    return words + words % 2


class StepBuffer:
    """One (pinned, on CUDA) host int64 buffer and its device twin, reused every step.

    ``begin(words)`` starts a step (growing both buffers if needed), ``field`` reserves the next
    slice as a host numpy view and the matching device view, ``upload`` copies the used prefix
    once. Before a step writes the host buffer it waits for the previous step's copy to finish
    (an event, already passed in the engine's synchronous loop), so a copy in flight never reads
    half-written inputs.
    """

    def __init__(self, device: torch.device, words: int = 4096, growable: bool = True):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.growable = growable
        self.event = torch.cuda.Event() if self.cuda else None
        self.pending = False  # an upload was issued and not waited for
        self.used = 0
        # Layouts already laid out in this memory, by their sizes: steady decoding repeats the
        # same few, and making a dozen tensor views costs more than filling them.
        self.layouts: dict[tuple, StepFields] = {}
        self._allocate(max(words, 1))

    def _allocate(self, words: int) -> None:
        self.layouts.clear()  # views of the old memory
        self.capacity = words
        self.host = torch.zeros(words, dtype=torch.int64, pin_memory=self.cuda)
        self.host_np = self.host.numpy()
        self.dev = torch.zeros(words, dtype=torch.int64, device=self.device) if self.cuda \
            else self.host

    def begin(self, words: int) -> None:
        if self.pending:
            self.event.synchronize()
            self.pending = False
        if words > self.capacity:
            if not self.growable:
                raise ValueError(f"StepBuffer: a step needs {words} words, the fixed buffer "
                                 f"holds {self.capacity}")
            self._allocate(max(words, 2 * self.capacity))
        self.used = 0

    def field(self, shape: tuple[int, ...], dtype) -> tuple[np.ndarray, torch.Tensor]:
        """The next field: (host numpy view, device tensor view), both of `shape`."""
        n = math.prod(shape)
        start, words = self.used, _words(n, dtype)
        if start + words > self.capacity:
            raise ValueError(f"StepBuffer: field of {n} {np.dtype(dtype).name} past the "
                             f"{self.capacity} words reserved by begin()")
        self.used += words
        host, dev = self.host_np[start:start + words], self.dev[start:start + words]
        if dtype == np.int32:
            host, dev = host.view(np.int32), dev.view(torch.int32)
        return host[:n].reshape(shape), dev[:n].view(shape)

    def upload(self) -> None:
        """The step's one host-to-device copy (non-blocking, from pinned memory)."""
        if self.cuda and self.used:
            self.dev[:self.used].copy_(self.host[:self.used], non_blocking=True)
            self.event.record()
            self.pending = True


@dataclass
class StepFields:
    """The fields of one step in a ``StepBuffer``: host numpy views to fill and the device
    tensors the model reads (the same memory on CPU). ``None`` where the step has no such field."""

    input_ids: tuple  # [num_tokens] int64
    positions: tuple  # [num_tokens] int64
    logits_indices: tuple  # [num_samples] int64
    slot_mapping: list[tuple]  # per group [num_tokens] int64
    prefill_key_slots: list[tuple] | None  # per group [keys of the group] int64
    context_lens: tuple  # [num_decodes] int32
    cu_seqlens_q: tuple  # [num_prefills + 1] int32
    cu_seqlens_k: list[tuple] | None  # per group [num_prefills + 1] int32
    block_tables: list[tuple]  # per group [num_decodes, width] int32


def step_words(num_tokens: int, num_samples: int, num_decodes: int, num_prefills: int,
               key_counts: list[int] | None, widths: list[int]) -> int:
    """int64 words the fields of ``reserve_step`` take."""
    i64, i32 = np.int64, np.int32
    groups = len(widths)
    return (_words(num_tokens, i64) * (2 + groups) + _words(num_samples, i64)
            + sum(key_counts or ()) + _words(num_decodes, i32)
            + _words(num_prefills + 1, i32) * (1 + (groups if key_counts is not None else 0))
            + sum(_words(num_decodes * w, i32) for w in widths))


def reserve_step(buf: StepBuffer, num_tokens: int, num_samples: int, num_decodes: int,
                 num_prefills: int, key_counts: list[int] | None,
                 widths: list[int]) -> StepFields:
    """Start a step in `buf` and lay its fields out, always in this order (so equal sizes give
    equal offsets: what CUDA graphs rely on). key_counts None: prefills attend over their new
    keys only (no key slots, no cu_seqlens_k)."""
    i64, i32 = np.int64, np.int32
    key = (num_tokens, num_samples, num_decodes, num_prefills,
           None if key_counts is None else tuple(key_counts), tuple(widths))
    words = step_words(num_tokens, num_samples, num_decodes, num_prefills, key_counts, widths)
    buf.begin(words)
    fields = buf.layouts.get(key)
    if fields is not None:
        buf.used = words
        return fields
    if len(buf.layouts) >= 64:
        buf.layouts.pop(next(iter(buf.layouts)))  # the oldest
    keyed = key_counts is not None
    fields = buf.layouts[key] = StepFields(
        input_ids=buf.field((num_tokens,), i64),
        positions=buf.field((num_tokens,), i64),
        logits_indices=buf.field((num_samples,), i64),
        slot_mapping=[buf.field((num_tokens,), i64) for _ in widths],
        prefill_key_slots=[buf.field((k,), i64) for k in key_counts] if keyed else None,
        context_lens=buf.field((num_decodes,), i32),
        cu_seqlens_q=buf.field((num_prefills + 1,), i32),
        cu_seqlens_k=[buf.field((num_prefills + 1,), i32) for _ in widths] if keyed else None,
        block_tables=[buf.field((num_decodes, w), i32) for w in widths],
    )
    return fields


class BlockTableRows:
    """Per KV group, a persistent ``[rows, max_blocks]`` int32 host copy of the block tables of
    the sequences decoding now, one row per sequence.

    A sequence gets a row when it decodes and keeps it while it keeps decoding; a sequence that is
    not among a step's decodes any more (finished, aborted, preempted) gives its row back at that
    step. While a row is kept, the block manager changes its table in three ways only, and each
    step writes just those: blocks appended (from the last synced block on), the block being
    written replaced by copy-on-write (the last block: rechecked every step), and leading blocks
    dropped out of a sliding window (``num_dropped_blocks``: zeroed, as dropped blocks read as 0).
    Anything else (a fork, a resume after preemption, a prefix-cache hit) happens before a
    sequence's first decode, which writes its whole row; so does a speculating sequence that gave
    trailing blocks back (``seq.num_block_rollbacks`` counts those). Entries past a row's table
    are 0.
    """

    def __init__(self, num_groups: int, max_blocks: int, rows: int = 64):
        self.num_groups, self.max_blocks = num_groups, max_blocks
        self.tables = [np.zeros((0, max_blocks), np.int32) for _ in range(num_groups)]
        self.synced: list[list[int]] = [[] for _ in range(num_groups)]  # entries written per row
        self.last: list[list[int]] = [[] for _ in range(num_groups)]  # last entry written per row
        self.dropped: list[list[int]] = [[] for _ in range(num_groups)]  # leading entries zeroed
        self.rollbacks: dict[Sequence, int] = {}  # seq.num_block_rollbacks when last written
        self.row_of: dict[Sequence, int] = {}
        self.free_rows: list[int] = []
        self._grow(max(rows, 1))

    def _grow(self, rows: int) -> None:
        old = self.tables[0].shape[0]
        for g in range(self.num_groups):
            table = np.zeros((rows, self.max_blocks), np.int32)
            table[:old] = self.tables[g]
            self.tables[g] = table
            for state in (self.synced, self.last, self.dropped):
                state[g].extend([0] * (rows - old))
        self.free_rows.extend(range(rows - 1, old - 1, -1))  # pop() gives the lowest row

    def update(self, seqs: list[Sequence]) -> np.ndarray:  # [len(seqs)] int64 row of each
        """Bring the rows of this step's decoding sequences up to date; free the others."""
        old, rows = self.row_of, {}
        fresh = []
        for seq in seqs:
            row = old.pop(seq, None)
            if row is None:
                fresh.append(seq)
            elif seq.num_block_rollbacks != self.rollbacks.get(seq):
                rows[seq] = row
                self._write_row(seq, row)
            else:
                rows[seq] = row
                self._sync(seq, row)
        self.free_rows.extend(old.values())
        for seq in old:
            self.rollbacks.pop(seq, None)
        for seq in fresh:
            if not self.free_rows:
                self._grow(2 * self.tables[0].shape[0])
            row = self.free_rows.pop()
            rows[seq] = row
            self._write_row(seq, row)
        self.row_of = rows
        return np.fromiter((rows[s] for s in seqs), np.int64, count=len(seqs))

    def _write_row(self, seq: Sequence, row: int) -> None:
        self.rollbacks[seq] = seq.num_block_rollbacks
        for g, table in enumerate(seq.block_tables):
            n = len(table)
            self._check_width(n)
            dst = self.tables[g][row]
            dst[:n] = table
            np.maximum(dst[:n], 0, out=dst[:n])  # dropped blocks (-1) read as 0
            dst[n:self.synced[g][row]] = 0  # what the row's previous owner left
            self.synced[g][row] = n
            self.last[g][row] = table[-1] if n else 0
            self.dropped[g][row] = seq.num_dropped_blocks[g]

    def _sync(self, seq: Sequence, row: int) -> None:
        for g, table in enumerate(seq.block_tables):
            n, synced = len(table), self.synced[g][row]
            if n > synced:  # appended blocks, and the one before them (it may have been copied)
                self._check_width(n)
                lo = max(synced - 1, 0)
                self.tables[g][row, lo:n] = [max(b, 0) for b in table[lo:n]]
                self.synced[g][row] = n
                self.last[g][row] = table[-1]
            elif n < synced:  # never while a sequence keeps decoding; rewrite to be safe
                self._write_row(seq, row)
                continue
            elif n and table[-1] != self.last[g][row]:  # copy-on-write of the block written now
                self.tables[g][row, n - 1] = table[-1]
                self.last[g][row] = table[-1]
            dropped = seq.num_dropped_blocks[g]
            if dropped > self.dropped[g][row]:
                self.tables[g][row, self.dropped[g][row]:dropped] = 0
                self.dropped[g][row] = dropped

    def _check_width(self, n: int) -> None:
        if n > self.max_blocks:
            raise ValueError(f"BlockTableRows: a sequence holds {n} blocks, the tables were "
                             f"sized for {self.max_blocks} (max_model_len / block_size)")

    def gather(self, g: int, rows: np.ndarray, out: np.ndarray) -> None:
        """Rows of group g in decode order into out [len(rows), width] (width <= max_blocks)."""
        np.take(self.tables[g][:, :out.shape[1]], rows, axis=0, out=out)


class TokenReadback:
    """Sampled token ids back to the host: one non-blocking copy into a pinned buffer and one
    synchronisation (``.tolist()`` on a CUDA tensor copies to pageable memory instead)."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.host = torch.zeros(0, dtype=torch.int64)
        self.event = torch.cuda.Event() if self.cuda else None

    def __call__(self, ids: torch.Tensor) -> list[int]:  # ids: [rows] int on the model device
        if not self.cuda:
            return ids.tolist()
        n = ids.numel()
        if self.host.numel() < n:
            self.host = torch.zeros(max(n, 256), dtype=torch.int64, pin_memory=True)
        self.host[:n].copy_(ids.view(-1), non_blocking=True)
        self.event.record()
        self.event.synchronize()
        return self.host[:n].tolist()
