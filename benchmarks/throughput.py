"""Offline throughput: trt-gemma's LLMEngine vs Hugging Face transformers' generate.

Same model (the bundled Gemma 3 270M GGUF), same requests, same machine, one process, greedy with
``ignore_eos`` so every request produces exactly its ``max_tokens``. trt-gemma dequantizes the GGUF
to dense weights in the run's dtype; transformers (5.x) keeps the GGUF's packed blocks (Q5_0/Q8_0
...) and computes with its own kernels, which read fewer bytes per token than dense bf16.

- ``mixed``: 32 requests, prompt lengths and max_tokens uniform over 8..128 (fixed seed), all
  submitted at once. transformers runs them as one left-padded batch (its fastest offline use);
  tokens a request generates past its own max_tokens are not counted as useful.
- ``mixed_heldout``: a second, independent draw of the same kind.
- ``single``: one stream of 128 tokens.

trt-gemma runs twice per bf16 model: ``trt_gemma_bfloat16`` (the model's own numerics) and
``trt_gemma_bfloat16_int8decode`` (steps of <= 8 tokens on INT8 copies of the decoder's linear
weights, W8A16: runtime/int8_decode.py, +0.2% perplexity).

Also measured: the engine's per-step overhead (scheduling, input building, sampling, output
processing) at batch 1/32/256 with the model's forward replaced by ready-made logits.

    python benchmarks/throughput.py --out benchmarks/results/throughput-cpu.json

OpenMP waiting (trt_gemma/cpu_env.py): libgomp's default spins for milliseconds, which on a shared
CPU makes small ops wait for descheduled threads (observed: 10-20 ms for a 4x256x12 matmul), and
``OMP_WAIT_POLICY=PASSIVE`` makes every parallel region pay a thread wake-up (~30 us). Unless the
environment sets a wait policy or spin count, ``import trt_gemma`` sets ``GOMP_SPINCOUNT=10000``
below, before torch loads; it applies to both engines alike (same process), and the results
record it. Earlier figures (before 2026-11-24's last run) were taken with PASSIVE.
"""

from __future__ import annotations

import os

import trt_gemma  # noqa: F401  (first: sets GOMP_SPINCOUNT before torch loads, cpu_env.py)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from trt_gemma.runtime import EngineConfig, LLMEngine  # noqa: E402
from trt_gemma.sampling_params import SamplingParams  # noqa: E402

TEXT = """\
The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the steps as his
father had done before him. There were one hundred and twelve of them, worn smooth in the middle
by two centuries of boots. At the top he trimmed the wick, polished the great lens until it threw
back his own tired face a thousandfold, and wrote the date and the weather in a ledger whose first
pages had gone the colour of weak tea. Ships no longer needed him; they carried their own maps of
the sky and spoke to satellites instead of watching for a light on a rock. Still, the council paid
his small wage, and he kept the lamp burning because a light that has been lit every night for two
hundred years deserves, he thought, to be lit one more night. In the winter storms the whole tower
hummed like a struck bell. He would sit with his back against the cold stone, listening to the sea
try the door, and read by the glow that leaked down the stairwell: histories of navigation, letters
of explorers, a manual on the repair of clockwork that he had nearly learned by heart. Once a year
a boat brought flour, oil, lamp glass and newspapers already months old, and he read the old news
slowly, as if it were still unfolding, rationing the surprises to make them last until spring.
Engineers measure a program by what it wastes: padding that carries no information, logits nobody
samples, threads that spin while waiting for each other, copies made only to be thrown away.
"""


# Steps of at most this many tokens run the INT8 twin in the *_int8decode variant: the int8
# weight-only kernel beats the bf16 GEMMs up to ~12 rows on the 2-core CPU it was measured on.
INT8_DECODE_MAX_ROWS = 8


def make_workloads(tokenizer, seed: int) -> dict[str, list[tuple[list[int], int]]]:
    """name -> [(prompt token ids, max_tokens)]: prompts are windows of TEXT led by BOS."""
    ids = tokenizer.encode(TEXT, add_bos=False)
    rng = random.Random(seed)

    def prompt(n: int) -> list[int]:
        start = rng.randrange(0, len(ids) - n)
        return [tokenizer.bos_id, *ids[start:start + n - 1]]

    def mixed() -> list[tuple[list[int], int]]:
        return [(prompt(rng.randint(8, 128)), rng.randint(8, 128)) for _ in range(32)]

    # mixed_heldout: a second draw of the same kind, so the figures are not one draw's luck
    return {"mixed": mixed(), "mixed_heldout": mixed(), "single": [(prompt(16), 128)]}


