"""``trt-gemma bench serve``: an online sweep against any OpenAI-compatible server (ours, vLLM ...).

Streams ``/v1/completions`` (raw SSE over httpx, so nothing SDK-specific) at a sweep of loads and
reports, per load point: time to first token, inter-token latency (gaps between streamed chunks),
time per output token, end-to-end latency (mean/p50/p90/p99), request and token throughput, and
goodput: completed requests per second that met the SLO (TTFT <= --slo-ttft and mean time per
output token <= --slo-itl). Token counts are the server's own: every request asks for
``stream_options: {"include_usage": true}`` and the final usage chunks are summed; the chunks
counted on the stream are recorded beside them, so a server that merges tokens into one chunk
(which would flatter the inter-token latency) shows up as a mismatch.

Load: ``--concurrency`` runs N closed-loop clients (each sends its next request when its last one
ends); ``--request-rate`` sends Poisson arrivals at R requests/s, however many are in flight.
Every request asks for exactly its output length (``ignore_eos``, a vLLM extension; drop it with
--no-ignore-eos for servers that refuse unknown fields). Synthetic prompts are token ids, so the
input length is exact without a tokenizer on this side; a dataset is the JSONL of
trt_gemma/bench/workload.py (text prompts are sent as text, for the server to tokenize).

Failures: the server is probed (GET /v1/models) before anything runs, and an unreachable one is a
one-line error. A transport error during the sweep probes it again; if it is gone, the sweep
stops, the JSON keeps every load point measured so far (the interrupted one marked incomplete),
says why, and the command exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trt_gemma.errors import ConfigError

BOS_ID = 2  # every Gemma tokenizer's <bos>: led by it, synthetic prompts look like real ones
PROBE_TIMEOUT_S = 10.0
MAX_ERRORS_KEPT = 5
EXIT_INCOMPLETE = 1


def add_arguments(p: argparse.ArgumentParser, *, standalone: bool = False) -> None:
    """The options of ``trt-gemma bench serve``. ``standalone`` (benchmarks/serving.py) keeps the
    old script's defaults: a local URL, concurrency 1,4,8 and an optional --out."""
    p.add_argument("--url", required=not standalone,
                   default="http://127.0.0.1:8000" if standalone else None,
                   help="server root, without /v1")
    p.add_argument("--model", default=None, help="default: the first of GET /v1/models")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="sent as 'Authorization: Bearer KEY' (env OPENAI_API_KEY)")
    load = p.add_mutually_exclusive_group(required=not standalone)
    load.add_argument("--concurrency", default=None, help="closed-loop clients, e.g. 1,4,8")
    load.add_argument("--request-rate", default=None, help="Poisson requests/s, e.g. 0.5,1,2")
    p.add_argument("--num-prompts", type=int, default=None,
                   help="requests per load point (default 16, or the dataset's size)")
    p.add_argument("--input-len", type=int, default=32, help="synthetic prompt tokens")
    p.add_argument("--output-len", "--max-tokens", dest="output_len", type=int, default=32,
                   help="synthetic output tokens per request")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="synthetic prompt ids are drawn from [4, V) (default 256: valid for any "
                        "Gemma vocabulary); also the bound dataset input_ids are checked against")
    p.add_argument("--dataset", default=None,
                   help='JSONL: {"prompt": str | "input_ids": [int], "output_tokens": int}')
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false")
    p.add_argument("--slo-ttft", type=float, default=2.0, help="seconds (goodput)")
    p.add_argument("--slo-itl", type=float, default=0.2,
                   help="seconds per output token after the first (goodput)")
    p.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default="", help="free text stored in the JSON (server flags ...)")
    p.add_argument("--output-json", "--out", dest="output_json", required=not standalone,
                   default=None, help="where to write the results")
    p.add_argument("--plot", default=None, help="PNG: latency percentiles and throughput per load")


# Options and workload -------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadPoint:
    concurrency: int | None = None  # closed-loop clients, or
    rate: float | None = None  # Poisson arrivals per second

    @property
    def name(self) -> str:
        return (f"concurrency {self.concurrency}" if self.concurrency is not None
                else f"rate {self.rate:g}/s")


