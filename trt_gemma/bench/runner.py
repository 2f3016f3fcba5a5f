"""Drive an ``LLMEngine`` over a workload and record when each request's tokens arrived.

Everything is submitted at once (offline), greedy with ``ignore_eos``, so every request produces
exactly its ``output_len`` tokens and the token counts of two runs (or two engines) are equal.
The bookkeeping here is per step and outside the engine: the step loop itself is untouched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from trt_gemma.bench.workload import BenchRequest
from trt_gemma.errors import ConfigError
from trt_gemma.runtime import LLMEngine
from trt_gemma.sampling_params import SamplingParams


@dataclass
class Trace:
    """Times in seconds since the requests were submitted."""

    elapsed_s: float = 0.0
    num_steps: int = 0
    token_times: dict[str, list[float]] = field(default_factory=dict)  # request -> per token
    step_end_s: list[float] = field(default_factory=list)  # when each step returned
    tokens_after_step: list[int] = field(default_factory=list)  # output tokens so far
    peak_kv_cache_usage: float = 0.0  # 0..1, the largest share of KV blocks in use after a step
    num_preemptions: int = 0

    @property
    def output_tokens(self) -> int:
        return sum(len(t) for t in self.token_times.values())

    def latencies(self) -> list[float]:
        """Submission to last token, per request."""
        return [t[-1] for t in self.token_times.values()]

    def ttfts(self) -> list[float]:
        return [t[0] for t in self.token_times.values()]

    def inter_token(self) -> list[float]:
        """Gaps between consecutive tokens of each request (decode latency per token)."""
        return [b - a for t in self.token_times.values() for a, b in zip(t, t[1:])]


def params(output_len: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)


def check_fits(engine: LLMEngine, requests: list[BenchRequest]) -> None:
    """Every request must be able to produce all its tokens, or the counts would not add up."""
    for i, r in enumerate(requests):
        if r.input_len + r.output_len > engine.max_model_len:
            raise ConfigError(
                f"{r.origin or f'request {i}'}: {r.input_len} prompt + {r.output_len} output "
                f"tokens exceed the "
                f"engine's {engine.max_model_len}-token context (lower --input-len/--output-len "
                f"or raise --kv-cache-gib)")


def warm_up(engine: LLMEngine, requests: list[BenchRequest], seed: int = 1 << 20) -> None:
    """Untimed first: up to 4 requests of the first requests' prompt lengths, 2 tokens each,
    so lazy initialisation (threads, kernel compilation per shape) is not measured. Their
    prompts are fresh random ids: a copy would leave the timed run prefix-cache hits."""
    import random

    rng = random.Random(seed)
    vocab = engine.model.config.vocab_size
    for i, r in enumerate(requests[:4]):
        ids = [r.prompt_token_ids[0], *(rng.randrange(vocab) for _ in range(r.input_len - 1))]
        engine.add_request(f"warmup{i}", ids, params(2))
    while engine.has_unfinished_requests():
        engine.step()


def run(engine: LLMEngine, requests: list[BenchRequest], prefix: str = "r") -> Trace:
    """Submit all ``requests`` at once and step until they finish."""
    check_fits(engine, requests)
    trace = Trace()
    ids = [f"{prefix}{i}" for i in range(len(requests))]
    preempted_before = engine.get_stats().num_preemptions
    start = time.perf_counter()
    for rid, r in zip(ids, requests):
        engine.add_request(rid, list(r.prompt_token_ids), params(r.output_len))
        trace.token_times[rid] = []
    total = 0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter() - start
        for out in outputs:
            times = trace.token_times[out.request_id]
            new = len(out.outputs[0].token_ids) - len(times)
            times.extend([now] * new)
            total += new
        trace.num_steps += 1
        trace.step_end_s.append(now)
        trace.tokens_after_step.append(total)
        trace.peak_kv_cache_usage = max(trace.peak_kv_cache_usage,
                                        engine.get_stats().kv_cache_usage)
    trace.elapsed_s = time.perf_counter() - start
    trace.num_preemptions = engine.get_stats().num_preemptions - preempted_before
    return trace


def summary(values: list[float]) -> dict[str, float | None]:
    """mean / p50 / p99 (linear interpolation) / max of a list of seconds; None when empty."""
    if not values:
        return {"mean": None, "p50": None, "p99": None, "max": None}
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}
