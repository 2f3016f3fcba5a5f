"""The tensor-parallel process group and the three collectives the model needs.

One process per rank; gloo on CPU, NCCL on CUDA. Every collective waits at most ``timeout_s``:
a rank that died (its sockets close) or stopped answering makes the others raise ``RankFailure``
naming the collective, instead of hanging the server. ``TensorParallel(0, 1)`` is the single-rank
context: every collective is the identity, so the model's code has one path.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from trt_gemma.errors import TrtGemmaError

DEFAULT_TIMEOUT_S = 60.0  # a healthy step is milliseconds; a minute means a rank is gone
DEFAULT_JOIN_TIMEOUT_S = 300.0  # starting a rank: imports, then (later) its share of the weights
# The control group's timeout: how long a worker may wait for rank 0's next step (an idle server
# sends none). A dead rank 0 still ends the wait at once: gloo sees the connection close.
CONTROL_TIMEOUT = timedelta(days=365)


class RankFailure(TrtGemmaError, RuntimeError):
    """A collective failed: a peer rank died, or did not answer within the timeout."""


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in the tensor-parallel group."""

    rank: int = 0
    size: int = 1
    timeout_s: float = DEFAULT_TIMEOUT_S
    group: Any = None  # a torch.distributed ProcessGroup; None: the default group
    # A gloo group with a year's timeout for rank 0's step headers: workers wait on it while the
    # engine idles (the main group's timeout would end them), and read it from host memory on
    # CUDA too (the header says how much device memory follows).
    control: Any = None
    # gloo: wait for each collective on the host, at most timeout_s (how a dead peer is noticed).
    # NCCL: never. A host wait with a timeout polls the collective's end on the CPU (a stall per
    # all-reduce) and cannot run inside CUDA-graph capture; NCCL's own watchdog enforces the
    # group's timeout instead (it aborts the communicator and ends the process with its error).
    host_wait: bool = True

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, in place (row-parallel linears' partial products)."""
        if self.size > 1:
            self._wait("all_reduce", lambda: dist.all_reduce(t, group=self.group, async_op=True),
                       self.host_wait)
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` concatenated along the last dim, rank 0 first (vocab shards)."""
        if self.size == 1:
            return t
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.size)]
        self._wait("all_gather",
                   lambda: dist.all_gather(parts, t, group=self.group, async_op=True),
                   self.host_wait)
        return torch.cat(parts, dim=-1)

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """``t`` of rank ``src`` on every rank, in place (rank 0's step inputs)."""
        if self.size > 1:
            self._wait("broadcast",
                       lambda: dist.broadcast(t, src=src, group=self.group, async_op=True),
                       self.host_wait)
        return t

    def broadcast_control(self, t: torch.Tensor) -> torch.Tensor:
        """A CPU int64 ``t`` of rank 0 on every rank, over the control group: rank 0 waits at
        most ``timeout_s``, the others as long as rank 0 lives (its next step may be hours away).
        """
        if self.size > 1:
            def start():
                return dist.broadcast(t, src=0, group=self.control, async_op=True)

            if self.rank == 0:
                self._wait("step header broadcast", start)
            else:
                try:
                    start().wait()
                except RuntimeError as e:
                    cause = str(e).strip().splitlines()[0] if str(e).strip() else "closed"
                    raise RankFailure(f"tensor-parallel rank {self.rank} of {self.size}: rank 0 "
                                      f"is gone ({cause[:200]})") from None
        return t

    def gather_ints(self, values: list[int]) -> list[list[int]]:
        """Every rank's list of ints (equal lengths), by rank: start-up facts (memory held)."""
        t = torch.tensor(values, dtype=torch.int64)
        if self.size == 1:
            return [values]
        parts = [torch.empty_like(t) for _ in range(self.size)]
        self._wait("all_gather", lambda: dist.all_gather(parts, t, group=self.control,
                                                         async_op=True))
        return [p.tolist() for p in parts]

    def barrier(self) -> None:
        if self.size > 1:
            self._wait("barrier", lambda: dist.barrier(group=self.group, async_op=True))

    def _wait(self, what: str, start: Callable[[], Any], host: bool = True) -> None:
        try:
            work = start()
            if host:
                work.wait(timeout=timedelta(seconds=self.timeout_s))
            else:  # NCCL: the current stream waits for it, the host does not
                work.wait()
        except RuntimeError as e:
            cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RankFailure(
                f"tensor-parallel rank {self.rank} of {self.size}: {what} failed: a peer rank "
                f"died or did not answer within {self.timeout_s:g} s ({cause[:200]})"
            ) from None


SINGLE_RANK = TensorParallel()  # no tensor parallelism: every collective is the identity


def free_tcp_address() -> str:
    """A ``tcp://127.0.0.1:PORT`` rendezvous address on a port free right now (single host)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def default_backend(device: str | torch.device) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_tensor_parallel(rank: int, size: int, init_method: str, *, device: str = "cpu",
                         timeout_s: float = DEFAULT_TIMEOUT_S,
                         join_timeout_s: float = DEFAULT_JOIN_TIMEOUT_S) -> TensorParallel:
    """Join the group as ``rank`` at ``init_method`` (``tcp://HOST:PORT``, rank 0 listens).

    The rendezvous waits at most ``join_timeout_s`` (ranks start and import torch at their own
    pace); the group itself is made with ``timeout_s``, so a collective stuck on a silent peer is
    abandoned after it and the group can be destroyed (a longer group timeout would hold
    ``destroy_process_group`` that long).
    """
    if size == 1:
        return TensorParallel(0, 1, timeout_s)
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(rank)
    host, _, port = init_method.removeprefix("tcp://").rpartition(":")
    try:
        store = dist.TCPStore(host, int(port), size, is_master=rank == 0,
                              timeout=timedelta(seconds=join_timeout_s))
        _wait_for_all(store, size, join_timeout_s)
        dist.init_process_group(default_backend(device), store=store, rank=rank,
                                world_size=size, timeout=timedelta(seconds=timeout_s))
        control = dist.new_group(list(range(size)), timeout=CONTROL_TIMEOUT, backend="gloo")
    except (RuntimeError, ValueError) as e:
        cause = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RankFailure(f"tensor-parallel rank {rank} of {size}: could not join the group at "
                          f"{init_method} within {join_timeout_s:g} s ({cause})") from None
    return TensorParallel(rank, size, timeout_s, control=control,
                          host_wait=default_backend(device) == "gloo")


def _wait_for_all(store: Any, size: int, timeout_s: float) -> None:
    """Every rank has reached the store (before any step with the shorter group timeout)."""
    store.add("ranks_arrived", 1)
    deadline = time.monotonic() + timeout_s
    while store.add("ranks_arrived", 0) < size:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {store.add('ranks_arrived', 0)} of {size} ranks arrived")
        time.sleep(0.05)


def close_tensor_parallel(tp: TensorParallel) -> None:
    if tp.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