@dataclass(frozen=True)
class ServeRequest:
    prompt: str | tuple[int, ...]  # text for the server to tokenize, or token ids
    output_len: int


def parse_loads(concurrency: str | None, rate: str | None) -> list[LoadPoint]:
    def numbers(text: str, flag: str, kind) -> list:
        try:
            values = [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"{flag} must be comma-separated numbers, got {text!r}") from None
        if not values or min(values) <= 0:
            raise ConfigError(f"{flag} must be > 0, got {text!r}")
        return values

    if rate is not None:
        return [LoadPoint(rate=r) for r in numbers(rate, "--request-rate", float)]
    return [LoadPoint(concurrency=c) for c in numbers(concurrency or "1,4,8", "--concurrency", int)]


def check_args(args: argparse.Namespace) -> None:
    checks = [("--num-prompts", args.num_prompts is None or args.num_prompts >= 1, ">= 1"),
              ("--input-len", args.input_len >= 1, ">= 1"),
              ("--output-len", args.output_len >= 1, ">= 1"),
              ("--vocab-size", args.vocab_size is None or args.vocab_size > 4, "> 4"),
              ("--timeout", args.timeout > 0, "> 0"),
              ("--slo-ttft", args.slo_ttft > 0, "> 0"), ("--slo-itl", args.slo_itl > 0, "> 0")]
    for flag, ok, want in checks:
        if not ok:
            value = getattr(args, flag[2:].replace("-", "_"))
            raise ConfigError(f"{flag} must be {want}, got {value!r}")
    if not args.url.startswith(("http://", "https://")):
        raise ConfigError(f"--url must start with http:// or https://, got {args.url!r}")
    if args.dataset is not None and not Path(args.dataset).is_file():
        raise ConfigError(f"--dataset {args.dataset}: no such file")


class _ServerTokenizes:
    """load_dataset's tokenizer: text prompts go to the server as text, so only validate them."""

    def encode(self, text: str) -> list[int]:
        return []


def workload(args: argparse.Namespace) -> tuple[list[ServeRequest], dict[str, Any]]:
    """The requests of every load point (the same ones each time) and their JSON description."""
    from trt_gemma.bench.workload import describe, load_dataset, synthetic

    if args.dataset is None:
        n = args.num_prompts or 16
        vocab = args.vocab_size or 256
        made = synthetic(n, args.input_len, args.output_len, vocab, seed=args.seed, bos_id=BOS_ID)
        info = {"kind": "synthetic", "input_len": args.input_len, "output_len": args.output_len,
                "vocab_size": vocab, "seed": args.seed, **describe(made)}
        return [ServeRequest(r.prompt_token_ids, r.output_len) for r in made], info
    # The workload module validates every line (its errors name FILE:LINE); the payloads are
    # then read back from the same non-blank lines, in the same order.
    checked = load_dataset(args.dataset, _ServerTokenizes(), args.vocab_size or 1 << 31)
    lines = [ln for ln in Path(args.dataset).read_text(encoding="utf-8").splitlines() if ln.strip()]
    requests = []
    for line, req in zip(lines, checked):
        record = json.loads(line)
        prompt = tuple(record["input_ids"]) if "input_ids" in record else record["prompt"]
        requests.append(ServeRequest(prompt, req.output_len))
    n = args.num_prompts or len(requests)
    requests = [requests[i % len(requests)] for i in range(n)]  # cycled to --num-prompts
    outs = [r.output_len for r in requests]
    info = {"kind": "dataset", "dataset": str(args.dataset), "num_requests": n,
            "token_id_prompts": sum(not isinstance(r.prompt, str) for r in requests),
            "output_tokens": sum(outs), "output_len_min": min(outs), "output_len_max": max(outs)}
    return requests, info


# One request ----------------------------------------------------------------------------------


