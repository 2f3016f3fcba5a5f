"""The TensorRT-LLM export's directory layout and the run-time settings that travel with it.

Shared by the converter (which writes an export) and the TensorRT-LLM runtime backend (which
serves one), so neither imports the other. An export directory holds::

    trt_gemma_export.json    our record: Gemma config, quant, profile, the trtllm-build command,
                             and "runtime" (below)
    trtllm_checkpoint/       config.json + rank{r}.safetensors (what trtllm-build reads)
    trtllm_engine/           config.json + rank{r}.engine (present once trtllm-build has run)
    tokenizer/               our tokenizer files

Why "runtime" exists: TensorRT-LLM's Gemma model switches only the rope base on local layers; the
sliding window is a run-time setting (``max_attention_window_size``, one entry per layer, repeated
cyclically when shorter), so every runner that starts an engine must be given it, or local layers
attend past their window.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trt_gemma.config import GemmaConfig
from trt_gemma.errors import CheckpointError

CHECKPOINT_DIR = "trtllm_checkpoint"
ENGINE_DIR = "trtllm_engine"
TOKENIZER_DIR = "tokenizer"
EXPORT_JSON = "trt_gemma_export.json"


def attention_windows(config: GemmaConfig, max_seq_len: int | None = None) -> list[int] | None:
    """Per-layer ``max_attention_window_size``: the sliding window on local layers, the longest
    sequence (``max_seq_len``, else the model's context) on global ones; None when every layer is
    global (Gemma 1: TensorRT-LLM's default, the whole sequence, is right)."""
    full = max_seq_len or config.max_position_embeddings
    windows = [min(config.layer_window(i) or full, full) for i in range(config.num_hidden_layers)]
    return None if all(w == full for w in windows) else windows


def runtime_settings(config: GemmaConfig, max_seq_len: int | None = None) -> dict[str, Any]:
    """What a TensorRT-LLM runner must be told for this model (recorded in the export)."""
    return {
        "max_attention_window": attention_windows(config, max_seq_len),
        "sink_token_length": 0,  # Gemma has no attention sinks
        # a KV cache shorter than the sequence wraps around (TensorRT-LLM's cyclic KV cache);
        # only local layers are given windows shorter than the sequence
        "cyclic_kv_cache": attention_windows(config, max_seq_len) is not None,
    }


def read_export(directory: str | Path) -> dict[str, Any]:
    """Our ``trt_gemma_export.json`` of an export directory; CheckpointError when absent or bad."""
    path = Path(directory) / EXPORT_JSON
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: no {EXPORT_JSON}; not a trt-gemma TensorRT-LLM "
                              "export") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
