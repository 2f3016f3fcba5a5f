"""``bench guided``: what guided decoding costs, in output tokens/s, on one engine in one run.

The same chat prompts run (all at once, greedy) without a constraint, with a JSON schema and
with ``json_object``, in rounds that alternate the modes so a busy machine slows them alike; the
report keeps each mode's median and lists every round. Where the engine has the CPU greedy head
(an int8 screen of the LM head that only plain greedy rows take), a fourth mode runs without a
constraint but with the full LM head, as constrained rows run: it splits the cost into the
lost fast path and the grammar's own (mask filling and applying). Grammars are compiled before
the timed runs (compile time is reported on its own: the server compiles before it queues a
request), and every constrained output is checked: valid JSON, and valid against the schema.

    python benchmarks/guided.py gemma3-270m --output-json benchmarks/results/guided.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from trt_gemma.bench.report import environment, write_json
from trt_gemma.errors import TrtGemmaError
from trt_gemma.runtime import EngineConfig, LLMEngine
from trt_gemma.sampling_params import SamplingParams, StructuredOutputsParams

SCHEMA = {  # nested object, bounded numbers, an enum, an array: a typical extraction schema
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "country": {"type": "string", "maxLength": 40},
        "population_millions": {"type": "number", "minimum": 0, "maximum": 100},
        "kind": {"enum": ["city", "town", "village"]},
        "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 40},
                      "maxItems": 3},
        "location": {"type": "object",
                     "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90},
                                    "lon": {"type": "number", "minimum": -180, "maximum": 180}},
                     "required": ["lat", "lon"]},
    },
    "required": ["name", "country", "population_millions", "kind", "landmarks", "location"],
}
PLACES = ["Paris", "Tokyo", "Nairobi", "Lima", "Oslo", "Hanoi", "Cairo", "Quebec",
          "Seville", "Kyoto", "Accra", "Perth", "Bergen", "Cusco", "Tartu", "Hobart"]
MODES = ("none", "json_schema", "json_object")
FULL_HEAD = "none_full_lm_head"  # no constraint, greedy head off (CPU engines that have one)


def constraint(mode: str) -> StructuredOutputsParams | None:
    return {"none": None, FULL_HEAD: None, "json_schema": StructuredOutputsParams(json=SCHEMA),
            "json_object": StructuredOutputsParams(json_object=True)}[mode]


def prompts(tokenizer, n: int) -> list[str]:
    return [tokenizer.apply_chat_template([{"role": "user", "content":
                                            f"Describe {PLACES[i % len(PLACES)]} as JSON."}])
            for i in range(n)]


def run_mode(engine: LLMEngine, texts: list[str], mode: str, max_tokens: int,
             tag: str) -> dict:
    """All prompts at once; wall time, output tokens, and what the outputs were."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens,
                            structured_outputs=constraint(mode))
    for i, text in enumerate(texts):
        engine.add_request(f"{tag}-{i}", text, params)
    done = {}
    rows = engine.greedy_head_max_rows
    if mode == FULL_HEAD:
        engine.greedy_head_max_rows = 0
    try:
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0]
        elapsed = time.perf_counter() - start
    finally:
        engine.greedy_head_max_rows = rows
    outs = [done[f"{tag}-{i}"] for i in range(len(texts))]
    tokens = sum(len(o.token_ids) for o in outs)
    return {"elapsed_s": elapsed, "output_tokens": tokens, "output_tokens_per_s": tokens / elapsed,
            "finish_reasons": [o.finish_reason for o in outs], "texts": [o.text for o in outs]}


def check(mode: str, texts: list[str]) -> dict:
    """How many outputs parse as JSON (objects), and validate against the schema."""
    parsed, valid = 0, 0
    for text in texts:
        try:
            value = json.loads(text)
        except ValueError:
            continue
        parsed += isinstance(value, dict)
        if mode == "json_schema":
            import jsonschema

            valid += jsonschema.Draft202012Validator(SCHEMA).is_valid(value)
    return {"json_objects": parsed, "schema_valid": valid if mode == "json_schema" else None}


def measure(engine: LLMEngine, num_prompts: int, max_tokens: int, rounds: int) -> dict:
    texts = prompts(engine.tokenizer, num_prompts)
    modes = MODES + ((FULL_HEAD,) if engine.greedy_head is not None else ())
    start = time.perf_counter()  # the first constraint builds xgrammar's vocabulary once
    engine.check_structured_outputs(StructuredOutputsParams(regex="a"))
    setup_s = time.perf_counter() - start
    compile_s = {}
    for mode in MODES[1:]:
        start = time.perf_counter()
        engine.check_structured_outputs(constraint(mode))
        compile_s[mode] = time.perf_counter() - start
    for mode in modes:  # untimed warm-up of each mode's shapes and code paths
        run_mode(engine, texts[:2], mode, 4, f"warm-{mode}")
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(rounds):
        for mode in modes:
            runs[mode].append(run_mode(engine, texts, mode, max_tokens, f"r{r}-{mode}"))
    results = {}
    for mode, rs in runs.items():
        rates = [x["output_tokens_per_s"] for x in rs]
        results[mode] = {
            "output_tokens_per_s": statistics.median(rates),
            "rounds": [{k: v for k, v in x.items() if k != "texts"} for x in rs],
            "checks": check(mode, rs[-1]["texts"]),
            "sample_output": rs[-1]["texts"][0],
        }
        if mode in compile_s:
            results[mode]["compile_s"] = compile_s[mode]
    base = results["none"]["output_tokens_per_s"]
    for mode in modes[1:]:
        results[mode]["vs_none"] = results[mode]["output_tokens_per_s"] / base
    results["tokenizer_info_s"] = setup_s
    return results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", nargs="?", default="gemma3-270m",
                   help="bundled name, .gguf, HF dir or engine dir (default: gemma3-270m)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    p.add_argument("--num-prompts", type=int, default=4, help="requests per run (one batch)")
    p.add_argument("--max-tokens", type=int, default=192, help="generated tokens at most")
    p.add_argument("--rounds", type=int, default=2, help="timed runs of every mode")
    p.add_argument("--output-json", default=None, help="where to write the results")


def run(args: argparse.Namespace) -> int:
    for name in ("num_prompts", "max_tokens", "rounds"):
        if getattr(args, name) < 1:
            raise TrtGemmaError(f"--{name.replace('_', '-')} must be >= 1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    from trt_gemma.loader import load_model

    model, tokenizer = load_model(args.source, dtype=args.dtype, device=device)
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=max(args.num_prompts, 1)))
    results = measure(engine, args.num_prompts, args.max_tokens, args.rounds)
    report = {
        "benchmark": "guided",
        "environment": environment(model.device, {"dtype": str(model.dtype).removeprefix(
            "torch."), "quant": None, "source": args.source}),
        "options": {"source": args.source, "num_prompts": args.num_prompts,
                    "max_tokens": args.max_tokens, "rounds": args.rounds, "greedy": True},
        "schema": SCHEMA,
        "results": results,
    }
    for mode, r in results.items():
        if not isinstance(r, dict):
            continue
        extra = f"  ({r['vs_none']:.2f}x of none)" if "vs_none" in r else ""
        print(f"{mode:12s} {r['output_tokens_per_s']:8.2f} output tok/s{extra}  "
              f"checks {r['checks']}")
    if args.output_json:
        print(f"wrote {write_json(args.output_json, report)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except TrtGemmaError as e:
        print(f"bench guided: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