@dataclass
class RequestResult:
    ok: bool = False
    ttft: float = 0.0  # seconds to the first streamed token
    e2e: float = 0.0
    gaps: list[float] = field(default_factory=list)  # between successive token chunks
    streamed_tokens: int = 0  # chunks that carried a choice: one per step on ours and vLLM's
    prompt_tokens: int | None = None  # the server's usage, when it sent one
    completion_tokens: int | None = None
    error: str = ""
    transport_error: bool = False  # the connection failed: is the server still there?

    @property
    def output_tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else \
            self.streamed_tokens

    @property
    def tpot(self) -> float | None:  # mean time per output token after the first
        n = self.output_tokens
        return (self.e2e - self.ttft) / (n - 1) if n > 1 else None


def _one_line(text: str, limit: int = 200) -> str:
    return " ".join(str(text).split())[:limit]


def request_body(args: argparse.Namespace, req: ServeRequest) -> dict[str, Any]:
    prompt = req.prompt if isinstance(req.prompt, str) else list(req.prompt)
    body = {"model": args.model, "prompt": prompt, "max_tokens": req.output_len, "stream": True,
            "temperature": args.temperature, "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        body["ignore_eos"] = True
    return body


async def one_request(http, args: argparse.Namespace, req: ServeRequest) -> RequestResult:
    import httpx

    result = RequestResult()
    start = time.perf_counter()
    last = None
    try:
        async with http.stream("POST", "/v1/completions", json=request_body(args, req)) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {_one_line((await r.aread())[:200])}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    result.error = _one_line(event["error"])
                    return result
                if event.get("usage"):
                    usage = event["usage"]
                    result.prompt_tokens = (result.prompt_tokens or 0) + usage["prompt_tokens"]
                    result.completion_tokens = ((result.completion_tokens or 0)
                                                + usage["completion_tokens"])
                if event.get("choices"):
                    now = time.perf_counter()
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.gaps.append(now - last)
                    last = now
                    result.streamed_tokens += 1
    except httpx.TransportError as e:
        result.error = f"{type(e).__name__}: {_one_line(e)}"
        result.transport_error = True
        return result
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, TypeError) as e:
        result.error = f"{type(e).__name__}: {_one_line(e)}"
        return result
    result.e2e = time.perf_counter() - start
    result.ok = last is not None
    if not result.ok:
        result.error = "the stream ended without a token"
    return result


# The sweep ------------------------------------------------------------------------------------


def _headers(args: argparse.Namespace) -> dict[str, str]:
    return {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}


def probe(url: str, headers: dict[str, str], timeout: float = PROBE_TIMEOUT_S) -> list[dict]:
    """GET /v1/models: the served models, or a one-line ConfigError naming the URL."""
    import httpx

    try:
        r = httpx.get(f"{url}/v1/models", headers=headers, timeout=timeout)
    except (httpx.HTTPError, httpx.InvalidURL) as e:
        raise ConfigError(f"cannot reach {url}: {type(e).__name__}: {_one_line(e)}") from None
    if r.status_code != 200:
        raise ConfigError(f"{url}/v1/models answered HTTP {r.status_code}: {_one_line(r.text)}")
    try:
        models = r.json()["data"]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{url}/v1/models did not answer an OpenAI model list") from None
    if not models:
        raise ConfigError(f"{url}/v1/models lists no model")
    return models


