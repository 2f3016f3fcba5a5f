"""Cost and detection power of SynthID-Text watermarking and safety screening (docs/responsible.md).

    python benchmarks/responsible.py apply        # Watermarker.apply per step, 262k vocabulary
    python benchmarks/responsible.py throughput   # engine tokens/s, watermark off vs on
    python benchmarks/responsible.py screen       # classifier latency on the 270M
    python benchmarks/responsible.py roc          # 50 watermarked vs 50 plain completions

``throughput`` and ``roc`` run the real engine, the watermark on or off per request
(``SamplingParams(watermark=CONFIG)``): the sampler applies it after temperature and
top-k/top-p/min-p, where transformers' processor runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time

import torch

from trt_gemma.responsible.detect import detect
from trt_gemma.responsible.synthid import WatermarkConfig, Watermarker

# 30 layers and 5-grams: the synthid-text repository's default configuration shape.
KEYS = tuple(range(654, 654 + 30 * 37, 37))
CONFIG = WatermarkConfig(keys=KEYS, ngram_len=5)


def cpu_flags() -> str:
    capability = torch.backends.cpu.get_cpu_capability()
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), "")
    except OSError:
        pass
    return (f"{model or platform.processor()}, torch {torch.__version__} ({capability}), "
            f"{torch.get_num_threads()} threads")


def best_of(fn, rounds: int = 5) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def cmd_apply(args) -> None:
    vocab = 262144
    wm = Watermarker(CONFIG)
    gen = torch.Generator().manual_seed(0)
    for rows in (1, 32):
        states = [wm.new_state() for _ in range(rows)]
        for s in states:
            for t in torch.randint(0, vocab, (6,), generator=gen).tolist():
                s.advance(t)
        logits = torch.randn(rows, vocab, generator=gen)
        top = logits.topk(64, dim=-1)
        filtered = torch.full_like(logits, float("-inf")).scatter(1, top.indices, top.values)
        dense = best_of(lambda x=logits, s=states: wm.apply(x, s), args.rounds)
        sparse = best_of(lambda x=filtered, s=states: wm.apply(x, s), args.rounds)
        print(json.dumps({"rows": rows, "vocab": vocab, "depth": CONFIG.depth,
                          "dense_ms": round(dense * 1e3, 2),
                          "top_k_64_ms": round(sparse * 1e3, 2)}))
    if args.reference:
        from transformers.generation.logits_process import SynthIDTextWatermarkLogitsProcessor

        ref = SynthIDTextWatermarkLogitsProcessor(
            ngram_len=CONFIG.ngram_len, keys=list(KEYS), sampling_table_size=2**16,
            sampling_table_seed=0, context_history_size=1024, device="cpu")
        logits = torch.randn(1, vocab, generator=gen)

        def one():
            ref.state = None
            ref(torch.zeros(1, 1, dtype=torch.long), logits.clone())

        print(json.dumps({"rows": 1, "transformers_processor_ms":
                          round(best_of(one, 2) * 1e3, 1)}))
    print(json.dumps({"cpu": cpu_flags()}))


PROMPTS = [f"{verb} {topic}." for topic in (
    "the ocean", "a lighthouse keeper", "volcanoes", "the history of bread", "a lost robot",
    "winter in a small town", "how bees communicate", "the first day at a new job",
    "a dragon who is afraid of heights", "the moon landing") for verb in (
    "Write a short story about", "Explain to a child", "Write a poem about",
    "Describe in detail", "Write a news article about")]


def load_llm():
    from trt_gemma.llm import LLM

    return LLM("gemma3-270m", dtype="float32", device="cpu")


def chat_prompts(llm, n: int) -> list[str]:
    return [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}])
            for p in PROMPTS[:n]]


def cmd_throughput(args) -> None:
    from trt_gemma.sampling_params import SamplingParams

    llm = load_llm()
    results = []
    for batch in (1, 32):
        prompts = chat_prompts(llm, batch)
        for top_k in (64, 0):
            plain = SamplingParams(temperature=1.0, top_k=top_k, max_tokens=args.max_tokens,
                                   ignore_eos=True, seed=0)
            llm.generate(prompts[:1], SamplingParams(max_tokens=4))  # warm
            row = {"batch": batch, "top_k": top_k}
            for _ in range(args.rounds):  # alternate off / on
                for enabled in (False, True):
                    params = (dataclasses.replace(plain, watermark=CONFIG) if enabled
                              else plain)
                    start = time.perf_counter()
                    outs = llm.generate(prompts, params)
                    elapsed = time.perf_counter() - start
                    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
                    key = "on" if enabled else "off"
                    row[key] = max(row.get(key, 0.0), tokens / elapsed)
            row = {**row, "off": round(row["off"], 2), "on": round(row["on"], 2),
                   "ratio": round(row["on"] / row["off"], 3)}
            results.append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps({"cpu": cpu_flags(), "max_tokens": args.max_tokens}))


def cmd_screen(args) -> None:
    from trt_gemma.loader import load_model
    from trt_gemma.responsible.safety import SafetyClassifier, SafetyPolicy

    model, tokenizer = load_model("gemma3-270m", dtype="float32")
    clf = SafetyClassifier(model, tokenizer)
    policy = SafetyPolicy.default()
    prompt = policy.prompt_text("How do I bake sourdough bread at home?")
    response = policy.response_text("How do I bake sourdough bread at home?",
                                    "Mix flour, water, salt and starter, let it rise, then bake "
                                    "at 230 C for 40 minutes.")
    for name, text in (("prompt", prompt), ("response", response)):
        tokens = len(clf.encode(text))
        for batch in (1, 8):
            seconds = best_of(lambda t=text, b=batch: clf.p_yes([t] * b), args.rounds)
            print(json.dumps({"kind": name, "tokens": tokens, "batch": batch,
                              "ms": round(seconds * 1e3, 1),
                              "ms_per_text": round(seconds * 1e3 / batch, 1)}), flush=True)
    print(json.dumps({"cpu": cpu_flags()}))


def auc(positive: list[float], negative: list[float]) -> float:
    """ROC AUC as the Mann-Whitney statistic: P(score of a positive > a negative)."""
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def reference_scores(sequences: list[list[int]], eos_id: int) -> list[float]:
    """Weighted mean scores from transformers' own g-values and masks (held-out check)."""
    from transformers.generation.logits_process import SynthIDTextWatermarkLogitsProcessor

    ref = SynthIDTextWatermarkLogitsProcessor(
        ngram_len=CONFIG.ngram_len, keys=list(KEYS), sampling_table_size=2**16,
        sampling_table_seed=0, context_history_size=1024, device="cpu")
    scores = []
    for ids in sequences:
        x = torch.tensor([ids])
        mask = (ref.compute_context_repetition_mask(x)
                * ref.compute_eos_token_mask(x, eos_id)[:, CONFIG.ngram_len - 1:]).double()
        g = ref.compute_g_values(x).double()
        depth = g.shape[-1]
        w = torch.linspace(10, 1, depth, dtype=torch.float64)
        w *= depth / w.sum()
        s = (g * w * mask[:, :, None]).sum() / (depth * mask.sum())
        scores.append(float(s))
    return scores


