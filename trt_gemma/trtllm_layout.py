"""The TensorRT-LLM export's directory layout and the run-time settings that travel with it.

Shared by the converter (which writes an export) and the TensorRT-LLM runtime backend (which
serves one), so neither imports the other. An export directory holds::

    trt_gemma_export.json    our record: Gemma config, quant, profile, the trtllm-build command,
                             and "runtime" (below)
    trtllm_checkpoint/       config.json + rank{r}.safetensors (what trtllm-build reads)
    trtllm_engine/           config.json + rank{r}.engine (present once trtllm-build has run)
                             + trt_gemma_runtime.json (the "runtime" block again)
    tokenizer/               our tokenizer files

Why "runtime" exists: TensorRT-LLM's Gemma model switches only the rope base on local layers; the
sliding window is a run-time setting (``max_attention_window_size``, one entry per layer, repeated
cyclically when shorter), so every runner that starts an engine must be given it, or local layers
attend past their window. This holds for Gemma 2 too: TensorRT-LLM's Gemma model has no
sliding window of its own for either generation (models/gemma/model.py passes ``is_local`` only to
pick ``rope_local_base_freq``; its README limits Gemma 2 to 4096 tokens instead).
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
# Written into trtllm_engine/ beside TensorRT-LLM's config.json once trtllm-build has run, so an
# engine directory copied on its own still carries its run-time settings.
RUNTIME_JSON = "trt_gemma_runtime.json"


def attention_windows(config: GemmaConfig, max_seq_len: int | None = None) -> list[int] | None:
    """Per-layer ``max_attention_window_size``: the sliding window on local layers, the longest
    sequence (``max_seq_len``, else the model's context) on global ones; None when every layer is
    global (Gemma 1: TensorRT-LLM's default, the whole sequence, is right)."""
    full = max_seq_len or config.max_position_embeddings
    windows = [min(config.layer_window(i) or full, full) for i in range(config.num_hidden_layers)]
    return None if all(w == full for w in windows) else windows


def cyclic_pattern(windows: list[int]) -> list[int]:
    """The shortest prefix of ``windows`` that, repeated cyclically, gives all of them.

    TensorRT-LLM repeats a ``max_attention_window`` list shorter than the layer count
    (llmapi/llm_args.py ``KvCacheConfig.max_attention_window``: "repeated multiple times to the
    number of layers"; examples/models/core/gemma/README.md logs ``(512 x5, 3100) * 4 + (512,
    512)`` for 26 layers given six values), so the period is all a runner needs.
    """
    n = len(windows)
    for p in range(1, n + 1):
        if all(windows[i] == windows[i % p] for i in range(n)):
            return windows[:p]
    return windows  # unreachable: p = n always matches


def runtime_settings(config: GemmaConfig, max_seq_len: int | None = None) -> dict[str, Any]:
    """What a TensorRT-LLM runner must be told for this model (recorded in the export)."""
    windows = attention_windows(config, max_seq_len)
    return {
        "max_attention_window": windows,  # one per layer; None: the whole sequence everywhere
        "max_attention_window_pattern": cyclic_pattern(windows) if windows else None,
        "max_seq_len": max_seq_len or config.max_position_embeddings,
        "sink_token_length": 0,  # Gemma has no attention sinks
        # a KV cache shorter than the sequence wraps around (TensorRT-LLM's cyclic KV cache);
        # only local layers are given windows shorter than the sequence
        "cyclic_kv_cache": windows is not None,
    }


def runner_hint(settings: dict[str, Any], engine_dir: str | Path, tokenizer_dir: str | Path,
                tp_size: int = 1) -> list[str]:
    """Lines telling a user of TensorRT-LLM's own runners how to start this engine correctly:
    ``examples/run.py`` flags (examples/utils.py ``add_common_args``:
    ``--max_attention_window_size`` nargs="+", ``--sink_token_length``) and the LLM API form."""
    import shlex

    windows = settings.get("max_attention_window")
    pattern = settings.get("max_attention_window_pattern") or windows
    sink = int(settings.get("sink_token_length") or 0)
    cmd = ["python", "examples/run.py", "--engine_dir", str(engine_dir),
           "--tokenizer_dir", str(tokenizer_dir), "--max_output_len", "256"]
    if pattern:
        cmd += ["--max_attention_window_size", *map(str, pattern)]
    cmd += ["--sink_token_length", str(sink), "--input_text", "Hello"]
    if tp_size > 1:
        cmd = ["mpirun", "-n", str(tp_size), *cmd]
    kv = (f"KvCacheConfig(max_attention_window={list(pattern)}, sink_token_length={sink})"
          if pattern else f"KvCacheConfig(sink_token_length={sink})")
    lines = ["To run it with TensorRT-LLM's own runners, pass its per-layer attention windows:"]
    if pattern:
        n = len(windows)
        lines.append(f"  ({len(pattern)} value(s) cover all {n} layers: TensorRT-LLM repeats a "
                     "shorter list cyclically; local layers keep only their window)")
    else:
        lines.append("  (every layer attends to the whole sequence: no window flags needed)")
    lines += ["  " + shlex.join(cmd),
              f"  LLM API: LLM({str(engine_dir)!r}, tokenizer={str(tokenizer_dir)!r}, "
              f"kv_cache_config={kv})"]
    return lines


def read_engine_runtime(engine_dir: str | Path) -> dict[str, Any] | None:
    """The run-time settings recorded beside a built engine, or None when absent."""
    path = Path(engine_dir) / RUNTIME_JSON
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None


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