class Sweep:
    """Runs load points against one server; remembers why it stopped if the server went away."""

    def __init__(self, args: argparse.Namespace, requests: list[ServeRequest]):
        self.args, self.requests = args, requests
        self.dead: str | None = None  # why the server is considered gone

    async def _check_alive(self, http, point: LoadPoint, error: str) -> None:
        if self.dead is not None:
            return
        try:
            r = await http.get("/v1/models", timeout=PROBE_TIMEOUT_S)
            if r.status_code == 200:
                return
            why = f"HTTP {r.status_code}"
        except Exception as e:  # noqa: BLE001 - any failure to answer means gone
            why = f"{type(e).__name__}: {_one_line(e)}"
        if self.dead is None:
            self.dead = (f"the server at {self.args.url} stopped answering during {point.name} "
                         f"({error}; probe: {why})")

    async def _request(self, http, point: LoadPoint, req: ServeRequest) -> RequestResult:
        result = await one_request(http, self.args, req)
        if result.transport_error:
            await self._check_alive(http, point, result.error)
        return result

    async def run_point(self, point: LoadPoint) -> dict[str, Any]:
        import httpx

        results: list[RequestResult] = []
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=self.args.url, headers=_headers(self.args),
                                     limits=limits, timeout=self.args.timeout) as http:
            start = time.perf_counter()
            if point.concurrency is not None:
                queue = list(reversed(self.requests))

                async def worker():
                    while queue and self.dead is None:
                        results.append(await self._request(http, point, queue.pop()))

                await asyncio.gather(*(worker() for _ in range(point.concurrency)))
            else:
                rng = random.Random(self.args.seed)
                tasks = []
                for req in self.requests:
                    if self.dead is not None:
                        break
                    tasks.append(asyncio.create_task(self._request(http, point, req)))
                    await asyncio.sleep(rng.expovariate(point.rate))
                results = list(await asyncio.gather(*tasks))
            duration = time.perf_counter() - start
        summary = summarize(results, duration, self.args.slo_ttft, self.args.slo_itl)
        complete = self.dead is None and len(results) == len(self.requests)
        return {"concurrency": point.concurrency, "rate": point.rate, "complete": complete,
                **summary}

    async def warm_up(self) -> None:
        """One request before the sweep: first-call costs (compilation, caches) stay out of it."""
        import httpx

        async with httpx.AsyncClient(base_url=self.args.url, headers=_headers(self.args),
                                     timeout=self.args.timeout) as http:
            req = ServeRequest(self.requests[0].prompt, min(4, self.requests[0].output_len))
            result = await self._request(http, LoadPoint(concurrency=1), req)
        if self.dead is not None or not result.ok:
            raise ConfigError(f"the warm-up request to {self.args.url} failed: "
                              f"{self.dead or result.error}")


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    qs = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return {"mean": statistics.fmean(values), "p50": qs[49], "p90": qs[89], "p99": qs[98]}


def summarize(results: list[RequestResult], duration: float, slo_ttft: float,
              slo_itl: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    good = [r for r in ok if r.ttft <= slo_ttft and (r.tpot or 0.0) <= slo_itl]
    usage = [r for r in ok if r.completion_tokens is not None]
    out_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in usage)
    duration = max(duration, 1e-9)
    return {
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:MAX_ERRORS_KEPT],
        "duration_s": duration,
        # the server's usage (summed over the completed requests that reported one) and ours
        "requests_with_usage": len(usage),
        "prompt_tokens": prompt_tokens,
        "completion_tokens": sum(r.completion_tokens for r in usage),
        "streamed_tokens": sum(r.streamed_tokens for r in ok),
        "request_throughput": len(ok) / duration,
        "output_tokens_per_s": out_tokens / duration,
        "total_tokens_per_s": (out_tokens + prompt_tokens) / duration,
        "mean_output_tokens": out_tokens / len(ok) if ok else 0,
        "goodput_requests_per_s": len(good) / duration,
        "slo_attainment": len(good) / len(results) if results else 0.0,
        "ttft_s": percentiles([r.ttft for r in ok]),
        "itl_s": percentiles([g for r in ok for g in r.gaps]),
        "tpot_s": percentiles([r.tpot for r in ok if r.tpot is not None]),
        "e2e_s": percentiles([r.e2e for r in ok]),
    }


# Report ---------------------------------------------------------------------------------------


def _loadavg() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}ms"


def _print_point(point: LoadPoint, s: dict[str, Any]) -> None:
    print(f"{point.name}  ok {s['completed']}/{s['requests']}"
          f"  TTFT p50 {_ms(s['ttft_s']['p50'])} p99 {_ms(s['ttft_s']['p99'])}"
          f"  ITL p50 {_ms(s['itl_s']['p50'])} p99 {_ms(s['itl_s']['p99'])}"
          f"  E2E p50 {s['e2e_s']['p50'] or 0:.2f}s"
          f"  {s['output_tokens_per_s']:.1f} tok/s"
          f"  goodput {s['goodput_requests_per_s']:.2f} req/s", flush=True)


