"""``bench latency``: time to first token and per-token latency at small batch sizes.

For each batch size B, B requests of the same lengths are submitted at once (``iterations``
times, after an untimed warm-up of the same shape); TTFT is submission to a request's first
token, per-token latency the gap between its consecutive tokens (the decode step time as a user
sees it).
"""

from __future__ import annotations

from trt_gemma.bench import runner
from trt_gemma.bench.runner import Trace, run, summary
from trt_gemma.bench.workload import synthetic
from trt_gemma.errors import ConfigError
from trt_gemma.runtime import LLMEngine


def parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--batch-sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"--batch-sizes must be positive integers, got {text!r}")
    return sizes


def measure(engine: LLMEngine, batch_sizes: list[int], input_len: int, output_len: int,
            iterations: int, bos_id: int | None, seed: int = 0) -> tuple[dict, dict]:
    """(JSON results per batch size, Traces per batch size for the plot)."""
    if iterations < 1:
        raise ConfigError(f"--iterations must be >= 1, got {iterations}")
    vocab = engine.model.config.vocab_size
    results, traces = {}, {}
    for b in batch_sizes:
        # untimed: the batch's shapes once (kernel compilation, CUDA-graph buffers)
        runner.warm_up(engine, synthetic(b, input_len, output_len, vocab, bos_id=bos_id))
        runs: list[Trace] = []
        for it in range(iterations):
            requests = synthetic(b, input_len, output_len, vocab, seed=seed + it, bos_id=bos_id)
            runs.append(run(engine, requests, prefix=f"b{b}i{it}-"))
        ttft = [x for t in runs for x in t.ttfts()]
        per_token = [x for t in runs for x in t.inter_token()]
        outputs = sum(t.output_tokens for t in runs)
        elapsed = sum(t.elapsed_s for t in runs)
        results[str(b)] = {
            "batch_size": b, "iterations": iterations, "input_len": input_len,
            "output_len": output_len, "output_tokens": outputs,
            "expected_output_tokens": b * output_len * iterations,
            "ttft_s": summary(ttft), "per_token_s": summary(per_token),
            "request_latency_s": summary([x for t in runs for x in t.latencies()]),
            "output_tokens_per_s": outputs / elapsed,
        }
        traces[str(b)] = runs
    return results, traces
