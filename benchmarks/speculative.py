"""Speculative decoding on this machine: output tokens/s with and without it, one engine run.

Single stream (one request at a time, greedy, real Gemma 3 270M by default):
- input-grounded chat prompts (quote, edit, continue a passage given in the prompt), with n-gram
  prompt lookup;
- open-ended prompts with a draft model, when ``--draft-model`` names one (e.g. an INT4 engine of
  the target: ``trt-gemma build gemma3-270m -o /tmp/g270m-int4 --quant int4``).
And a batch of 32 requests at once (grounded and open prompts mixed), with and without n-gram:
speculation must not cost more than 10% there.

Configurations alternate round by round (off, on, off, on, ...) so both see the same stretch of
machine load; each figure is the best round. Greedy outputs are checked identical. Writes JSON:

    python benchmarks/speculative.py --output-json benchmarks/results/speculative-cpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

PASSAGES = [
    "The lighthouse stood at the edge of the rocky cape, its white tower streaked with salt. "
    "Every night the keeper climbed the spiral stairs, trimmed the wick, and polished the great "
    "lens until it shone. Ships passing in the dark saw the beam sweep across the water and knew "
    "they were close to the reef that had claimed so many vessels before the light was built.",
    "Photosynthesis is the process by which green plants use sunlight to make food from carbon "
    "dioxide and water. It takes place mainly in the leaves, inside small structures called "
    "chloroplasts, which contain the green pigment chlorophyll. Oxygen is released as a by-product "
    "of the reaction, and the sugar produced feeds the plant.",
    "def merge_sorted(a, b):\n    result = []\n    i = j = 0\n"
    "    while i < len(a) and j < len(b):\n"
    "        if a[i] <= b[j]:\n            result.append(a[i])\n            i += 1\n        else:\n"
    "            result.append(b[j])\n            j += 1\n    result.extend(a[i:])\n"
    "    result.extend(b[j:])\n    return result\n",
]
TASKS = [
    "Repeat the following passage exactly, word for word:\n\n{p}",
    "Rewrite the following passage, changing only the first sentence, and keep the rest as it "
    "is:\n\n{p}",
    "Copy this text, then add one more sentence at the end:\n\n{p}",
]
OPEN = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a bicycle works to a ten-year-old.",
    "List some ideas for a weekend trip in the mountains and say why each is fun.",
]


def grounded_prompts() -> list[str]:
    return [t.format(p=p) for t in TASKS for p in PASSAGES]


def chat(tokenizer, text: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}])


def run(engine, prompts: list[str], params, at_once: bool) -> dict:
    """Generate for prompts (one after another, or all at once); tokens/s over the wall time."""
    start, outs = time.perf_counter(), {}
    before = engine.get_stats()
    batches = [prompts] if at_once else [[p] for p in prompts]
    for n, batch in enumerate(batches):
        for i, prompt in enumerate(batch):
            engine.add_request(f"{n}-{i}", prompt, params)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    outs[out.request_id] = out.outputs[0].token_ids
    elapsed = time.perf_counter() - start
    after = engine.get_stats()
    tokens = sum(len(t) for t in outs.values())
    drafts = after.spec_num_draft_tokens - before.spec_num_draft_tokens
    accepted = after.spec_num_accepted_tokens - before.spec_num_accepted_tokens
    verifications = after.spec_num_drafts - before.spec_num_drafts
    return {"output_tokens": tokens, "elapsed_s": elapsed, "output_tokens_per_s": tokens / elapsed,
            "acceptance_rate": accepted / drafts if drafts else None,
            "mean_accepted_length": 1 + accepted / verifications if verifications else None,
            "outputs": [outs[k] for k in sorted(outs)]}


def compare(name, engines: dict, prompts, params, at_once: bool, rounds: int) -> dict:
    runs = {label: [] for label in engines}
    for _ in range(rounds):
        for label, engine in engines.items():
            engine.block_manager.reset_prefix_cache()
            runs[label].append(run(engine, prompts, params, at_once))
            print(f"  {name} {label}: {runs[label][-1]['output_tokens_per_s']:.2f} tok/s",
                  flush=True)
    best = {label: max(r, key=lambda x: x["output_tokens_per_s"]) for label, r in runs.items()}
    base, spec = best["off"], best["on"]
    identical = base["outputs"] == spec["outputs"]
    result = {"prompts": len(prompts), "at_once": at_once,
              "identical_greedy_outputs": identical,
              "speedup": spec["output_tokens_per_s"] / base["output_tokens_per_s"],
              "rounds": {label: [x["output_tokens_per_s"] for x in r] for label, r in runs.items()}}
    for label, r in best.items():
        result[label] = {k: v for k, v in r.items() if k != "outputs"}
    print(f"{name}: {base['output_tokens_per_s']:.2f} -> {spec['output_tokens_per_s']:.2f} tok/s "
          f"({result['speedup']:.2f}x), acceptance {spec['acceptance_rate']}, mean accepted "
          f"length {spec['mean_accepted_length']}, identical {identical}", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", default="gemma3-270m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--num-speculative-tokens", type=int, default=8, help="n-gram K")
    ap.add_argument("--draft-model", default=None, help="draft for the open-text comparison")
    ap.add_argument("--draft-tokens", type=int, default=4, help="draft-model K")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--skip", default="", help="comma list of: grounded,open,batch")
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args()

    from trt_gemma.loader import load_model
    from trt_gemma.runtime import EngineConfig, LLMEngine
    from trt_gemma.sampling_params import SamplingParams

    model, tok = load_model(args.source, dtype=args.dtype)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    skip = set(filter(None, args.skip.split(",")))
    grounded = [chat(tok, p) for p in grounded_prompts()]
    open_text = [chat(tok, p) for p in OPEN]

    def engine(**config):
        return LLMEngine(model, tok, EngineConfig(kv_cache_memory=256 << 20, **config))

    ngram = dict(speculative_method="ngram", num_speculative_tokens=args.num_speculative_tokens)
    results = {"source": args.source, "dtype": args.dtype, "max_tokens": args.max_tokens,
               "ngram": ngram}
    if "grounded" not in skip:
        results["single_stream_grounded_ngram"] = compare(
            "single stream, grounded, n-gram", {"off": engine(), "on": engine(**ngram)},
            grounded, params, False, args.rounds)
    if args.draft_model and "open" not in skip:
        draft = dict(speculative_method="draft", draft_model=args.draft_model,
                     num_speculative_tokens=args.draft_tokens)
        results["draft"] = draft
        results["single_stream_open_draft"] = compare(
            "single stream, open text, draft", {"off": engine(), "on": engine(**draft)},
            open_text, params, False, args.rounds)
    if "batch" not in skip:
        mixed = (grounded + open_text) * (-(-args.batch // len(grounded + open_text)))
        results["batch_ngram"] = compare(
            f"batch {args.batch}, mixed, n-gram",
            {"off": engine(max_num_seqs=args.batch), "on": engine(max_num_seqs=args.batch,
                                                                   **ngram)},
            mixed[:args.batch], params, True, args.rounds)
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.output_json}")


if __name__ == "__main__":
    main()
