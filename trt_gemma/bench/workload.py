"""The requests a benchmark runs: synthetic lengths, or a JSONL dataset.

Synthetic prompts are random token ids (as trtllm-bench's ``prepare_dataset`` makes them): greedy
decoding with ``ignore_eos`` makes the content irrelevant to the cost, and random ids need no
tokenizer, so random-weight models at a preset's shapes run the same workloads.

A dataset is JSON Lines in the format trtllm-bench also reads, one request per line:
``{"prompt": "text" | "input_ids": [int, ...], "output_tokens": int}`` (other keys, such as
``task_id``, are ignored). Every line is checked before anything runs; an error names the file
and the line.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from trt_gemma.errors import ConfigError


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: tuple[int, ...]  # the whole prompt, BOS included when there is one
    output_len: int  # tokens to generate exactly (greedy, ignore_eos)
    origin: str | None = None  # "FILE:LINE" of a dataset request, for error messages

    @property
    def input_len(self) -> int:
        return len(self.prompt_token_ids)


def spread_lengths(rng: random.Random, mean: int, spread: float, count: int) -> list[int]:
    """``count`` lengths uniform over mean*(1-spread) .. mean*(1+spread), each at least 1."""
    lo, hi = max(1, round(mean * (1 - spread))), max(1, round(mean * (1 + spread)))
    return [rng.randint(lo, hi) for _ in range(count)]


def synthetic(num_requests: int, input_len: int, output_len: int, vocab_size: int,
              spread: float = 0.0, seed: int = 0, bos_id: int | None = None,
              first_id: int = 4) -> list[BenchRequest]:
    """Random prompts of ``input_len`` tokens (led by BOS when given) and ``output_len`` outputs,
    both spread by ``spread`` (0 = fixed). Ids start at ``first_id``: the specials stay out."""
    for name, value in (("--num-requests", num_requests), ("--input-len", input_len),
                        ("--output-len", output_len)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if not 0.0 <= spread < 1.0:
        raise ConfigError(f"--len-spread must be in [0, 1), got {spread}")
    rng = random.Random(seed)
    inputs = spread_lengths(rng, input_len, spread, num_requests)
    outputs = spread_lengths(rng, output_len, spread, num_requests)
    first_id = min(first_id, vocab_size - 1)
    requests = []
    for n_in, n_out in zip(inputs, outputs):
        ids = [rng.randrange(first_id, vocab_size) for _ in range(n_in)]
        if bos_id is not None:
            ids[0] = bos_id
        requests.append(BenchRequest(tuple(ids), n_out))
    return requests


def load_dataset(path: str | Path, tokenizer, vocab_size: int) -> list[BenchRequest]:
    """Parse a JSONL dataset; text prompts are encoded with ``tokenizer`` (BOS added)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError(f"cannot read dataset {path}: {e.strerror or e}") from None
    requests = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            requests.append(_parse_line(line, f"{path}:{number}", tokenizer, vocab_size))
    if not requests:
        raise ConfigError(f"dataset {path} has no requests")
    return requests


def _parse_line(line: str, where: str, tokenizer, vocab_size: int) -> BenchRequest:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(record).__name__}")
    out = record.get("output_tokens")
    if isinstance(out, bool) or not isinstance(out, int) or out < 1:
        raise ConfigError(f"{where}: 'output_tokens' must be a positive integer, got {out!r}")
    if "input_ids" in record:
        ids = record["input_ids"]
        if (not isinstance(ids, list) or not ids
                or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids)):
            raise ConfigError(f"{where}: 'input_ids' must be a non-empty list of integers")
        if min(ids) < 0 or max(ids) >= vocab_size:
            raise ConfigError(f"{where}: 'input_ids' must be in [0, {vocab_size})")
    elif "prompt" in record:
        if not isinstance(record["prompt"], str) or not record["prompt"]:
            raise ConfigError(f"{where}: 'prompt' must be a non-empty string")
        if tokenizer is None:
            raise ConfigError(f"{where}: a text 'prompt' needs a tokenizer (random weights have "
                              "none): give 'input_ids'")
        ids = tokenizer.encode(record["prompt"])
    else:
        raise ConfigError(f"{where}: needs 'prompt' (a string) or 'input_ids' (a list of ids)")
    return BenchRequest(tuple(ids), out, where)


def describe(requests: list[BenchRequest]) -> dict:
    """Counts for the JSON: how many requests and tokens, and the length ranges."""
    ins = [r.input_len for r in requests]
    outs = [r.output_len for r in requests]
    return {"num_requests": len(requests), "input_tokens": sum(ins), "output_tokens": sum(outs),
            "input_len_min": min(ins), "input_len_max": max(ins),
            "output_len_min": min(outs), "output_len_max": max(outs)}