def plot(report: dict[str, Any], path: str | Path) -> Path:
    """TTFT, ITL and e2e percentiles per load point, and throughput with goodput."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    points = report["results"]
    key = "concurrency" if points[0]["concurrency"] is not None else "rate"
    xs = [p[key] for p in points]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, metric, title in ((axes[0][0], "ttft_s", "time to first token (s)"),
                              (axes[0][1], "itl_s", "inter-token latency (s)"),
                              (axes[1][0], "e2e_s", "end-to-end latency (s)")):
        for q, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
            ax.plot(xs, [p[metric][q] for p in points], style, label=q)
        ax.set_title(title)
        ax.set_xlabel(key)
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    slo = report["slo"]
    axes[0][0].axhline(slo["ttft_s"], color="red", lw=0.8, label="SLO")
    axes[0][1].axhline(slo["itl_s"], color="red", lw=0.8, label="SLO (on mean TPOT)")
    for ax in (axes[0][0], axes[0][1], axes[1][0]):
        ax.legend(fontsize=8)
    ax = axes[1][1]
    ax.plot(xs, [p["output_tokens_per_s"] for p in points], "o-", label="output tokens/s")
    ax.set_xlabel(key)
    ax.set_xticks(xs)
    ax.set_ylabel("output tokens/s")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(xs, [p["goodput_requests_per_s"] for p in points], "s--", color="green",
             label="goodput (req/s in SLO)")
    ax2.plot(xs, [p["request_throughput"] for p in points], "^:", color="gray",
             label="requests/s")
    ax2.set_ylabel("requests/s")
    ax.set_title("throughput and goodput")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")
    env, server = report["environment"], report["server"]
    status = "" if report["complete"] else " (INCOMPLETE)"
    fig.suptitle(f"trt-gemma bench serve: {server['model']} @ {server['url']}{status}, client "
                 f"{env['cpu']['model']}, {env['date_utc']}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    """The whole command: check, probe, warm up, sweep, write; 0, or 1 when the sweep stopped."""
    import torch

    from trt_gemma.bench import report

    args.url = args.url.rstrip("/")
    check_args(args)
    loads = parse_loads(args.concurrency, args.request_rate)
    requests, work = workload(args)
    models = probe(args.url, _headers(args))
    args.model = args.model or models[0]["id"]
    env = report.environment(torch.device("cpu"), {})  # the client's machine: not the server's
    env["loadavg_1_5_15"] = _loadavg()  # a shared machine's other load skews every figure
    sweep = Sweep(args, requests)
    asyncio.run(sweep.warm_up())
    results = []
    for point in loads:
        summary = asyncio.run(sweep.run_point(point))
        results.append(summary)
        _print_point(point, summary)
        if sweep.dead is not None:
            break
    out = {
        "benchmark": "serve", "environment": env, "loadavg_after": _loadavg(),
        "server": {"url": args.url, "model": args.model, "models": models},
        "workload": {**work, "ignore_eos": args.ignore_eos, "temperature": args.temperature},
        "slo": {"ttft_s": args.slo_ttft, "itl_s": args.slo_itl,
                "definition": "TTFT <= ttft_s and mean time per output token <= itl_s"},
        "label": args.label,
        "complete": sweep.dead is None, "incomplete_reason": sweep.dead,
        "results": results,
    }
    written = []
    if args.output_json:
        written.append(str(report.write_json(args.output_json, out)))
    if args.plot and results:
        written.append(str(plot(out, args.plot)))
    if written:
        print("wrote " + " and ".join(written))
    if sweep.dead is not None:
        print(f"trt-gemma: error: incomplete sweep ({len(results)} of {len(loads)} load points "
              f"run): {sweep.dead}", file=sys.stderr)
        return EXIT_INCOMPLETE
    return 0
