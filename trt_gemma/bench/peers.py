"""Peers on the same requests in the same process: transformers' ``generate``, llama.cpp.

- ``transformers``: the whole workload as one left-padded batch (its fastest offline use), greedy,
  ``min_new_tokens = max_new_tokens`` = the longest request's output; only each request's own
  ``output_len`` tokens count. Every request finishes when the batch does, so its latencies are
  all the batch's time. Loaded the way ``benchmarks/throughput.py`` loads it: an HF directory
  directly, a GGUF (or the bundled name) through ``gguf_file=``.
- ``llama.cpp`` (llama-cpp-python, CPU, GGUF sources only): requests one after another from one
  queue (it has no batched offline API), ``Llama.generate`` stopped after exactly ``output_len``
  tokens (it never stops on EOS by itself).

``bench latency --peer transformers``: per batch, TTFT is a 1-token ``generate`` and the per-token
latency the rest of a full one divided by its remaining tokens (means only: no per-token times).

``compare`` puts each figure beside ours: ``speedup`` > 1 means trt-gemma is better (ours / peer
for rates, peer / ours for latencies).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from trt_gemma.bench.runner import summary
from trt_gemma.bench.workload import BenchRequest
from trt_gemma.errors import ConfigError

PEERS = ("transformers", "llama.cpp")
RATES = ("requests_per_s", "output_tokens_per_s", "total_tokens_per_s")
LATENCIES = ("mean", "p50", "p99")


def check_peers(names: list[str], source: str | None, known: tuple[str, ...] = PEERS) -> None:
    """Before anything runs: every peer is known, and transformers has a checkpoint to read."""
    for name in names:
        if name not in known:
            raise ConfigError(f"unknown --peer {name!r}; known: {', '.join(known)}")
    if "transformers" in names:
        _transformers_source(source)


def _transformers_source(source: str | None) -> str:
    from trt_gemma.loader import is_engine_dir

    if source is None or is_engine_dir(source):
        raise ConfigError("--peer transformers needs a checkpoint SOURCE (HF dir, .gguf or "
                          "bundled name): it cannot read random weights or an engine dir")
    return source


def gguf_of(source: str) -> Path | None:
    """The GGUF file a source is (a .gguf path or a bundled name), else None."""
    from trt_gemma.checkpoint.bundled import BUNDLED, bundled_gguf_path

    if source in BUNDLED:
        return bundled_gguf_path(source)
    return Path(source) if str(source).endswith(".gguf") else None


def load_transformers(source: str | None, dtype: torch.dtype, device: torch.device):
    source = _transformers_source(source)
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise ConfigError("--peer transformers needs transformers (pip install "
                          "transformers)") from None
    gguf = gguf_of(source)
    if gguf is not None:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    return model.to(device).eval()


def _figures(requests: list[BenchRequest], elapsed: float, latencies: list[float],
             ttfts: list[float] | None, output_tokens: int) -> dict:
    inputs = sum(r.input_len for r in requests)
    return {
        "num_requests": len(requests), "input_tokens": inputs, "output_tokens": output_tokens,
        "elapsed_s": elapsed, "requests_per_s": len(requests) / elapsed,
        "output_tokens_per_s": output_tokens / elapsed,
        "total_tokens_per_s": (inputs + output_tokens) / elapsed,
        "latency_s": summary(latencies), "ttft_s": summary(ttfts or []),
    }


def _padded(requests: list[BenchRequest], pad_id: int, device: torch.device):
    """Left-padded [requests, longest prompt] ids and attention mask, on ``device``."""
    width = max(r.input_len for r in requests)
    input_ids = torch.full((len(requests), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, r in enumerate(requests):
        input_ids[row, width - r.input_len:] = torch.tensor(r.prompt_token_ids)
        mask[row, width - r.input_len:] = 1
    return input_ids.to(device), mask.to(device)


def _generate(model, input_ids, mask, new: int, pad_id: int) -> float:
    """Seconds for one greedy ``generate`` of exactly ``new`` tokens per row."""
    _sync(model.device)
    start = time.perf_counter()
    out = model.generate(input_ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, pad_token_id=pad_id)
    _sync(model.device)
    elapsed = time.perf_counter() - start
    if out.shape[1] - input_ids.shape[1] != new:
        raise RuntimeError(f"transformers generated {out.shape[1] - input_ids.shape[1]} tokens, "
                           f"expected {new}")
    return elapsed


@torch.inference_mode()
def run_transformers(model, requests: list[BenchRequest], pad_id: int) -> dict:
    input_ids, mask = _padded(requests, pad_id, model.device)
    new = max(r.output_len for r in requests)
    _generate(model, input_ids[:1, -8:], mask[:1, -8:], 2, pad_id)  # warm-up
    elapsed = _generate(model, input_ids, mask, new, pad_id)
    useful = sum(r.output_len for r in requests)
    res = _figures(requests, elapsed, [elapsed] * len(requests), None, useful)
    res["generated_tokens"] = len(requests) * new  # padding rows included
    res["ttft_s"] = None  # one batched generate call: no per-token times
    return res


@torch.inference_mode()
def latency_transformers(model, requests: list[BenchRequest], pad_id: int) -> dict:
    """One batch: TTFT = a 1-token generate; per-token = (the full generate - TTFT) / (n - 1)."""
    input_ids, mask = _padded(requests, pad_id, model.device)
    new = max(r.output_len for r in requests)
    _generate(model, input_ids[:1, -8:], mask[:1, -8:], 2, pad_id)  # warm-up
    ttft = _generate(model, input_ids, mask, 1, pad_id)
    full = _generate(model, input_ids, mask, new, pad_id) if new > 1 else ttft
    return {"ttft_s": ttft, "per_token_s": (full - ttft) / (new - 1) if new > 1 else None,
            "request_latency_s": full}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def llama_cpp_skip_reason(source: str | None) -> str | None:
    """Why the llama.cpp peer cannot run here, or None when it can."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python is not installed: pip install llama-cpp-python"
    if source is None or gguf_of(source) is None:
        return "llama.cpp reads GGUF files only: SOURCE is not a .gguf or bundled name"
    return None


