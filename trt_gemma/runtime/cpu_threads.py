"""How many intra-op threads a small CPU step should use: measured, not guessed.

A decode step of a few tokens is a chain of small, memory-bound GEMVs. On an idle machine a
second OpenMP thread still shortens it (measured on 2 cores, Gemma 3 270M bf16, batch 1: 52 ms per
step on 2 threads, 60 ms on 1). On a shared machine the opposite holds: every small op waits for
both threads, and a descheduled one stalls it (measured under load: a batch-4 step 94 ms on 1
thread, 1.8 s on 2). Which case a process is in changes while it runs, so ``ThreadChooser`` times
the small steps themselves: it alternates 1 and ``max_threads`` for a few steps, keeps the faster
(median seconds per step), and measures again every ``reprobe_every`` small steps.

Large steps (prefill chunks, big decode batches) are GEMM-bound and always use every thread.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator

import torch


class ThreadChooser:
    def __init__(self, max_threads: int, small_below: int, probe_steps: int = 6,
                 reprobe_every: int = 256):
        if max_threads < 1 or small_below < 0 or probe_steps < 1 or reprobe_every < 1:
            raise ValueError("ThreadChooser: max_threads, probe_steps and reprobe_every must be "
                             ">= 1 and small_below >= 0")
        self.max_threads = max_threads
        self.small_below = small_below  # steps of fewer tokens than this are "small"
        self.probe_steps = probe_steps  # timed steps per candidate in one probe
        self.reprobe_every = reprobe_every
        self.candidates = (1, max_threads) if max_threads > 1 else (1,)
        self.choice = self.candidates[-1]
        self._samples: dict[int, list[float]] = {n: [] for n in self.candidates}
        self._since_probe = 0
        self._probing = len(self.candidates) > 1

    def threads(self, num_tokens: int) -> int:
        """The thread count for a step of ``num_tokens`` tokens."""
        if num_tokens >= self.small_below:
            return self.max_threads
        if not self._probing:
            return self.choice
        # Alternate candidates so both see the same stretch of machine load and context length.
        done = sum(len(s) for s in self._samples.values())
        return self.candidates[done % len(self.candidates)]

    def record(self, num_tokens: int, threads: int, seconds: float) -> None:
        if num_tokens >= self.small_below:
            return
        if not self._probing:
            self._since_probe += 1
            if self._since_probe >= self.reprobe_every:
                self._probing, self._since_probe = True, 0
                self._samples = {n: [] for n in self.candidates}
            return
        self._samples[threads].append(seconds)
        if all(len(s) >= self.probe_steps for s in self._samples.values()):
            self.choice = min(self.candidates, key=lambda n: statistics.median(self._samples[n]))
            self._probing = False

    @contextlib.contextmanager
    def step(self, num_tokens: int) -> Iterator[None]:
        """Run one step's block on the chosen thread count, timing it."""
        n = self.threads(num_tokens)
        before = torch.get_num_threads()
        if n != before:
            torch.set_num_threads(n)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.record(num_tokens, n, time.perf_counter() - start)
            if n != before:
                torch.set_num_threads(before)
