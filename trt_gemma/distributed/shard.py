"""The Megatron shard plan: which slice of every canonical tensor rank r of N holds.

- ``q_proj`` is column-parallel by query heads: rank r holds heads [r * H / N, (r + 1) * H / N).
- ``k_proj`` / ``v_proj`` are column-parallel by KV heads; with fewer KV heads than ranks each rank
  holds one KV head, head ``r // (N / kv_heads)`` (the KV head its query heads attend to; the
  same rule as TensorRT-LLM's export, ``converter/trtllm_shard.kv_cut``).
- ``gate_proj`` / ``up_proj`` are column-parallel, ``o_proj`` / ``down_proj`` row-parallel: each
  rank's partial product is summed by one all-reduce after each.
- ``embed_tokens`` and ``lm_head`` are vocab-parallel: the vocabulary is padded to a multiple of
  N with zero rows and rank r holds rows [r * V' / N, (r + 1) * V' / N).
- Norms, q/k norms and KV-cache scales are replicated.

Quantized weights are cut part by part (``part_cut``): an ``Int4Weight``'s codes, scales and
zeros follow its output rows (column cut) or input groups (row cut, which must fall on group
boundaries), its AWQ ``pre_quant_scale`` is shared by a column cut and cut with the inputs by a
row cut; an ``Fp8Weight``'s per-channel scales follow the output rows and its per-tensor scales
are shared. What cannot be cut this way is refused with a ``ConfigError``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import torch

from trt_gemma.config import GemmaConfig, check_tensor_parallel_split
from trt_gemma.errors import ConfigError
from trt_gemma.kernels.gemm_fp8 import Fp8Weight
from trt_gemma.kernels.gemm_w4a16 import Int4Weight

OUT, IN = 0, 1  # the feature axis a cut runs along: output rows or input columns of [out, in]

_VOCAB = ("embed_tokens.weight", "lm_head.weight")
# parts a column-parallel rank needs whole: they scale the inputs, or all outputs alike
_SHARED_BY_COLUMN_CUT = {("int4", "pre_quant_scale"), ("fp8", "input_scale")}


@dataclass(frozen=True)
class Cut:
    """Features [start, stop) of ``size`` along ``axis`` (OUT or IN); rows at or past ``size``
    (vocabulary padding) are zeros."""

    axis: int
    start: int
    stop: int
    size: int


def padded_vocab(vocab_size: int, tp: int) -> int:
    """The vocabulary rounded up to a multiple of tp (every rank the same number of rows)."""
    return -(-vocab_size // tp) * tp


def check_shardable(config: GemmaConfig, tp: int) -> None:
    """ConfigError when this model's heads or MLP do not divide over ``tp`` ranks."""
    check_tensor_parallel_split(config, tp, "--tensor-parallel-size")


