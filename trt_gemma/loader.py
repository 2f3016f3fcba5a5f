"""Load a model and its tokenizer from any source: bundled name, .gguf, HF directory, engine dir."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from trt_gemma.errors import ConfigError
from trt_gemma.model import GemmaModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """'auto' is bfloat16 on CUDA (Gemma 2/3 overflow float16) and float32 on CPU (faster there)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; expected auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def is_engine_dir(source: str | Path) -> bool:
    return (Path(source) / "engine.json").is_file()


def load_model(source: str | Path, dtype: str | torch.dtype = "auto",
               device: str | torch.device = "cpu", verify: bool = True, tp=None):
    """(GemmaModel, GemmaTokenizer) from a checkpoint source or an engine directory.

    With a ``TensorParallel`` context of size > 1 (``distributed/group.py``): the model of that
    rank, which reads only its shard of the weights (``distributed/loading.py``).
    """
    dtype = resolve_dtype(dtype, device)
    if tp is not None and tp.size > 1:
        from trt_gemma.distributed.loading import load_rank_model

        return load_rank_model(source, tp, dtype, device, verify)
    if is_engine_dir(source):
        from trt_gemma.engine_dir import read_engine
        from trt_gemma.quant.runtime import prepare_for_device

        engine = read_engine(source, verify=verify)
        config, weights, tokenizer = engine.config, engine.load_weights(), engine.load_tokenizer()
        # dequantize formats without a kernel here, straight to the model's dtype
        weights = prepare_for_device(weights, device, dtype)
    else:
        from trt_gemma.checkpoint import open_checkpoint

        checkpoint = open_checkpoint(source)
        config, tokenizer = checkpoint.config, checkpoint.load_tokenizer()
        # Convert tensor by tensor so peak memory is one model in the target dtype, not two.
        weights = {name: t.to(dtype) for name, t in checkpoint.tensors()}
    if dtype == torch.float16 and config.architecture in ("gemma2", "gemma3"):
        warnings.warn(
            f"{config.architecture} activations overflow float16; prefer bfloat16", stacklevel=2
        )
    return GemmaModel.from_state_dict(config, weights, dtype=dtype, device=device), tokenizer
