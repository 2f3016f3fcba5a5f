"""Is a model source a TensorRT-LLM engine, and where are its engine, tokenizer and settings.

Two layouts are recognised (nothing is imported from TensorRT-LLM to tell):

- a trt-gemma export (``trt_gemma_export.json``, see ``trt_gemma/trtllm_layout.py``): the engine
  in ``trtllm_engine/``, our tokenizer in ``tokenizer/``, the run-time settings (per-layer
  attention windows, sink tokens) in the export record. Its ``trtllm_engine/`` directory named
  directly counts as the export too.
- a bare TensorRT-LLM engine directory: ``config.json`` with ``build_config`` and
  ``pretrained_config`` (what ``trtllm-build`` writes) beside ``rank0.engine``; the tokenizer is
  a sibling ``tokenizer/`` directory or the engine directory itself. Only Gemma 1 engines can be
  served this way: Gemma 2 / 3 need per-layer attention windows that only our export records
  (TensorRT-LLM takes the sliding window at run time, not from the engine).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trt_gemma.errors import CheckpointError
from trt_gemma.trtllm_layout import ENGINE_DIR, EXPORT_JSON, TOKENIZER_DIR, read_export

ENGINE_CONFIG = "config.json"
# TensorRT-LLM architectures whose local layers need run-time attention windows
WINDOWED_ARCHITECTURES = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")


@dataclass(frozen=True)
class TrtllmSource:
    """Everything needed to start TensorRT-LLM on an engine, read from disk without it."""

    source: Path  # what the user named
    engine_dir: Path  # config.json + rank{r}.engine
    tokenizer_dir: Path
    engine_config: dict[str, Any]  # the engine's config.json
    max_attention_window: list[int] | None  # per layer (repeated cyclically); None: full
    sink_token_length: int
    generation_defaults: dict[str, Any]  # SamplingParams fields the export recorded

    @property
    def build_config(self) -> dict[str, Any]:
        return self.engine_config.get("build_config") or {}

    @property
    def pretrained_config(self) -> dict[str, Any]:
        return self.engine_config.get("pretrained_config") or {}

    @property
    def max_seq_len(self) -> int:
        return int(self.build_config.get("max_seq_len")
                   or self.pretrained_config.get("max_position_embeddings"))

    @property
    def max_batch_size(self) -> int:
        return int(self.build_config.get("max_batch_size") or 1)

    @property
    def max_num_tokens(self) -> int | None:
        value = self.build_config.get("max_num_tokens")
        return int(value) if value else None

    @property
    def vocab_size(self) -> int:
        return int(self.pretrained_config["vocab_size"])

    @property
    def world_size(self) -> int:
        mapping = self.pretrained_config.get("mapping") or {}
        return int(mapping.get("world_size", 1))

    def kv_bytes_per_token(self) -> int:
        """K and V of every layer for one token (to turn a byte budget into tokens)."""
        pc = self.pretrained_config
        quant = pc.get("quantization") or {}
        element = 1 if quant.get("kv_cache_quant_algo") in ("FP8", "INT8") else 2
        head = pc.get("head_size") or pc["hidden_size"] // pc["num_attention_heads"]
        kv_heads = pc.get("num_key_value_heads") or pc["num_attention_heads"]
        return 2 * pc["num_hidden_layers"] * kv_heads * head * element


def looks_like_engine_dir(path: Path) -> bool:
    """config.json with TensorRT-LLM's build_config + pretrained_config, and rank0.engine."""
    config = _engine_config(path)
    return config is not None and (path / "rank0.engine").is_file()


