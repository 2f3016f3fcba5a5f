"""Rank processes started by the calling process itself: no torchrun, no launcher script.

The caller is rank 0 (the CLI's process: it owns the scheduler and the server); ranks 1..N-1 are
spawned workers (``torch.multiprocessing``'s spawn context, so neither CUDA nor threads are
forked) that join the same group and run ``fn(tp, *args)``. ``fn`` must be a module-level
function (the workers import it by name); each rank runs the same function (SPMD), and the
collectives inside it keep them in step.

A worker that dies makes rank 0's next collective raise ``RankFailure`` (group.py); a worker
that ends with an error or a non-zero exit is reported when rank 0 joins the pool.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.multiprocessing as mp

from trt_gemma.distributed.group import (
    DEFAULT_JOIN_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
    RankFailure,
    TensorParallel,
    close_tensor_parallel,
    free_tcp_address,
    init_tensor_parallel,
)


@dataclass(frozen=True)
class LaunchConfig:
    size: int  # ranks, the caller included
    device: str = "cpu"  # "cuda": rank r uses cuda:r and NCCL; else gloo
    timeout_s: float = DEFAULT_TIMEOUT_S  # every collective
    join_timeout_s: float = DEFAULT_JOIN_TIMEOUT_S  # the rendezvous: every rank started
    threads: int = 1  # torch threads per CPU rank (ranks share the machine's cores)
    init_method: str = field(default_factory=free_tcp_address)


def _worker_main(rank: int, launch: LaunchConfig, fn: Callable[..., Any], args: tuple) -> None:
    if launch.device == "cpu":
        torch.set_num_threads(launch.threads)
    tp = init_tensor_parallel(rank, launch.size, launch.init_method, device=launch.device,
                              timeout_s=launch.timeout_s, join_timeout_s=launch.join_timeout_s)
    try:
        fn(tp, *args)
    finally:
        close_tensor_parallel(tp)


class WorkerPool:
    """Ranks 1..N-1 of a group whose rank 0 is this process."""

    def __init__(self, launch: LaunchConfig, fn: Callable[..., Any], args: tuple = ()):
        if launch.size < 1:
            raise ValueError(f"tensor-parallel size must be >= 1, got {launch.size}")
        self.launch = launch
        context = mp.get_context("spawn")
        self.processes = [context.Process(target=_worker_main, args=(rank, launch, fn, args),
                                          name=f"trt-gemma-rank{rank}", daemon=True)
                          for rank in range(1, launch.size)]
        for p in self.processes:
            p.start()

    def join_rank0(self) -> TensorParallel:
        """Join the group as rank 0 (after the workers were started)."""
        launch = self.launch
        return init_tensor_parallel(0, launch.size, launch.init_method, device=launch.device,
                                    timeout_s=launch.timeout_s,
                                    join_timeout_s=launch.join_timeout_s)

    def join(self, timeout_s: float | None = None) -> None:
        """Wait for every worker to end; RankFailure naming the first that failed."""
        timeout_s = self.launch.timeout_s if timeout_s is None else timeout_s
        for rank, p in enumerate(self.processes, start=1):
            p.join(timeout_s)
            if p.is_alive():
                self.terminate()
                raise RankFailure(f"tensor-parallel rank {rank} did not finish within "
                                  f"{timeout_s:g} s; stopped it")
            if p.exitcode != 0:
                self.terminate()
                raise RankFailure(f"tensor-parallel rank {rank} (pid {p.pid}) exited with code "
                                  f"{p.exitcode}")

    def terminate(self) -> None:
        """Stop the workers still running (each by its own pid)."""
        live = [p for p in self.processes if p.is_alive() and p.pid != os.getpid()]
        for p in live:
            p.terminate()
        for p in live:
            p.join(2)
            if p.is_alive():  # ignores SIGTERM (stopped, or stuck in native code)
                p.kill()
                p.join(5)


def run_ranks(launch: LaunchConfig, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(tp, *args)`` on every rank; returns rank 0's result (ranks 1..N-1 in workers)."""
    if launch.size == 1:
        return fn(TensorParallel(), *args)
    pool = WorkerPool(launch, fn, args)
    tp = None
    try:
        tp = pool.join_rank0()
        result = fn(tp, *args)
    except BaseException:
        pool.terminate()
        raise
    finally:
        if tp is not None:
            close_tensor_parallel(tp)
    pool.join()
    return result
