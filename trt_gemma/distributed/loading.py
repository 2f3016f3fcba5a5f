"""Shard-wise loading: each rank reads only its slices of the weights, never the whole model.

HF checkpoint directories and engine directories are safetensors: a rank opens each file with
``safe_open`` and reads its slice of every tensor with ``get_slice`` (quantized engine weights part
by part, ``shard.part_cut``). Other sources (GGUF, the bundled model) have no sliceable layout:
their tensors stream one at a time and each is cut at once, so a rank holds its shard plus at most
one whole tensor.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from trt_gemma.config import GemmaConfig
from trt_gemma.distributed.group import TensorParallel
from trt_gemma.distributed.shard import ShardPlan, part_cut, rank_config, read_slice
from trt_gemma.errors import CheckpointError
from trt_gemma.kernels.gemm_fp8 import Fp8Weight
from trt_gemma.kernels.gemm_w4a16 import Int4Weight

_FORMATS = {"int4": (Int4Weight, ("qweight", "scales", "zeros", "pre_quant_scale")),
            "fp8": (Fp8Weight, ("weight", "weight_scale", "input_scale"))}


def load_rank_model(source: str | Path, tp: TensorParallel, dtype: torch.dtype,
                    device: str | torch.device = "cpu", verify: bool = True):
    """(GemmaModel holding rank ``tp.rank``'s shard, GemmaTokenizer) from any source."""
    from trt_gemma.loader import is_engine_dir
    from trt_gemma.model import GemmaModel

    if is_engine_dir(source):
        config, weights, tokenizer = _engine_shard(source, tp, dtype, device, verify)
    else:
        config, weights, tokenizer = _checkpoint_shard(source, tp, dtype)
    model = GemmaModel.from_state_dict(rank_config(config, tp.size), weights, dtype=dtype,
                                       device=device, tp=tp)
    return model, tokenizer


def _checkpoint_shard(source: str | Path, tp: TensorParallel,
                      dtype: torch.dtype) -> tuple[GemmaConfig, dict[str, Any], Any]:
    from trt_gemma.checkpoint import open_checkpoint
    from trt_gemma.checkpoint.base import expected_tensor_shapes
    from trt_gemma.checkpoint.hf import HFCheckpoint

    checkpoint = open_checkpoint(source)
    config = checkpoint.config
    plan = ShardPlan(config, tp.rank, tp.size)
    weights: dict[str, Any] = {}
    if isinstance(checkpoint, HFCheckpoint):
        for name, shape in expected_tensor_shapes(config).items():
            if name not in checkpoint._locations:  # noqa: SLF001 (the reader's own index)
                raise CheckpointError(f"{checkpoint.path}: missing tensor {name}")
            file, key = checkpoint._locations[name]  # noqa: SLF001
            with safe_open(str(file), framework="pt") as f:
                stored = tuple(f.get_slice(key).get_shape())
                if stored != shape:
                    raise CheckpointError(f"{file}: tensor {key} has shape {stored}, "
                                          f"expected {shape}")
                cut = plan.cut(name)
                piece = cut and part_cut(name, "dense", "weight", shape, cut)
                weights[name] = read_slice(f, key, piece).to(dtype)
    else:  # no sliceable layout: cut each tensor as it streams by
        for name, tensor in checkpoint.tensors():
            weights[name] = plan.shard(name, tensor).to(dtype)
    return config, weights, checkpoint.load_tokenizer()


def _engine_shard(source: str | Path, tp: TensorParallel, dtype: torch.dtype,
                  device: str | torch.device,
                  verify: bool) -> tuple[GemmaConfig, dict[str, Any], Any]:
    from trt_gemma.engine_dir import read_engine
    from trt_gemma.quant.runtime import prepare_for_device

    engine = read_engine(source, verify=verify)
    plan = ShardPlan(engine.config, tp.rank, tp.size)
    owners: dict[str, tuple[str, str]] = {}  # stored name -> (weight name, part)
    for name, record in engine.quantized.items():
        fmt = record.get("format")
        if fmt not in _FORMATS:
            raise CheckpointError(f"{engine.path}: {name} has unknown quantized format {fmt!r}")
        for part in _FORMATS[fmt][1]:
            owners[f"{name.removesuffix('.weight')}.{part}"] = (name, part)
    weights: dict[str, Any] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for shard in engine.shards:
        with safe_open(str(engine.path / shard), framework="pt") as f:
            for stored in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                name, part = owners.get(stored, (stored, "weight"))
                fmt = engine.quantized[name]["format"] if name in engine.quantized else "dense"
                shape = tuple(f.get_slice(stored).get_shape())
                cut = plan.cut(name)
                group = engine.quantized.get(name, {}).get("group_size")
                piece = cut and part_cut(name, fmt, part, shape, cut, group)
                tensor = read_slice(f, stored, piece)
                if fmt == "dense":
                    weights[name] = tensor
                else:
                    parts.setdefault(name, {})[part] = tensor
    for name, p in parts.items():
        weights[name] = _assemble(name, engine.quantized[name], p, engine.path)
    weights = prepare_for_device(weights, device, dtype)
    return engine.config, weights, engine.load_tokenizer()


def _assemble(name: str, record: dict, parts: dict[str, torch.Tensor], where: Path) -> Any:
    """One rank's quantized weight from its sliced parts."""
    cls, _ = _FORMATS[record["format"]]
    try:
        if cls is Int4Weight:
            return Int4Weight(qweight=parts["qweight"], scales=parts["scales"],
                              zeros=parts.get("zeros"),
                              pre_quant_scale=parts.get("pre_quant_scale"),
                              group_size=int(record["group_size"]))
        return Fp8Weight(weight=parts["weight"], weight_scale=parts["weight_scale"],
                         input_scale=parts.get("input_scale"))
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{where}: quantized weight {name}: {e}") from None


def weight_bytes(model: Any) -> int:
    """Bytes of weight storage a model holds (each storage counted once: tied heads share one)."""
    seen: dict[int, int] = {}

    def add(w: Any) -> None:
        if w is None:
            return
        if isinstance(w, torch.Tensor):
            seen[w.untyped_storage().data_ptr()] = w.untyped_storage().nbytes()
        elif isinstance(w, tuple):
            for part in w:
                add(part)
        elif hasattr(w, "tensors"):
            for t in w.tensors().values():
                add(t)
        elif hasattr(w, "weight"):  # packed_linear.PackedLinearWeight
            add(w.weight)

    add(model.embed)
    add(model.lm_head)
    add(model.final_norm)
    for layer in model.layers:
        for f in dataclasses.fields(layer):
            add(getattr(layer, f.name))
    return sum(seen.values())