def cmd_roc(args) -> None:
    from trt_gemma.sampling_params import SamplingParams

    llm = load_llm()
    prompts = chat_prompts(llm, args.num)
    plain = SamplingParams(temperature=1.0, top_k=64, top_p=0.95, max_tokens=args.max_tokens,
                            min_tokens=args.max_tokens, seed=0)
    outputs = {}
    for enabled in (True, False):
        params = dataclasses.replace(plain, watermark=CONFIG) if enabled else plain
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        outputs[enabled] = [o.outputs[0].token_ids for o in outs]
        if args.save:  # the completions, so a later scoring needs no regeneration
            with open(f"{args.save}.{'on' if enabled else 'off'}.json", "w") as f:
                json.dump(outputs[enabled], f)
        print(json.dumps({"watermark": enabled, "seconds": round(time.perf_counter() - start)}),
              flush=True)
    eos = sorted(llm.tokenizer.stop_token_ids)
    watermarker = Watermarker(CONFIG)
    ours = {k: [detect(watermarker, ids, eos_token_ids=eos) for ids in v]
            for k, v in outputs.items()}
    ref = {k: reference_scores(v, llm.tokenizer.eos_id) for k, v in outputs.items()}
    summary = {
        "completions": [len(outputs[True]), len(outputs[False])],
        "tokens_each": args.max_tokens,
        "auc_ours": auc([r.score for r in ours[True]], [r.score for r in ours[False]]),
        "auc_transformers_g_values": auc(ref[True], ref[False]),
        "median_score": [statistics.median(r.score for r in ours[k]) for k in (True, False)],
        "median_p_value": [statistics.median(r.p_value for r in ours[k]) for k in (True, False)],
        "watermarked_p_below_1e-3": sum(r.p_value < 1e-3 for r in ours[True]),
        "plain_p_below_1e-3": sum(r.p_value < 1e-3 for r in ours[False]),
        "median_scored_tokens": statistics.median(r.num_scored_tokens for r in ours[True]),
    }
    print(json.dumps(summary))
    print(json.dumps({"cpu": cpu_flags()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("apply")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reference", action="store_true", help="also time transformers' processor")
    p.set_defaults(func=cmd_apply)
    p = sub.add_parser("throughput")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32)
    p.set_defaults(func=cmd_throughput)
    p = sub.add_parser("screen")
    p.add_argument("--rounds", type=int, default=3)
    p.set_defaults(func=cmd_screen)
    p = sub.add_parser("roc")
    p.add_argument("--num", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--save", default=None, metavar="PREFIX",
                   help="write the token ids to PREFIX.on.json / PREFIX.off.json")
    p.set_defaults(func=cmd_roc)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
