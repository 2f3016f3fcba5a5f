"""What a benchmark runs: a model loaded from a source, or random weights at a preset's shapes.

Random weights measure speed without downloading a checkpoint: the cost of a forward pass depends
on the shapes (and dtype / quant format), not on the values. ``num_layers`` cuts a preset's
decoder short so a CPU can run e.g. gemma-7b's layer shapes at all; the JSON records it, since
then the figures are not the whole model's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from trt_gemma.config import GemmaConfig, preset
from trt_gemma.errors import ConfigError
from trt_gemma.model import GemmaModel

INIT_STD = 0.02  # random linear and embedding weights: small enough that bf16 never overflows


@dataclass(frozen=True)
class BenchTarget:
    model: GemmaModel
    tokenizer: Any  # GemmaTokenizer, or None for random weights
    info: dict[str, Any]  # what was loaded, for the JSON: source or preset, layers, quant, dtype


def truncated(config: GemmaConfig, num_layers: int | None) -> GemmaConfig:
    """The config with its first ``num_layers`` decoder layers (None: unchanged)."""
    if num_layers is None:
        return config
    if not 1 <= num_layers <= config.num_hidden_layers:
        raise ConfigError(f"--num-layers must be in [1, {config.num_hidden_layers}], "
                          f"got {num_layers}")
    return dataclasses.replace(config, num_hidden_layers=num_layers,
                               layer_types=config.layer_types[:num_layers])


def random_model(config: GemmaConfig, dtype: torch.dtype, device: str, seed: int = 0
                 ) -> GemmaModel:
    """A GemmaModel with random weights of ``config``'s shapes, made on ``device``."""
    from trt_gemma.checkpoint.base import expected_tensor_shapes

    gen = torch.Generator(device).manual_seed(seed)
    weights = {}
    for name, shape in expected_tensor_shapes(config).items():
        t = torch.empty(shape, dtype=dtype, device=device)
        std = 0.1 if "norm" in name else INIT_STD  # norms multiply by (1 + w)
        weights[name] = t.normal_(0.0, std, generator=gen)
    return GemmaModel.from_state_dict(config, weights, dtype=dtype, device=device)


def load_target(source: str | None, *, random_weights: bool, preset_name: str | None,
                num_layers: int | None, dtype: str, device: str, verify: bool = True
                ) -> BenchTarget:
    from trt_gemma.loader import load_model, resolve_dtype

    torch_dtype = resolve_dtype(dtype, device)
    dtype_name = str(torch_dtype).removeprefix("torch.")
    if random_weights:
        if preset_name is None:
            raise ConfigError("--random-weights needs --preset NAME (the shapes to use)")
        if source is not None:
            raise ConfigError(f"--random-weights takes no SOURCE (got {source!r}): the weights "
                              "are random at --preset's shapes")
        full = preset(preset_name)
        config = truncated(full, num_layers)
        model = random_model(config, torch_dtype, device)
        info = {"source": None, "random_weights": True, "preset": preset_name,
                "num_layers": config.num_hidden_layers,
                "preset_num_layers": full.num_hidden_layers,
                "layers_truncated": config.num_hidden_layers != full.num_hidden_layers,
                "quant": "none", "dtype": dtype_name}
        return BenchTarget(model, None, info)
    _check_source_args(source, preset_name, num_layers)
    model, tokenizer = load_model(source, dtype=torch_dtype, device=device, verify=verify)
    return BenchTarget(model, tokenizer, _source_info(source, model, dtype_name))


def start_sharded_target(source: str | None, *, random_weights: bool, preset_name: str | None,
                         num_layers: int | None, dtype: str, device: str, verify: bool,
                         engine_config: dict):
    """(BenchTarget, LLMEngine) over ``engine_config["tensor_parallel_size"]`` ranks: the
    engine loads rank 0's shard here and starts the other ranks (``LLMEngine.from_source``);
    the target's model is rank 0's shard (its config has rank 0's heads)."""
    from trt_gemma.loader import resolve_dtype
    from trt_gemma.runtime import LLMEngine

    size = engine_config["tensor_parallel_size"]
    if random_weights:
        raise ConfigError(f"--random-weights with --tensor-parallel-size {size}: each rank "
                          "loads its shard from a checkpoint; give a SOURCE instead")
    _check_source_args(source, preset_name, num_layers)
    torch_dtype = resolve_dtype(dtype, device)
    engine = LLMEngine.from_source(source, dtype=torch_dtype, device=device, verify=verify,
                                   **engine_config)
    info = _source_info(source, engine.model, str(torch_dtype).removeprefix("torch."))
    return BenchTarget(engine.model, engine.tokenizer, info), engine


def _check_source_args(source: str | None, preset_name: str | None,
                       num_layers: int | None) -> None:
    if preset_name is not None:
        raise ConfigError("--preset applies to --random-weights only")
    if num_layers is not None:
        raise ConfigError("--num-layers applies to --random-weights only")
    if source is None:
        raise ConfigError("SOURCE (a bundled name, .gguf, HF dir or engine dir) is required "
                          "unless --random-weights is given")


def _source_info(source: str, model: GemmaModel, dtype_name: str) -> dict[str, Any]:
    from trt_gemma.loader import is_engine_dir

    quant = "none"
    if is_engine_dir(source):
        from trt_gemma.engine_dir import read_engine

        quant = read_engine(source, verify=False).quant.mode
    return {"source": str(source), "random_weights": False, "preset": None,
            "num_layers": model.config.num_hidden_layers, "layers_truncated": False,
            "quant": quant, "dtype": dtype_name, "tensor_parallel_size": model.tp.size}