def _params(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def run_ours(model, tokenizer, requests, config: EngineConfig) -> dict:
    engine = LLMEngine(model, tokenizer, config)
    engine.add_request("warmup", requests[0][0][:8], _params(2))
    while engine.has_unfinished_requests():
        engine.step()
    start = time.perf_counter()
    for i, (ids, max_tokens) in enumerate(requests):
        engine.add_request(str(i), ids, _params(max_tokens))
    steps, tokens = 0, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = out.outputs[0].token_ids
        steps += 1
    elapsed = time.perf_counter() - start
    assert engine.block_manager.all_free()
    useful = sum(len(t) for t in tokens.values())
    assert useful == sum(m for _, m in requests)
    return {"seconds": elapsed, "steps": steps, "useful_tokens": useful,
            "useful_tokens_per_s": useful / elapsed, "requests_per_s": len(requests) / elapsed,
            "preemptions": engine.get_stats().num_preemptions, "token_ids": tokens}


@torch.inference_mode()
def run_hf(hf, requests, pad_id: int) -> dict:
    """All requests as one left-padded batch; max_new_tokens = the largest max_tokens."""
    width = max(len(ids) for ids, _ in requests)
    input_ids = torch.full((len(requests), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, (ids, _) in enumerate(requests):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        mask[row, width - len(ids):] = 1
    new = max(m for _, m in requests)
    hf.generate(input_ids[:1, -8:], attention_mask=mask[:1, -8:], max_new_tokens=2,
                do_sample=False, pad_token_id=pad_id)  # warm-up
    start = time.perf_counter()
    out = hf.generate(input_ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                      do_sample=False, pad_token_id=pad_id)
    elapsed = time.perf_counter() - start
    useful = sum(m for _, m in requests)
    tokens = {str(i): out[i, width:width + m].tolist() for i, (_, m) in enumerate(requests)}
    return {"seconds": elapsed, "generated_tokens": len(requests) * new, "useful_tokens": useful,
            "useful_tokens_per_s": useful / elapsed, "requests_per_s": len(requests) / elapsed,
            "token_ids": tokens}


class _Logits:
    """Stands in for the model after the forward: ready-made logits, no LM head."""

    def __init__(self, model, logits: torch.Tensor):
        self.config, self.device, self.logits = model.config, model.device, logits

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits[: hidden.shape[0]]

    def greedy_tokens(self, hidden: torch.Tensor) -> list[int]:
        return self.logits[: hidden.shape[0]].argmax(dim=-1).tolist()


def step_overhead(model, tokenizer, batch_sizes=(1, 32, 256), steps: int = 20) -> dict:
    """Seconds per greedy decode step spent outside the model (forward and LM head excluded:
    ready-made [batch, vocab] logits), split by phase; the sampling is a full-vocab argmax."""
    logits = torch.randn(max(batch_sizes), model.config.vocab_size)
    hidden = torch.zeros(max(batch_sizes), model.config.hidden_size)
    results = {}
    for batch in batch_sizes:
        engine = LLMEngine(model, tokenizer, EngineConfig(kv_cache_memory=256 << 20,
                                                          greedy_head_max_rows=0))
        runner, sched = engine.runner, engine.scheduler
        runner.run = lambda b: hidden[: b.logits_indices.numel()]  # the forward, excluded
        engine.model = _Logits(model, logits)  # the LM head, excluded
        timers = {"schedule": 0.0, "prepare_inputs": 0.0, "sample": 0.0}

        def timed(name, fn, timers=timers):
            def wrapper(*a, **kw):
                t = time.perf_counter()
                r = fn(*a, **kw)
                timers[name] += time.perf_counter() - t
                return r
            return wrapper

        sched.schedule = timed("schedule", sched.schedule)
        runner.prepare = timed("prepare_inputs", runner.prepare)
        engine._sample = timed("sample", engine._sample)  # greedy rows never reach the Sampler
        prompt = tokenizer.encode(TEXT)[:32]
        for i in range(batch):
            engine.add_request(str(i), prompt, _params(steps + 10))
        engine.step()  # the prefill step is not a decode step
        for k in timers:
            timers[k] = 0.0
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        total = (time.perf_counter() - start) / steps
        phases = {k: v / steps for k, v in timers.items()}
        phases["postprocess"] = total - sum(phases.values())
        results[str(batch)] = {"step_s": total, "per_sequence_s": total / batch, **phases}
    return results


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtypes", default="float32,bfloat16", help="run both sides in each")
    ap.add_argument("--rounds", type=int, default=2,
                    help="interleaved repeats; the best of each is reported (shared machines)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--workloads", default="mixed,mixed_heldout,single",
                    help="comma-separated subset of the workloads to run")
    ap.add_argument("--out", default="benchmarks/results/throughput-cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from trt_gemma.loader import load_model

    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    config = EngineConfig()
    int8_config = EngineConfig(cpu_int8_decode_max_rows=INT8_DECODE_MAX_ROWS)
    report = {
        "model": args.model, "device": "cpu", "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"), "rounds": args.rounds,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor(),
                    "torch": torch.__version__, "load_avg_start": os.getloadavg()},
        "engine_config": {"max_num_seqs": config.max_num_seqs,
                          "max_num_batched_tokens": config.max_num_batched_tokens,
                          "block_size": config.block_size,
                          "cpu_single_thread_below": config.cpu_single_thread_below,
                          "int8decode_variant_max_rows": INT8_DECODE_MAX_ROWS},
        "results": {}, "all_runs": {},
    }
    workloads = None

    def record(name: str, key: str, res: dict) -> None:
        runs = report["all_runs"].setdefault(name, {}).setdefault(key, [])
        runs.append(round(res["useful_tokens_per_s"], 2))
        best = report["results"].setdefault(name, {}).get(key)
        if best is None or res["useful_tokens_per_s"] > best["useful_tokens_per_s"]:
            report["results"][name][key] = res
        print(f"{name}: {key} {res['useful_tokens_per_s']:.1f} useful tok/s "
              f"({res['seconds']:.1f} s) load {os.getloadavg()[0]:.1f}", flush=True)

    for dtype in dtypes:
        model, tokenizer = load_model(args.model, dtype=dtype)
        if workloads is None:
            chosen = args.workloads.split(",")
            workloads = {k: v for k, v in make_workloads(tokenizer, args.seed).items()
                         if k in chosen}
            report["workloads"] = {
                k: {"requests": len(v), "prompt_tokens": [len(p) for p, _ in v],
                    "max_tokens": [m for _, m in v]} for k, v in workloads.items()}
        if dtype == torch.float32:
            overhead = step_overhead(model, tokenizer)
            report["step_overhead_forward_excluded"] = overhead
            print("per-step overhead (forward excluded):", json.dumps(overhead, indent=1))
        hf = None
        if not args.skip_hf:
            from transformers import AutoModelForCausalLM

            from trt_gemma.checkpoint.bundled import bundled_gguf_path

            gguf = bundled_gguf_path(args.model)
            hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                      dtype=dtype).eval()
        d = _dtype_name(dtype)
        variants = {f"trt_gemma_{d}": config}
        if dtype != torch.float32:  # W8A16 small steps: bf16/fp16 models only
            variants[f"trt_gemma_{d}_int8decode"] = int8_config
        for _ in range(args.rounds):
            for name, requests in workloads.items():
                for key, cfg in variants.items():
                    record(name, key, run_ours(model, tokenizer, requests, cfg))
                if hf is not None:
                    record(name, f"transformers_{d}",
                           run_hf(hf, requests, tokenizer.pad_id or 0))
        del model, hf
    if not args.skip_hf:
        report["summary"] = summarize(report["results"], dtypes)
        print(json.dumps(report["summary"], indent=1))
    report["machine"]["load_avg_end"] = os.getloadavg()
    for runs in report["results"].values():  # token ids served the agreement check only
        for res in runs.values():
            res.pop("token_ids", None)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


def summarize(results: dict, dtypes: list[torch.dtype]) -> dict:
    """Per workload: each side's best dtype, the ratio of bests, and same-dtype ratios and
    greedy agreement (requests whose tokens are identical on both sides)."""
    summary = {}
    for name, runs in results.items():
        rate = {k: v["useful_tokens_per_s"] for k, v in runs.items()}
        ours = max((k for k in rate if k.startswith("trt_gemma")), key=rate.get)
        theirs = max((k for k in rate if k.startswith("transformers")), key=rate.get)
        entry = {"best_trt_gemma": ours, "best_transformers": theirs,
                 "ratio_best_vs_best": rate[ours] / rate[theirs]}
        for dtype in dtypes:
            d = _dtype_name(dtype)
            a, b = runs[f"trt_gemma_{d}"], runs[f"transformers_{d}"]
            same = sum(a["token_ids"][r] == b["token_ids"][r] for r in a["token_ids"])
            entry[f"ratio_{d}_vs_{d}"] = rate[f"trt_gemma_{d}"] / rate[f"transformers_{d}"]
            entry[f"identical_greedy_{d}"] = f"{same}/{len(a['token_ids'])}"
        for k in rate:
            if k.startswith("transformers"):
                entry[f"ratio_best_vs_{k}"] = rate[ours] / rate[k]
        summary[name] = entry
    return summary


if __name__ == "__main__":
    main()
