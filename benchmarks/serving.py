"""Online serving benchmark against any OpenAI-compatible server (ours, vLLM, SGLang, ...).

Streams completions (raw SSE over httpx, so nothing SDK-specific) at a sweep of loads and reports,
per load point: time to first token, inter-token latency (gaps between streamed chunks), time per
output token, end-to-end latency (p50/p90/p99), request and output-token throughput, and goodput:
completed requests per second that met the SLO (TTFT <= --slo-ttft and mean time per output token
<= --slo-itl). Writes JSON (with machine and date) and a PNG.

    trt-gemma serve gemma3-270m --port 8000 &
    python benchmarks/serving.py --url http://127.0.0.1:8000 --concurrency 1,4,8 \\
        --out benchmarks/results/serving_cpu_gemma3-270m.json

Load: ``--concurrency`` runs N closed-loop clients (each sends its next request when the last
ends); ``--request-rate`` sends Poisson arrivals at R requests/s, however many are in flight.
Every request asks for exactly --max-tokens tokens (``ignore_eos``, a vLLM extension; drop it with
--no-ignore-eos for servers that refuse unknown fields).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

import httpx

TOPICS = ["a lighthouse keeper", "the first rain on Mars", "a lost library card",
          "a chess-playing cat", "the last train home", "a bakery at dawn", "an old violin",
          "a river that froze", "two rival gardeners", "a map with no roads",
          "a clock that ran backwards"]


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0  # seconds to the first streamed token
    e2e: float = 0.0
    gaps: list[float] = field(default_factory=list)  # between successive token chunks
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str = ""

    @property
    def tpot(self) -> float | None:  # mean time per output token after the first
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"Write a short story about {rng.choice(TOPICS)}. Story {i}:" for i in range(n)]


async def one_request(http: httpx.AsyncClient, args, prompt: str) -> RequestResult:
    body = {"model": args.model, "prompt": prompt, "max_tokens": args.max_tokens, "stream": True,
            "temperature": args.temperature, "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        body["ignore_eos"] = True
    start = time.perf_counter()
    last, chunks, result = None, 0, RequestResult(ok=False)
    try:
        async with http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    result.error = str(event["error"])[:200]
                    return result
                if event.get("usage"):
                    result.output_tokens = event["usage"]["completion_tokens"]
                    result.prompt_tokens = event["usage"]["prompt_tokens"]
                if event.get("choices") and event["choices"][0].get("text"):
                    now = time.perf_counter()
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.gaps.append(now - last)
                    last, chunks = now, chunks + 1
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.e2e = time.perf_counter() - start
    result.output_tokens = result.output_tokens or chunks  # servers without usage in streams
    result.ok = last is not None
    return result


async def run_point(args, *, concurrency: int | None, rate: float | None) -> dict:
    work = prompts(args.num_prompts, args.seed)
    results: list[RequestResult] = []
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, limits=limits,
                                 timeout=args.timeout) as http:
        start = time.perf_counter()
        if concurrency is not None:
            queue = list(reversed(work))

            async def worker():
                while queue:
                    results.append(await one_request(http, args, queue.pop()))

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            rng = random.Random(args.seed)
            tasks = []
            for prompt in work:
                tasks.append(asyncio.create_task(one_request(http, args, prompt)))
                await asyncio.sleep(rng.expovariate(rate))
            results = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
    return summarize(results, duration, args, concurrency=concurrency, rate=rate)


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    qs = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return {"mean": statistics.fmean(values), "p50": qs[49], "p90": qs[89], "p99": qs[98]}


def summarize(results: list[RequestResult], duration: float, args, **load) -> dict:
    ok = [r for r in results if r.ok]
    good = [r for r in ok if r.ttft <= args.slo_ttft and (r.tpot or 0.0) <= args.slo_itl]
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        **load,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_tokens_per_s": out_tokens / duration,
        "total_tokens_per_s": (out_tokens + sum(r.prompt_tokens for r in ok)) / duration,
        "mean_output_tokens": out_tokens / len(ok) if ok else 0,
        "goodput_requests_per_s": len(good) / duration,
        "slo_attainment": len(good) / len(results) if results else 0.0,
        "ttft_s": percentiles([r.ttft for r in ok]),
        "itl_s": percentiles([g for r in ok for g in r.gaps]),
        "tpot_s": percentiles([r.tpot for r in ok if r.tpot is not None]),
        "e2e_s": percentiles([r.e2e for r in ok]),
    }


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       cpu)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    info = {"platform": platform.platform(), "python": sys.version.split()[0], "cpu": cpu,
            "cpu_count": os.cpu_count(), "usable_cpus": usable,
            # a shared machine's other load skews every number: record it
            "loadavg_1_5_15": os.getloadavg() if hasattr(os, "getloadavg") else None}
    try:
        import torch

        info["cuda"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
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
        ax.legend()
    slo = report["meta"]["slo"]
    axes[0][0].axhline(slo["ttft_s"], color="red", lw=0.8, label="SLO")
    axes[0][1].axhline(slo["itl_s"], color="red", lw=0.8, label="SLO (on mean TPOT)")
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
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="upper left")
    meta = report["meta"]
    fig.suptitle(f"{meta['model']} @ {meta['url']} — {meta['machine']['cpu']} "
                 f"({meta['date'][:10]}), {meta['max_tokens']} output tokens", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server root (no /v1)")
    p.add_argument("--model", default=None, help="default: the first of GET /v1/models")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", default=None, help="closed-loop clients, e.g. 1,4,8")
    load.add_argument("--request-rate", default=None, help="Poisson requests/s, e.g. 0.5,1,2")
    p.add_argument("--num-prompts", type=int, default=16, help="requests per load point")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false")
    p.add_argument("--slo-ttft", type=float, default=2.0, help="seconds (goodput)")
    p.add_argument("--slo-itl", type=float, default=0.2, help="seconds per output token (goodput)")
    p.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default="", help="free text stored in the JSON (server flags...)")
    p.add_argument("--out", default=None, help="JSON path; the PNG goes beside it")
    args = p.parse_args(argv)
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    models = httpx.get(f"{args.url}/v1/models", headers=headers, timeout=30).json()["data"]
    args.model = args.model or models[0]["id"]
    if args.request_rate:
        loads = [{"concurrency": None, "rate": float(r)} for r in args.request_rate.split(",")]
    else:
        loads = [{"concurrency": int(c), "rate": None}
                 for c in (args.concurrency or "1,4,8").split(",")]
    before = machine()
    asyncio.run(one_warmup(args, headers))
    results = []
    for point in loads:
        summary = asyncio.run(run_point(args, **point))
        results.append(summary)
        name = (f"concurrency {point['concurrency']}" if point["rate"] is None
                else f"rate {point['rate']}/s")
        print(f"{name}  ok {summary['completed']}/{summary['completed'] + summary['failed']}"
              f"  TTFT p50 {_ms(summary['ttft_s']['p50'])} p99 {_ms(summary['ttft_s']['p99'])}"
              f"  ITL p50 {_ms(summary['itl_s']['p50'])} p99 {_ms(summary['itl_s']['p99'])}"
              f"  E2E p50 {summary['e2e_s']['p50'] or 0:.2f}s"
              f"  {summary['output_tokens_per_s']:.1f} tok/s"
              f"  goodput {summary['goodput_requests_per_s']:.2f} req/s", flush=True)
    report = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": before, "loadavg_after": machine()["loadavg_1_5_15"],
            "url": args.url, "model": args.model,
            "server_models": models, "num_prompts": args.num_prompts,
            "max_tokens": args.max_tokens, "temperature": args.temperature,
            "ignore_eos": args.ignore_eos, "label": args.label,
            "slo": {"ttft_s": args.slo_ttft, "itl_s": args.slo_itl,
                    "definition": "TTFT <= ttft_s and mean time per output token <= itl_s"},
        },
        "results": results,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        plot(report, os.path.splitext(args.out)[0] + ".png")
        print(f"wrote {args.out} and its .png")
    return 0


async def one_warmup(args, headers) -> None:
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=args.timeout) as h:
        await one_request(h, args, "Warm up:")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}ms"


if __name__ == "__main__":
    sys.exit(main())