def rank_config(config: GemmaConfig, tp: int) -> GemmaConfig:
    """The config of one rank's share: its query heads, KV heads and MLP width (the model and its
    KV caches size themselves from these); vocabulary and everything else stay global."""
    check_shardable(config, tp)
    return dataclasses.replace(
        config, num_attention_heads=config.num_attention_heads // tp,
        num_key_value_heads=max(1, config.num_key_value_heads // tp),
        intermediate_size=config.intermediate_size // tp)


def _even(size: int, tp: int, rank: int) -> tuple[int, int]:
    return rank * size // tp, (rank + 1) * size // tp


@dataclass(frozen=True)
class ShardPlan:
    """Where rank ``rank`` of ``size`` cuts each canonical tensor."""

    config: GemmaConfig
    rank: int
    size: int

    def __post_init__(self) -> None:
        check_shardable(self.config, self.size)
        if not 0 <= self.rank < self.size:
            raise ConfigError(f"rank {self.rank} is outside tensor-parallel size {self.size}")

    def kv_heads(self) -> tuple[int, int]:
        """KV heads [first, last) this rank holds (one replicated head when kv < size)."""
        kv = self.config.num_key_value_heads
        if kv >= self.size:
            return _even(kv, self.size, self.rank)
        head = self.rank // (self.size // kv)
        return head, head + 1

    def cut(self, name: str) -> Cut | None:
        """The slice of canonical tensor ``name`` on this rank; None when it is replicated."""
        cfg, r, n = self.config, self.rank, self.size
        if name in _VOCAB:
            rows = padded_vocab(cfg.vocab_size, n) // n
            return Cut(OUT, r * rows, (r + 1) * rows, cfg.vocab_size)
        match = re.fullmatch(r"layers\.\d+\.(.+)\.weight", name)
        module = match.group(1) if match else None
        if module == "self_attn.q_proj":
            return Cut(OUT, *_even(cfg.q_size, n, r), cfg.q_size)
        if module in ("self_attn.k_proj", "self_attn.v_proj"):
            first, last = self.kv_heads()
            return Cut(OUT, first * cfg.head_dim, last * cfg.head_dim, cfg.kv_size)
        if module in ("mlp.gate_proj", "mlp.up_proj"):
            return Cut(OUT, *_even(cfg.intermediate_size, n, r), cfg.intermediate_size)
        if module == "self_attn.o_proj":
            return Cut(IN, *_even(cfg.q_size, n, r), cfg.q_size)
        if module == "mlp.down_proj":
            return Cut(IN, *_even(cfg.intermediate_size, n, r), cfg.intermediate_size)
        return None

    def shard(self, name: str, weight: Any) -> Any:
        """This rank's share of an in-memory weight (a copy: the whole weight can be freed)."""
        cut = self.cut(name)
        if cut is None:
            return weight
        if isinstance(weight, torch.Tensor):
            return _take(weight, part_cut(name, "dense", "weight", weight.shape, cut))
        fmt = weight_format(weight)
        group = getattr(weight, "group_size", None)
        parts = {part: _take(t, part_cut(name, fmt, part, t.shape, cut, group))
                 for part, t in weight.tensors().items()}
        return dataclasses.replace(weight, **parts)


def weight_format(weight: Any) -> str:
    if isinstance(weight, Int4Weight):
        return "int4"
    if isinstance(weight, Fp8Weight):
        return "fp8"
    raise ConfigError(f"tensor parallelism: cannot shard a {type(weight).__name__}")


@dataclass(frozen=True)
class Slice:
    """Entries [start, stop) of dimension ``dim`` of a stored tensor, then ``pad`` zero rows."""

    dim: int
    start: int
    stop: int
    pad: int = 0


def part_cut(name: str, fmt: str, part: str, shape: torch.Size | tuple[int, ...], cut: Cut,
             group_size: int | None = None) -> Slice | None:
    """How one stored part of a weight follows ``cut``; None when the part is shared whole.

    ``fmt`` is "dense", "int4" or "fp8"; ``part`` a field of its weight class ("weight" for a
    dense tensor). Raises ConfigError for cuts the format cannot follow.
    """
    if cut.axis == OUT:
        per_tensor = fmt == "fp8" and part == "weight_scale" and len(shape) == 0
        if (fmt, part) in _SHARED_BY_COLUMN_CUT or per_tensor:
            return None
        if name in _VOCAB and fmt != "dense":
            raise ConfigError(f"tensor parallelism: a quantized {name} cannot be split by "
                              "vocabulary; build the engine without --quantize-lm-head")
        stop = min(cut.stop, cut.size)  # vocabulary padding beyond the stored rows
        start = min(cut.start, stop)
        return Slice(0, start, stop, pad=(cut.stop - cut.start) - (stop - start))
    # IN: a row-parallel linear's input features
    if fmt == "dense" or (fmt == "fp8" and part == "weight"):
        return Slice(1, cut.start, cut.stop)
    if fmt == "fp8":  # per-channel or per-tensor scales of the outputs: shared
        return None
    if part == "pre_quant_scale":
        return Slice(0, cut.start, cut.stop)
    if part == "qweight":
        if cut.start % 2:
            raise ConfigError(f"tensor parallelism: int4 {name} would be split inside a byte "
                              f"(input feature {cut.start})")
        return Slice(1, cut.start // 2, cut.stop // 2)
    # scales, zeros: one column per group of input features
    if cut.start % group_size or (cut.stop % group_size and cut.stop != cut.size):
        raise ConfigError(f"tensor parallelism: int4 {name} (group size {group_size}) would be "
                          f"split at input feature {cut.start}..{cut.stop}, inside a group; use "
                          "fewer ranks or a smaller --group-size")
    return Slice(1, cut.start // group_size, -(-cut.stop // group_size))


def _take(t: torch.Tensor, s: Slice | None) -> torch.Tensor:
    if s is None:
        return t
    piece = t.narrow(s.dim, s.start, s.stop - s.start)
    if s.pad:
        piece = torch.cat([piece, piece.new_zeros(s.pad, *piece.shape[1:])])
    return piece.clone()  # a view would keep the whole tensor alive


def read_slice(handle: Any, key: str, s: Slice | None) -> torch.Tensor:
    """``s`` of tensor ``key`` from an open ``safe_open`` file, reading only that slice."""
    if s is None:
        return handle.get_tensor(key)
    view = handle.get_slice(key)
    index = (slice(None),) * s.dim + (slice(s.start, s.stop),)
    piece = view[index]
    if s.pad:
        piece = torch.cat([piece, piece.new_zeros(s.pad, *piece.shape[1:])])
    elif piece.untyped_storage().nbytes() > piece.nbytes or not piece.is_contiguous():
        # the slice can be a view of a larger (memory-mapped) buffer: keep only its own bytes
        piece = piece.contiguous().clone()
    return piece