def find_trtllm_source(source: str | Path, tokenizer: str | Path | None = None
                       ) -> TrtllmSource | None:
    """The TensorRT-LLM engine ``source`` names, or None when it is no TensorRT-LLM layout (a
    bundled name, a .gguf file, an HF or native engine directory). CheckpointError when it is
    one but cannot be served: an export whose engine was never built, rank files missing, no
    tokenizer, a Gemma 2/3 engine without the export's attention windows."""
    path = Path(source)
    if not path.is_dir():
        return None
    if not (path / EXPORT_JSON).is_file() and (path.parent / EXPORT_JSON).is_file() and (
            path.name == ENGINE_DIR):
        path = path.parent  # the export's engine directory named directly
    if (path / EXPORT_JSON).is_file():
        return _from_export(Path(source), path, tokenizer)
    if _engine_config(path) is not None:
        return _from_engine_dir(path, tokenizer)
    return None


def _from_export(source: Path, root: Path, tokenizer: str | Path | None) -> TrtllmSource:
    export = read_export(root)
    engine_dir = root / ENGINE_DIR
    config = _engine_config(engine_dir)
    if config is None:
        command = export.get("trtllm_build_command") or "trtllm-build (see the build's output)"
        raise CheckpointError(f"{root}: the TensorRT-LLM engine was never built (no "
                              f"{ENGINE_DIR}/{ENGINE_CONFIG}); run the recorded command: "
                              f"{command}")
    runtime = export.get("runtime") or {}
    windows = runtime.get("max_attention_window")
    _check_ranks(engine_dir, config)
    return TrtllmSource(
        source=source, engine_dir=engine_dir,
        tokenizer_dir=_tokenizer_dir(root, engine_dir, tokenizer),
        engine_config=config,
        max_attention_window=[int(w) for w in windows] if windows else None,
        sink_token_length=int(runtime.get("sink_token_length") or 0),
        generation_defaults=dict(export.get("generation_config") or {}),
    )


def _from_engine_dir(engine_dir: Path, tokenizer: str | Path | None) -> TrtllmSource:
    config = _engine_config(engine_dir)
    arch = (config.get("pretrained_config") or {}).get("architecture")
    if arch in WINDOWED_ARCHITECTURES:
        raise CheckpointError(
            f"{engine_dir}: a {arch} TensorRT-LLM engine without trt-gemma's export record "
            f"({EXPORT_JSON}), so its per-layer attention windows are unknown and local layers "
            "would attend past their window; serve the directory `trt-gemma build --backend "
            "trtllm` wrote instead")
    _check_ranks(engine_dir, config)
    return TrtllmSource(
        source=engine_dir, engine_dir=engine_dir,
        tokenizer_dir=_tokenizer_dir(engine_dir.parent, engine_dir, tokenizer),
        engine_config=config, max_attention_window=None, sink_token_length=0,
        generation_defaults={},
    )


def _engine_config(directory: Path) -> dict[str, Any] | None:
    path = directory / ENGINE_CONFIG
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    if not isinstance(config, dict) or not {"build_config", "pretrained_config"} <= set(config):
        return None  # an HF config.json or a TensorRT-LLM checkpoint, not an engine
    return config


def _check_ranks(engine_dir: Path, config: dict[str, Any]) -> None:
    mapping = (config.get("pretrained_config") or {}).get("mapping") or {}
    world = int(mapping.get("world_size", 1))
    missing = [f"rank{r}.engine" for r in range(world) if not (engine_dir / f"rank{r}.engine")
               .is_file()]
    if missing:
        raise CheckpointError(f"{engine_dir}: {', '.join(missing)} missing (the engine has "
                              f"{world} ranks); rebuild it with trtllm-build")


def _tokenizer_dir(root: Path, engine_dir: Path, given: str | Path | None) -> Path:
    candidates = [Path(given)] if given is not None else [root / TOKENIZER_DIR, engine_dir]
    for candidate in candidates:
        if (candidate / "tokenizer.json").is_file() or (candidate / "tokenizer.model").is_file():
            return candidate
    where = " or ".join(str(c) for c in candidates)
    raise CheckpointError(f"{engine_dir}: no tokenizer found in {where} (tokenizer.json)")