def run_llama_cpp(source: str, requests: list[BenchRequest], threads: int) -> dict:
    from llama_cpp import Llama

    longest = max(r.input_len + r.output_len for r in requests)
    llm = Llama(model_path=str(gguf_of(source)), n_ctx=longest + 8, n_threads=threads,
                verbose=False)

    def generate(r: BenchRequest, first: list[float] | None, start: float) -> int:
        n = 0
        for _ in llm.generate(list(r.prompt_token_ids), temp=0.0, reset=True):
            n += 1
            if n == 1 and first is not None:
                first.append(time.perf_counter() - start)
            if n == r.output_len:
                break
        return n

    generate(BenchRequest(requests[0].prompt_token_ids[:8], 2), None, 0.0)  # warm-up
    start = time.perf_counter()
    ttfts: list[float] = []
    latencies, tokens = [], 0
    for r in requests:
        tokens += generate(r, ttfts, start)
        latencies.append(time.perf_counter() - start)
    elapsed = time.perf_counter() - start
    return _figures(requests, elapsed, latencies, ttfts, tokens)


def compare(ours: dict, peer: dict) -> dict:
    """Each figure of both sides and ``speedup`` (> 1: trt-gemma better)."""
    out = {}
    for key in RATES:
        out[key] = {"trt_gemma": ours[key], "peer": peer[key], "speedup": ours[key] / peer[key]}
    for stat in LATENCIES:
        a, b = ours["latency_s"][stat], peer["latency_s"][stat]
        out[f"latency_{stat}_s"] = {"trt_gemma": a, "peer": b,
                                    "speedup": b / a if a and b is not None else None}
    return out


def compare_latency(ours: dict, peer: dict) -> dict:
    """Mean TTFT, per-token and request latency of both sides; ``speedup`` = peer / ours."""
    out = {}
    for key in ("ttft_s", "per_token_s", "request_latency_s"):
        a, b = ours[key]["mean"], peer[key]
        out[key] = {"trt_gemma": a, "peer": b, "speedup": b / a if a and b is not None else None}
    return out
