"""Tensor parallelism on this machine: same tokens, each rank's memory, and the throughput cost.

For each tensor-parallel size (1, 2 by default; on CPU the ranks are processes sharing this
machine's cores over gloo, on CUDA one GPU each over NCCL), one engine generates greedily for a
batch of prompts all in flight together. Reports per rank the bytes of weights and KV cache it
holds (measured on the rank: ``LLMEngine.rank_memory``), the output tokens/s, and how many
sequences every size produced exactly as size 1 did (all of them in fp32; bf16 on GPUs may flip
a near-tie where the all-reduce sums in another order, so the shared prefix is reported too).
On a CPU the ranks share one memory bus and the same cores, so TP buys memory per process there,
not speed; on GPUs each rank brings its own memory bandwidth.

    python benchmarks/tensor_parallel.py --sizes 1 2 --output-json \
        benchmarks/results/tensor_parallel-cpu-gemma3-270m-fp32.json
    python benchmarks/tensor_parallel.py --device cuda --dtype bfloat16 --sizes 1 2 4
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path

import torch

SUBJECTS = ["the ocean", "a violin", "the moon landing", "bread", "volcanoes", "a chess opening",
            "honeybees", "the printing press", "glaciers", "a marathon", "solar panels",
            "the Roman roads"]
FORMS = ["Write two sentences about {s}.", "Explain {s} to a child.",
         "List three facts about {s}:", "A short poem about {s}:"]


def prompts(n: int) -> list[str]:
    out = [f.format(s=s) for s in SUBJECTS for f in FORMS]
    return out[:n]


def machine(device: str) -> dict:
    """The CPU (model, cores, ISA flags) and torch's view of it, and the GPUs when on CUDA,
    recorded with every figure."""
    from trt_gemma.bench.report import cpu_info

    out = {**cpu_info(), "torch": torch.__version__,
           "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "threads": torch.get_num_threads()}
    if device == "cuda":
        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        out["cuda"] = torch.version.cuda
    return out


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> dict:
    """Sequences equal to the reference's, and the share of tokens before the first difference."""
    same = sum(a == b for a, b in zip(tokens, reference, strict=True))
    prefix = sum(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(b))
                 for a, b in zip(tokens, reference, strict=True))
    return {"identical_sequences": same, "sequences": len(reference),
            "shared_prefix_fraction": round(prefix / max(1, sum(map(len, reference))), 4)}


def run_size(args, size: int, texts: list[str]) -> tuple[dict, list[list[int]]]:
    from trt_gemma.runtime import LLMEngine
    from trt_gemma.sampling_params import SamplingParams

    if args.device == "cpu":
        torch.set_num_threads(args.threads)  # from_source divides it between the ranks
    start = time.perf_counter()
    engine = LLMEngine.from_source(args.source, dtype=args.dtype, device=args.device,
                                   tensor_parallel_size=size, max_num_seqs=len(texts),
                                   kv_cache_memory=args.kv_cache_mib << 20)
    load_s = time.perf_counter() - start
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
        best, tokens = None, None
        for _ in range(args.rounds):
            for i, text in enumerate(texts):
                engine.add_request(f"{size}-{i}-{time.monotonic_ns()}", text, params)
            done, start = {}, time.perf_counter()
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        done[out.request_id] = out.outputs[0].token_ids
            elapsed = time.perf_counter() - start
            best = elapsed if best is None else min(best, elapsed)
            tokens = [done[k] for k in sorted(done, key=lambda k: int(k.split("-")[1]))]
        generated = sum(len(t) for t in tokens)
        record = {
            "tensor_parallel_size": size,
            "load_s": round(load_s, 2),
            "seconds": round(best, 3),
            "output_tokens": generated,
            "output_tokens_per_s": round(generated / best, 2),
            "ranks": [{"rank": m.rank, "weight_bytes": m.weight_bytes,
                       "kv_cache_bytes": m.kv_cache_bytes} for m in engine.rank_memory],
        }
    finally:
        engine.shutdown()
    return record, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", default="gemma3-270m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="cuda: rank r on cuda:r (needs as many GPUs as the largest size)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--num-prompts", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="best of this many batches")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="cores for all ranks together")
    ap.add_argument("--kv-cache-mib", type=int, default=256, help="KV cache per rank")
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args()

    texts = prompts(args.num_prompts)
    where = machine(args.device)
    results, reference = [], None
    for size in args.sizes:
        record, tokens = run_size(args, size, texts)
        if reference is None:
            reference = tokens
        record["tokens_identical_to_first_size"] = tokens == reference
        record["agreement_with_first_size"] = agreement(tokens, reference)
        results.append(record)
        whole = results[0]["ranks"][0]["weight_bytes"] * results[0]["tensor_parallel_size"]
        print(f"TP {size}: {record['output_tokens_per_s']:.1f} output tok/s "
              f"({record['output_tokens']} tokens, {len(texts)} prompts in flight, "
              f"load {record['load_s']} s), tokens identical to TP {args.sizes[0]}: "
              f"{record['tokens_identical_to_first_size']}")
        for r in record["ranks"]:
            print(f"  rank {r['rank']}: weights {r['weight_bytes'] / 2**20:8.1f} MiB "
                  f"({r['weight_bytes'] / whole:.3f} of TP {args.sizes[0]}'s), "
                  f"KV cache {r['kv_cache_bytes'] / 2**20:.1f} MiB")
    first = results[0]["output_tokens_per_s"]
    for r in results:
        r["throughput_vs_first_size"] = round(r["output_tokens_per_s"] / first, 3)
    out = {"benchmark": "tensor_parallel", "date": date.today().isoformat(), "machine": where,
           "device": args.device, "source": args.source, "dtype": args.dtype,
           "num_prompts": len(texts), "max_tokens": args.max_tokens, "results": results}
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.output_json}")


if __name__ == "__main__":
    main()
