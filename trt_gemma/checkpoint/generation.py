"""Sampling defaults from a checkpoint's ``generation_config.json`` (vLLM's ``--generation-config
auto``).

A model's authors write the sampling they recommend into ``generation_config.json`` (Gemma 3:
``top_k`` 64, ``top_p`` 0.95). vLLM applies those values to every request that does not set the
field itself, so a client moving from vLLM expects the same. We read the same keys vLLM reads and
nothing else: ``do_sample`` is not consulted (neither does vLLM), ``max_length`` is a
transformers notion of prompt + output with no request-level meaning here, and
``max_new_tokens`` (which vLLM turns into a cap on max_tokens) is not applied: our max_tokens
defaults stay OpenAI's (16 for completions, the rest of the context for chat).

GGUF files carry no generation config: their sources get the plain defaults (temperature 1, no
top-k/top-p). Engine directories record the dict at build time (engine.json,
``generation_config``), so a built engine samples like its source.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from trt_gemma.errors import CheckpointError

GENERATION_CONFIG = "generation_config.json"

# HF key -> (SamplingParams field, is it valid?): the sampling keys vLLM reads.
_KEYS = {
    "temperature": ("temperature", lambda v: v >= 0.0),
    "top_p": ("top_p", lambda v: 0.0 < v <= 1.0),
    "top_k": ("top_k", lambda v: v >= -1 and float(v).is_integer()),
    "min_p": ("min_p", lambda v: 0.0 <= v <= 1.0),
    "repetition_penalty": ("repetition_penalty", lambda v: v > 0.0),
}


def parse_generation_config(data: dict, where: str = GENERATION_CONFIG) -> dict[str, float | int]:
    """The SamplingParams defaults in an HF generation config dict (unknown keys skipped).

    A value of the wrong type or out of range is an error naming the file and key: a default
    silently dropped would change every request's sampling without a word.
    """
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: expected a JSON object")
    defaults: dict[str, float | int] = {}
    for key, (name, valid) in _KEYS.items():
        value = data.get(key)
        if value is None:
            continue
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value) or not valid(value)):
            raise CheckpointError(f"{where}: {key} = {value!r} is not a valid {name}")
        defaults[name] = int(value) if name == "top_k" else float(value)
    if defaults.get("top_k") == -1:
        defaults["top_k"] = 0  # both mean "all tokens"; SamplingParams stores 0
    return defaults


def read_generation_config(directory: str | Path) -> dict[str, float | int]:
    """Defaults from ``directory/generation_config.json``; {} when the file is absent."""
    path = Path(directory) / GENERATION_CONFIG
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None
    return parse_generation_config(data, str(path))
