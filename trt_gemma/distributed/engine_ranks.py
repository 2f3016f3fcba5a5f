"""A tensor-parallel engine: this process is rank 0, ranks 1..N-1 are workers started here.

Rank 0 holds everything with state (scheduler, block manager, sampler, detokenizers, speculator)
and its shard of the model; every other rank loads only its own shard (``loader.load_model(...,
tp=)``), builds the same KV-cache plan (``engine.build_runner``: the smallest rank's budget) and
then follows rank 0's steps (``ModelRunner.follow``). Start-up makes the same collectives on
every rank, in this order: the group's rendezvous, the KV budget (min over ranks), the memory
report (``engine.report_rank_memory``), CUDA-graph capture when enabled.

A worker that dies makes rank 0's next collective raise ``RankFailure``; the engine then fails
every open request with it and ``shutdown`` stops what is left. ``LLMEngine.shutdown`` (or the
process's exit) sends the workers ``OP_STOP``.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import weakref
from pathlib import Path

import torch

from trt_gemma.distributed.group import RankFailure, TensorParallel, close_tensor_parallel
from trt_gemma.distributed.workers import LaunchConfig, WorkerPool
from trt_gemma.errors import ConfigError

_log = logging.getLogger(__name__)


def source_config(source: str | Path):
    """The GemmaConfig of any source, read without its weights."""
    from trt_gemma.loader import is_engine_dir

    if is_engine_dir(source):
        from trt_gemma.engine_dir import read_engine

        return read_engine(source, verify=False).config
    from trt_gemma.checkpoint import open_checkpoint

    return open_checkpoint(source).config


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r's device: cuda:r on CUDA (choose the GPUs with CUDA_VISIBLE_DEVICES), else CPU."""
    return torch.device("cuda", rank) if device.type == "cuda" else torch.device("cpu")


def check_devices(device: torch.device, size: int) -> None:
    if device.type == "cuda":
        if device.index not in (None, 0):
            raise ConfigError(f"device {device}: with tensor parallelism rank r runs on cuda:r; "
                              "pick the GPUs with CUDA_VISIBLE_DEVICES instead")
        if torch.cuda.device_count() < size:
            raise ConfigError(f"--tensor-parallel-size {size} needs {size} GPUs, "
                              f"{torch.cuda.device_count()} are visible")
    elif device.type != "cpu":
        raise ConfigError(f"device {device}: tensor parallelism runs on CUDA (NCCL) or CPU "
                          "(gloo)")


def share_cpu_threads(device: torch.device, size: int) -> tuple[int, int]:
    """On CPU the ranks share this machine's cores: this process (rank 0) keeps 1/size of its
    torch threads, as each worker gets. (threads per rank, the caller's count before; 0 when
    nothing changed, on CUDA)."""
    if device.type != "cpu":
        return 1, 0
    caller_threads = torch.get_num_threads()
    threads = max(1, caller_threads // size)
    torch.set_num_threads(threads)
    return threads, caller_threads


class EngineRanks:
    """Rank 0's handle on the worker processes of ranks 1..N-1."""

    def __init__(self, pool: WorkerPool, tp: TensorParallel, caller_threads: int = 0):
        self.pool, self.tp = pool, tp
        self.stopped = False
        self.caller_threads = caller_threads  # CPU: this process's torch threads before the start
        # A step raised on rank 0 half-way (LLMEngine.step sets it): the workers may be waiting
        # inside its collectives, where no stop message reaches them before the timeout.
        self.out_of_step = False

    def stop(self, sync) -> None:
        """Tell the workers to stop (``sync``: rank 0's ``StepSync``), wait for them, close the
        group; workers that do not stop (a broken group) or are out of step are terminated."""
        if self.stopped:
            return
        self.stopped = True
        try:
            if self.out_of_step:
                self.pool.terminate()
                return
            if sync is not None:
                sync.stop()
            self.pool.join(self.tp.timeout_s)
        except RankFailure as e:
            _log.warning("stopping tensor-parallel ranks: %s", e)
            self.pool.terminate()
        finally:
            close_tensor_parallel(self.tp)
            if self.caller_threads:  # the cores were shared out among the ranks: no longer
                torch.set_num_threads(self.caller_threads)


def start_engine(source: str | Path, dtype, device, verify: bool, config):
    """An LLMEngine over ``config.tensor_parallel_size`` ranks (``LLMEngine.from_source``)."""
    from trt_gemma.loader import load_model
    from trt_gemma.runtime.engine import LLMEngine

    size = config.tensor_parallel_size
    device = torch.device(device)
    check_devices(device, size)
    from trt_gemma.distributed.shard import check_shardable

    check_shardable(source_config(source), size)  # before any process starts
    threads, caller_threads = share_cpu_threads(device, size)  # until shutdown
    launch = LaunchConfig(size, device.type, timeout_s=config.tensor_parallel_timeout_s,
                          threads=threads)
    pool = WorkerPool(launch, _rank_main, (str(source), dtype, device.type, verify, config))
    tp = None
    try:
        tp = pool.join_rank0()
        model, tokenizer = load_model(source, dtype=dtype, device=rank_device(device, 0),
                                      verify=verify, tp=tp)
        ranks = EngineRanks(pool, tp, caller_threads)
        engine = LLMEngine(model, tokenizer, config, ranks=ranks)
    except BaseException:
        pool.terminate()
        if tp is not None:
            close_tensor_parallel(tp)
        if caller_threads:
            torch.set_num_threads(caller_threads)
        raise
    # At exit, stop the workers cleanly if nobody did (a script that never calls shutdown);
    # registered after multiprocessing's own exit hook, so it runs first.
    atexit.register(_stop_at_exit, weakref.ref(engine))
    for m in engine.rank_memory:
        _log.info("tensor-parallel rank %d/%d: %.1f MiB of weights, %.1f MiB of KV cache",
                  m.rank, size, m.weight_bytes / 2**20, m.kv_cache_bytes / 2**20)
    return engine


def _stop_at_exit(ref: weakref.ref) -> None:
    engine = ref()
    if engine is not None and engine.ranks is not None:
        with contextlib.suppress(Exception):  # exiting anyway; the workers are daemons
            engine.shutdown()


def _rank_main(tp: TensorParallel, source: str, dtype, device_type: str, verify: bool,
               config) -> None:
    """Ranks 1..N-1: load the shard, build the same KV plan as rank 0, follow its steps."""
    from trt_gemma.loader import load_model
    from trt_gemma.runtime.engine import build_runner, report_rank_memory

    device = rank_device(torch.device(device_type), tp.rank)
    model, _ = load_model(source, dtype=dtype, device=device, verify=verify, tp=tp)
    _, _, runner = build_runner(model, config)
    report_rank_memory(runner)
    try:
        runner.follow()
    except RankFailure as e:  # rank 0 died: one line, not a traceback per worker
        _log.error("%s", e)
        raise SystemExit(1) from None
