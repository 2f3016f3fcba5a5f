"""Count the kernels one decode step launches on the CUDA code path, without a GPU.

The model runs on CPU through the same code the CUDA path takes: ``TRITON_INTERPRET=1`` and
``TRT_GEMMA_TRITON_ON_CPU=1`` make ``ops.py`` launch the Triton kernels (interpreted). Inside the
model's forward of every decode-only step, this counts

- each Triton launch as one kernel (the aten ops the interpreter runs to stage its arguments are
  not counted: on a GPU they do not exist);
- each aten op that does work as one kernel: everything except views (ops whose result aliases an
  input without writing it: view, slice, expand, ...) and tensor allocations (``empty*``), which
  on CUDA are a caching-allocator call, not a launch; allocations are counted apart, because
  launchers must not allocate on the hot path;
- host syncs (``aten::_local_scalar_dense``: ``.item()``, ``.tolist()``) apart too.

A cuBLAS GEMM is one aten op here (``mm``/``addmm``/``linear``'s decomposition) and one or two
launches on a GPU; a no-op cast (``.to`` of the same dtype) never reaches the dispatcher.

    TRITON_INTERPRET=1 TRT_GEMMA_TRITON_ON_CPU=1 python benchmarks/launch_count.py
    python benchmarks/launch_count.py --dtype float32 --json out.json

(The script sets both variables itself when they are unset.) Prints kernels per decoder layer by
op (total over the counted steps / steps / layers) and the total per layer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field

if __name__ == "__main__":  # before torch/triton load; importers (tests) set them themselves
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("TRT_GEMMA_TRITON_ON_CPU", "1")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

_ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
_SYNCS = {"_local_scalar_dense"}


def _may_alias(func) -> bool:
    """The op may return an alias of an input without writing it (view, slice, ``to``...)."""
    returns = func._schema.returns
    return bool(returns) and all(
        r.alias_info is not None and not r.alias_info.is_write for r in returns
    )


def _storages(x) -> set[int]:
    if isinstance(x, torch.Tensor):
        return {x.untyped_storage().data_ptr()}
    if isinstance(x, list | tuple):
        return set().union(*(_storages(t) for t in x)) if x else set()
    return set()


def _did_work(func, args, result) -> bool:
    """Views and no-op casts (``to``/``contiguous``/``reshape`` that returned an input's storage)
    launch nothing; the same ops launch a copy when their result has storage of its own."""
    if not _may_alias(func):
        return True
    return not _storages(result) <= _storages(list(args))


@dataclass
class LaunchCount:
    kernels: Counter = field(default_factory=Counter)  # "aten.mm" / "triton._decode_split_kernel"
    allocations: Counter = field(default_factory=Counter)
    syncs: Counter = field(default_factory=Counter)
    steps: int = 0  # decode steps counted
    layers: int = 0

    def per_layer(self) -> float:
        return sum(self.kernels.values()) / max(1, self.steps * self.layers)

    def table(self) -> list[tuple[str, float]]:
        div = max(1, self.steps * self.layers)
        return [(op, n / div) for op, n in self.kernels.most_common()]

    def as_json(self) -> dict:
        div = max(1, self.steps * self.layers)
        return {
            "steps": self.steps, "layers": self.layers,
            "kernels_per_layer": round(self.per_layer(), 3),
            "kernels_per_layer_by_op": {op: round(n / div, 3) for op, n in self.kernels.items()},
            "kernels_per_step": sum(self.kernels.values()) / max(1, self.steps),
            "allocations_per_step": {op: n / max(1, self.steps)
                                     for op, n in self.allocations.items()},
            "host_syncs_per_step": sum(self.syncs.values()) / max(1, self.steps),
        }


class _Counter(TorchDispatchMode):
    def __init__(self, count: LaunchCount):
        super().__init__()
        self.count = count
        self.paused = 0  # > 0 inside a Triton launch (the interpreter's own staging ops)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if not self.paused:
            name = func.overloadpacket.__name__
            if name in _ALLOCATIONS:
                self.count.allocations[f"aten.{name}"] += 1
            elif name in _SYNCS:
                self.count.syncs[f"aten.{name}"] += 1
            elif _did_work(func, args, result):
                self.count.kernels[f"aten.{name}"] += 1
        return result


@contextlib.contextmanager
def _count_triton_launches(mode: _Counter):
    """Count each interpreted Triton launch once, and pause aten counting while it runs."""
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def run(self, *args, **kwargs):
        if mode.active:
            mode.count.kernels[f"triton.{self.fn.__name__}"] += 1
        mode.paused += 1
        try:
            return original(self, *args, **kwargs)
        finally:
            mode.paused -= 1

    InterpretedFunction.run = run
    try:
        yield
    finally:
        InterpretedFunction.run = original


def count_decode_launches(source: str = "gemma3-270m", dtype: str = "bfloat16",
                          prompts: tuple = ("The three primary colors are", "def add(a, b):"),
                          decode_steps: int = 2, **engine_config) -> LaunchCount:
    """Generate with ``LLM(source)`` on the CUDA code path (interpreted) and count the kernels of
    the model's forward in decode-only steps (the first ``decode_steps`` of them). ``prompts``:
    texts, or token-id lists for a checkpoint without a tokenizer."""
    env = os.environ
    if env.get("TRITON_INTERPRET") != "1" or env.get("TRT_GEMMA_TRITON_ON_CPU") != "1":
        raise RuntimeError("set TRITON_INTERPRET=1 and TRT_GEMMA_TRITON_ON_CPU=1 before importing "
                           "torch/triton (this script does when run directly)")
    from trt_gemma import LLM, SamplingParams
    from trt_gemma.model import GemmaModel

    llm = LLM(source, dtype=dtype, **engine_config)
    count = LaunchCount(layers=llm.config.num_hidden_layers)
    mode = _Counter(count)
    mode.active = False
    original = GemmaModel.forward

    def forward(self, input_ids, positions, attention):
        meta = getattr(attention, "meta", None)
        is_decode = meta is not None and meta.num_decodes == input_ids.numel()
        if not is_decode or count.steps >= decode_steps:
            return original(self, input_ids, positions, attention)
        count.steps += 1
        mode.active = True
        try:
            with mode:
                return original(self, input_ids, positions, attention)
        finally:
            mode.active = False

    GemmaModel.forward = forward
    try:
        with _count_triton_launches(mode):
            llm.generate(list(prompts), SamplingParams(temperature=0.0,
                                                       max_tokens=decode_steps + 1))
    finally:
        GemmaModel.forward = original
    if count.steps < decode_steps:
        raise RuntimeError(f"only {count.steps} decode steps ran (wanted {decode_steps})")
    return count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", nargs="?", default="gemma3-270m")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--steps", type=int, default=2, help="decode steps to count")
    p.add_argument("--json", help="write the counts here")
    args = p.parse_args(argv)
    count = count_decode_launches(args.source, args.dtype, decode_steps=args.steps)
    print(f"{args.source} {args.dtype}: {count.steps} decode steps of 2 sequences x "
          f"{count.layers} layers")
    print(f"{'op':<40} {'per layer':>10}")
    for op, n in count.table():
        print(f"{op:<40} {n:>10.2f}")
    print(f"{'total':<40} {count.per_layer():>10.2f}")
    data = count.as_json()
    print(f"allocations per step: {data['allocations_per_step'] or 0}; "
          f"host syncs per step: {data['host_syncs_per_step']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"source": args.source, "dtype": args.dtype, **data}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
