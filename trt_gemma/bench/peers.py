"""Peers on the same requests in the same process: transformers' ``generate``, llama.cpp.

- ``transformers``: the whole workload as one left-padded batch (its fastest offline use), greedy,
  ``min_new_tokens = max_new_tokens`` = the longest request's output; only each request's own
  ``output_len`` tokens count. Every request finishes when the batch does, so its latencies are
  all the batch's time. Loaded from an HF directory
  directly, a GGUF (or the bundled name) through ``gguf_file=``.
- ``llama.cpp`` (llama-cpp-python, CPU, GGUF sources only): requests one after another from one
  queue (it has no batched offline API), ``Llama.generate`` stopped after exactly ``output_len``
  tokens (it never stops on EOS by itself).

- a URL (``http(s)://HOST:PORT``): any OpenAI-compatible server. The same requests (prompt token
  ids, greedy, ``ignore_eos``, ``max_tokens = output_len``) are streamed to ``/v1/completions``
  all at once (one connection each) through ``bench serve``'s request function, after one short
  warm-up request. Output tokens are the server's ``usage`` (``stream_options.include_usage``);
  the streamed chunks are counted beside them and a disagreement is recorded, not hidden. The
  server is probed (``GET /v1/models``) by ``check_peers``, before our own run starts.

``bench latency --peer transformers``: per batch, TTFT is a 1-token ``generate`` and the per-token
latency the rest of a full one divided by its remaining tokens (means only: no per-token times).

``compare`` puts each figure beside ours: ``speedup`` > 1 means trt-gemma is better (ours / peer
for rates, peer / ours for latencies).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from trt_gemma.bench.runner import summary
from trt_gemma.bench.workload import BenchRequest
from trt_gemma.errors import ConfigError

PEERS = ("transformers", "llama.cpp")
RATES = ("requests_per_s", "output_tokens_per_s", "total_tokens_per_s")
LATENCIES = ("mean", "p50", "p99")


def is_url(name: str) -> bool:
    return name.startswith(("http://", "https://"))


def check_peers(names: list[str], source: str | None, known: tuple[str, ...] = PEERS,
                urls: bool = False, url_model: str | None = None,
                api_key: str | None = None) -> dict[str, dict]:
    """Before anything runs: every peer is known, transformers has a checkpoint to read, and (with
    ``urls``) every URL peer answers ``GET /v1/models``. Returns, per URL peer, its root URL,
    served models, the model the requests will name (``url_model``, else the first listed) and
    the headers to send (``api_key`` as a bearer token; kept out of every report)."""
    from trt_gemma.bench.serve import probe

    servers = {}
    for name in names:
        if urls and is_url(name):
            url = name.rstrip("/")
            headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
            models = probe(url, headers)
            ids = [m.get("id") for m in models]
            if url_model is not None and url_model not in ids:
                raise ConfigError(f"--peer-model {url_model!r} is not served by {url}; it serves: "
                                  f"{', '.join(map(str, ids))}")
            servers[name] = {"url": url, "models": models, "model": url_model or ids[0],
                             "headers": headers}
        elif name not in known:
            extra = " or an http(s):// URL" if urls else ""
            raise ConfigError(f"unknown --peer {name!r}; known: {', '.join(known)}{extra}")
    if "transformers" in names:
        _transformers_source(source)
    return servers


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


async def _url_requests(server: dict, requests: list[BenchRequest], timeout: float):
    """Seconds for all requests at once, and each one's RequestResult (bounded by ``timeout``)."""
    import httpx

    from trt_gemma.bench.serve import ServeRequest, one_request

    args = SimpleNamespace(model=server["model"], temperature=0.0, ignore_eos=True)
    limits = httpx.Limits(max_connections=len(requests),
                          max_keepalive_connections=len(requests))
    async with httpx.AsyncClient(base_url=server["url"], limits=limits, timeout=timeout,
                                 headers=server.get("headers", {})) as http:
        first = requests[0]
        warm = ServeRequest(tuple(first.prompt_token_ids[:8]), min(2, first.output_len))
        await asyncio.wait_for(one_request(http, args, warm), timeout)  # warm-up
        start = time.perf_counter()
        results = await asyncio.wait_for(asyncio.gather(*(
            one_request(http, args, ServeRequest(tuple(r.prompt_token_ids), r.output_len))
            for r in requests)), timeout)
        return time.perf_counter() - start, results


def run_url(server: dict, requests: list[BenchRequest], timeout: float) -> dict:
    """The same figures as the other peers, from an OpenAI-compatible server (see the module
    docstring). A failed or timed-out request is a RuntimeError naming the URL."""
    try:
        elapsed, results = asyncio.run(_url_requests(server, requests, timeout))
    except asyncio.TimeoutError:
        raise RuntimeError(f"peer {server['url']}: no answer to all {len(requests)} requests "
                           f"within {timeout:g} s") from None
    failed = [r.error for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"peer {server['url']}: {len(failed)} of {len(results)} requests "
                           f"failed, first: {failed[0]}")
    streamed = sum(r.streamed_tokens for r in results)
    with_usage = [r for r in results if r.completion_tokens is not None]
    usage = sum(r.completion_tokens for r in with_usage) if with_usage else None
    tokens = sum(r.output_tokens for r in results)  # usage where sent, else the chunks
    res = _figures(requests, elapsed, [r.e2e for r in results], [r.ttft for r in results],
                   tokens)
    res.update({
        "requested_output_tokens": sum(r.output_len for r in requests),
        "usage_output_tokens": usage, "streamed_output_tokens": streamed,
        "requests_with_usage": len(with_usage),
        "usage_prompt_tokens": sum(r.prompt_tokens or 0 for r in with_usage),
        "token_counts_agree": usage == streamed and len(with_usage) == len(results),
    })
    return res


def latency_url(server: dict, requests: list[BenchRequest], timeout: float) -> dict:
    """``requests`` sent at once (a batch) to an OpenAI-compatible server: mean TTFT, time per
    output token after the first, and request latency, from each streamed reply."""
    try:
        _, results = asyncio.run(_url_requests(server, requests, timeout))
    except asyncio.TimeoutError:
        raise RuntimeError(f"peer {server['url']}: no answer within {timeout:g} s") from None
    failed = [r.error for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"peer {server['url']}: {failed[0]}")
    tpots = [r.tpot for r in results if r.tpot is not None]
    return {"ttft_s": statistics.fmean(r.ttft for r in results),
            "per_token_s": statistics.fmean(tpots) if tpots else None,
            "request_latency_s": statistics.fmean(r.e2e for r in results),
            "output_tokens": sum(r.output_tokens for r in results)}


def latency_llama_cpp(source: str, request: BenchRequest, threads: int) -> dict:
    """One request (llama-cpp-python decodes one sequence at a time): TTFT, per-token, total."""
    res = run_llama_cpp(source, [request], threads)
    total, ttft = res["elapsed_s"], res["ttft_s"]["mean"]
    n = res["output_tokens"]
    return {"ttft_s": ttft, "per_token_s": (total - ttft) / (n - 1) if n > 1 else None,
            "request_latency_s": total, "output_tokens": n}


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
