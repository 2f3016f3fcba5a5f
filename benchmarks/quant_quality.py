"""Perplexity and engine size of every quant mode on a real model (docs/quantization.md).

    python benchmarks/quant_quality.py                      # gemma3-270m, both bundled texts
    python benchmarks/quant_quality.py --quick              # the four main modes only
    python benchmarks/quant_quality.py --only "int4-awq g128,int4-awq g64"   # re-measure rows,
                                                            # merged into the existing results

For each configuration it builds an engine with ``trt_gemma.converter`` (exactly what ``trt-gemma
build`` does), records the size of its weight files, and scores the bundled calibration text
(in-sample for calibrated modes) and the held-out text (never seen by calibration) with
``trt_gemma.eval.perplexity``: every token of each text, one forward pass.

CPU runs use the runtime's CPU path: quantized weights are dequantized at load
(``quant.runtime.prepare_for_device``), which is the exact weight the GPU kernels multiply by. What
a CPU cannot run natively is emulated and labelled so: FP8 activations (W8A8, as on sm_89+ with the
engine's static input scales, via ``fp8_linear_ref``) and the FP8 KV cache (keys/values rounded
through e4m3 with the engine's per-layer scales before attention).

Writes benchmarks/results/quant_quality.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from trt_gemma.converter.commands import read_text
from trt_gemma.converter.engine import BuildOptions, build_engine
from trt_gemma.engine_dir import read_engine
from trt_gemma.eval import perplexity, text_ids
from trt_gemma.kernels.gemm_fp8 import Fp8Weight
from trt_gemma.kernels.reference import quantize_fp8 as cast_to_fp8
from trt_gemma.kernels.reference_gemm import fp8_linear_ref
from trt_gemma.kv_cache import ContiguousKVCache
from trt_gemma.loader import load_model
from trt_gemma.model import GemmaModel
from trt_gemma.quant.runtime import prepare_for_device

TEXTS = ("calibration.txt", "heldout.txt", "heldout_2.txt", "heldout_3.txt")
RESULTS = Path(__file__).parent / "results" / "quant_quality.json"


class _W8A8:
    """An Fp8Weight whose linear quantizes x to e4m3 with its static scale, as FP8 GEMMs do."""

    def __init__(self, w: Fp8Weight):
        self.w = w

    def to(self, device):
        return self

    def linear(self, x):
        return fp8_linear_ref(x, self.w, quantize_input=True)


def _fp8_kv_cache(scales: dict[int, tuple[float, float]]):
    class Fp8KVCache(ContiguousKVCache):
        """Stores keys/values as e4m3 would (k / k_scale rounded, times k_scale)."""

        def attend(self, layer, q, k, v, **kw):
            ks, vs = scales[layer]
            k = (cast_to_fp8(k, ks).float() * ks).to(k.dtype)
            v = (cast_to_fp8(v, vs).float() * vs).to(v.dtype)
            return super().attend(layer, q, k, v, **kw)

    return Fp8KVCache


def _load(engine_dir: Path, dtype: torch.dtype, emulate_w8a8: bool):
    if not emulate_w8a8:
        return load_model(engine_dir, dtype=dtype)
    engine = read_engine(engine_dir)
    weights = {n: _W8A8(w) if isinstance(w, Fp8Weight) else w
               for n, w in engine.load_weights().items()}
    return GemmaModel.from_state_dict(engine.config, weights, dtype=dtype), engine.load_tokenizer()


def _kv_scales(engine_dir: Path) -> dict[int, tuple[float, float]]:
    engine = read_engine(engine_dir)
    return {i: (float(engine.load_tensor(f"layers.{i}.self_attn.k_scale")),
                float(engine.load_tensor(f"layers.{i}.self_attn.v_scale")))
            for i in range(engine.config.num_hidden_layers)}


def _score(model, tokenizer, max_tokens, make_cache=ContiguousKVCache) -> dict[str, dict]:
    out = {}
    for name in TEXTS:
        ids = text_ids(tokenizer, read_text(f"bundled:{name}"), max_tokens)
        t = time.perf_counter()
        r = perplexity(model, ids, tokenizer.bos_id, make_cache=make_cache)
        out[name] = {"perplexity": r.perplexity, "tokens": r.num_tokens,
                     "seconds": round(time.perf_counter() - t, 1)}
    return out


# label, build options, eval dtype, emulate W8A8, emulate FP8 KV
CONFIGS = [
    ("none fp32", dict(quant="none", dtype="float32"), torch.float32, False, False),
    ("none bf16", dict(quant="none"), torch.bfloat16, False, False),
    ("fp8", dict(quant="fp8"), torch.bfloat16, False, False),
    ("fp8 W8A8 (emulated)", "fp8", torch.bfloat16, True, False),
    ("fp8 + fp8 KV (emulated)", dict(quant="fp8", kv_cache_dtype="fp8"), torch.bfloat16, True,
     True),
    ("int4-awq g128", dict(quant="int4-awq"), torch.bfloat16, False, False),
    ("int4 g128", dict(quant="int4"), torch.bfloat16, False, False),
    ("int4-awq g64", dict(quant="int4-awq", group_size=64), torch.bfloat16, False, False),
    ("int4 g64", dict(quant="int4", group_size=64), torch.bfloat16, False, False),
    ("int4-awq g32", dict(quant="int4-awq", group_size=32), torch.bfloat16, False, False),
    ("int4 g32", dict(quant="int4", group_size=32), torch.bfloat16, False, False),
]
QUICK = ("none bf16", "fp8", "int4-awq g128", "int4 g128")


def cpu_speed(engine_dir: Path) -> dict[str, dict[str, float]]:
    """Best-of-3 seconds per forward (128-token prefill, 1-token decode after 128) of an INT4
    engine on CPU in fp32: weights dequantized once at load vs ``Int4Weight.linear`` per call."""
    engine = read_engine(engine_dir)
    raw = engine.load_weights()
    ids = torch.arange(100, 228)
    result: dict[str, dict[str, float]] = {"prefill_128": {}, "decode_1": {}}
    for label, weights in (("dequantized_at_load", prepare_for_device(raw, "cpu")),
                           ("dequantized_per_call", raw)):
        model = GemmaModel.from_state_dict(engine.config, dict(weights), dtype=torch.float32)
        prefill, decode = [], []
        for _ in range(3):
            cache = ContiguousKVCache(model.config, 129, model.dtype)
            t = time.perf_counter()
            cache.forward(model, ids)
            prefill.append(time.perf_counter() - t)
            t = time.perf_counter()
            cache.forward(model, ids[:1])
            decode.append(time.perf_counter() - t)
        result["prefill_128"][label] = round(min(prefill), 3)
        result["decode_1"][label] = round(min(decode), 3)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", default="gemma3-270m")
    p.add_argument("--max-tokens", type=int, default=None, help="score the first N tokens only")
    p.add_argument("--quick", action="store_true", help="none/fp8/int4-awq/int4 at g128 only")
    p.add_argument("--only", default=None, metavar="LABELS",
                   help="comma-separated config labels to (re-)measure; their rows replace the "
                        "same rows of --out, the others are kept (and the bf16 baseline is read "
                        "from there unless re-measured)")
    p.add_argument("--work-dir", default=None, help="where engines are built (default: temp)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--speed-only", metavar="INT4_ENGINE", default=None,
                   help="only re-measure CPU speed on this engine, updating --out in place")
    args = p.parse_args(argv)
    if args.speed_only:
        data = json.loads(Path(args.out).read_text())
        data["cpu_forward_seconds_int4"] = cpu_speed(Path(args.speed_only))
        data.pop("cpu_forward_seconds_int4_128_tokens", None)
        Path(args.out).write_text(json.dumps(data, indent=2) + "\n")
        print(data["cpu_forward_seconds_int4"])
        return 0
    torch.manual_seed(0)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="quant-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    only = None
    if args.only:
        only = [o.strip() for o in args.only.split(",") if o.strip()]
        unknown = set(only) - {c[0] for c in CONFIGS}
        if unknown:
            p.error(f"--only: unknown config(s) {sorted(unknown)}; "
                    f"known: {[c[0] for c in CONFIGS]}")
    else:
        t = time.perf_counter()
        model, tok = load_model(args.source, dtype="float32")
        rows.append({"config": "source fp32 (dequantized GGUF)", "build_seconds": None,
                     "weight_bytes": None, **_score(model, tok, args.max_tokens),
                     "load_seconds": round(time.perf_counter() - t, 1)})
        print(json.dumps(rows[-1]), flush=True)
        del model
    built: dict[str, Path] = {}
    for label, opts, dtype, w8a8, fp8_kv in CONFIGS:
        if (args.quick and label not in QUICK) or (only is not None and label not in only):
            continue
        if isinstance(opts, str) and opts not in built:  # its engine's row is not re-measured
            continue
        if isinstance(opts, str):  # reuse another row's engine
            engine_dir, build_s, out_err = built[opts], None, {}
        else:
            engine_dir = work / label.replace(" ", "_")
            t = time.perf_counter()
            res = build_engine(args.source, engine_dir, BuildOptions(overwrite=True, **opts),
                               progress=False, log=lambda m: None)
            build_s = round(time.perf_counter() - t, 1)
            out_err = {}  # mean relative output error per group on calibration rows, per step
            for key in ("rtn_error", "awq_error", "gptq_error"):
                vals = [getattr(g, key) for g in res.report.groups
                        if getattr(g, key) is not None]
                if vals:
                    out_err[key.removesuffix("_error")] = round(sum(vals) / len(vals), 5)
            built[label] = engine_dir
        weight_bytes = sum(f.stat().st_size for f in engine_dir.glob("weights-*.safetensors"))
        model, tok = _load(engine_dir, dtype, w8a8)
        make_cache = _fp8_kv_cache(_kv_scales(engine_dir)) if fp8_kv else ContiguousKVCache
        rows.append({"config": label, "build": opts if isinstance(opts, dict) else opts,
                     "eval_dtype": str(dtype).removeprefix("torch."), "build_seconds": build_s,
                     "weight_bytes": weight_bytes, **_score(model, tok, args.max_tokens,
                                                            make_cache)})
        if out_err:
            rows[-1]["mean_output_error"] = out_err
        print(json.dumps(rows[-1]), flush=True)
        del model
    speed = cpu_speed(built["int4-awq g128"]) if "int4-awq g128" in built and not only else None
    if only is not None:  # merge into the existing results, in their order
        old = json.loads(Path(args.out).read_text())
        if old.get("max_tokens") != args.max_tokens or old.get("source") != args.source:
            p.error(f"--only: {args.out} was measured with other --source/--max-tokens")
        new = {r["config"]: {**r, "cpu_threads": torch.get_num_threads()} for r in rows}
        kept = [new.pop(r["config"], r) for r in old["rows"]]
        rows = kept + list(new.values())
        speed = old.get("cpu_forward_seconds_int4")
    base = next(r for r in rows if r["config"] == "none bf16")
    for r in rows:
        for name in (n for n in TEXTS if n in r):  # rows measured before a text was added lack it
            r[name]["vs_bf16"] = r[name]["perplexity"] / base[name]["perplexity"] - 1
    machine = {"python": platform.python_version(), "torch": torch.__version__,
               "cpu_threads": torch.get_num_threads(), "device": "cpu"}
    if only is not None:  # rows measured in this run carry their own cpu_threads
        machine = old["machine"]
    result = {"source": args.source, "texts": TEXTS, "max_tokens": args.max_tokens,
              "machine": machine,
              "rows": rows, "cpu_forward_seconds_int4": speed}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("\n| config | weights MiB | ppl calibration | ppl held-out | held-out vs bf16 |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        mib = f"{r['weight_bytes'] / 2**20:.1f}" if r["weight_bytes"] else "-"
        c, h = r["calibration.txt"], r["heldout.txt"]
        print(f"| {r['config']} | {mib} | {c['perplexity']:.2f} | {h['perplexity']:.2f} | "
              f"{h['vs_bf16']:+.1%} |")
    if speed:
        print(f"\nCPU forward seconds, int4-awq engine, fp32: {speed}")
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
