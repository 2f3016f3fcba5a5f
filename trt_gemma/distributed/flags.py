"""``--tensor-parallel-size`` (``-tp``) and ``--tensor-parallel-timeout``: one definition for
every command that runs the model (generate, eval, bench, serve), checked the same way."""

from __future__ import annotations

import argparse

from trt_gemma.errors import ConfigError


def add_tensor_parallel_argument(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("-tp", "--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="ranks (processes) the model is split over: one GPU each on CUDA "
                        "(cuda:0..N-1, choose them with CUDA_VISIBLE_DEVICES), gloo processes "
                        "sharing the cores on CPU; started by the command itself (default 1)")
    p.add_argument("--tensor-parallel-timeout", type=float, default=None, metavar="S",
                   help="with -tp > 1: a collective waiting longer than S seconds means a rank "
                        "died or hangs and the engine stops (default 60; must exceed the "
                        "longest step)")


def tensor_parallel_size(args: argparse.Namespace) -> int:
    """The checked ``--tensor-parallel-size`` (ConfigError, one line, when < 1)."""
    size = args.tensor_parallel_size
    if size < 1:
        raise ConfigError(f"--tensor-parallel-size must be >= 1, got {size}")
    timeout = getattr(args, "tensor_parallel_timeout", None)
    if timeout is not None and timeout <= 0:
        raise ConfigError(f"--tensor-parallel-timeout must be > 0, got {timeout:g}")
    return size


def tensor_parallel_options(args: argparse.Namespace) -> dict:
    """EngineConfig fields of the flags: none with one rank (so a TensorRT-LLM engine, whose
    split was fixed when it was built, is not handed a size it may not have)."""
    size = tensor_parallel_size(args)
    if size == 1:
        return {}
    options = {"tensor_parallel_size": size}
    if getattr(args, "tensor_parallel_timeout", None) is not None:
        options["tensor_parallel_timeout_s"] = float(args.tensor_parallel_timeout)
    return options
