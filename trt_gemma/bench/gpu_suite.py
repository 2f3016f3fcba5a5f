"""``trt-gemma bench gpu-suite``: every GPU measurement the project needs, in one timed command.

Whoever is lent a GPU for a few minutes runs one command and leaves one JSON behind. In order:

1. ``gpu-tests``: ``pytest -q -m "not slow"`` on the test files that hold GPU-only tests (a
   subprocess with a timeout; pass/fail counts recorded);
2. ``cuda-graph``: the same greedy requests through an engine with CUDA graphs
   (``enforce_eager=False``) and one without, on one random-weights model: token ids must match;
3. ``kernels``: ``benchmarks/kernels.py`` (attention kernels vs SDPA, GB/s, roofline fractions);
   then, only where 2+ GPUs are visible, ``tensor-parallel``: ``benchmarks/tensor_parallel.py``
   on the real Gemma 3 270M in bf16 over 1, 2 (and 4) GPUs (NCCL): tokens against one GPU,
   per-rank memory, throughput;
4. ``throughput`` and ``latency`` per preset and quant mode, random weights (quantized in memory
   with ``trt_gemma.quant``: FP8 per-channel, INT4 RTN g128; INT4-AWQ needs calibration on text).

The clock is checked before each step: a step whose estimate does not fit in what is left stops
the suite, and it and every later step are listed as skipped, with the reason. The JSON is
rewritten after every step, so a crash or a lost machine still leaves what was measured. The
estimates are guesses made without a GPU, to be replaced by measured ones after the first run.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from trt_gemma.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]  # the source tree: tests/ and benchmarks/ live here
DEFAULT_PRESETS = "gemma-2b,gemma-7b,gemma-2-9b,gemma-3-4b"
QUANT_MODES = ("none", "fp8", "int4")
INT4_GROUP = 128
QUANT_NOTES = {
    "none": "dense bfloat16 weights",
    "fp8": "random weights quantized in memory by trt_gemma.quant.quantize_fp8: per-output-"
           "channel E4M3 weight scales, dynamic per-tensor activation scale (no calibration)",
    "int4": f"random weights quantized in memory by trt_gemma.quant.quantize_int4_rtn: "
            f"round-to-nearest, group {INT4_GROUP}, zero points (as trt-gemma build --quant int4)",
    "int4-awq": "not run: AWQ needs calibration on text; build an engine with "
                "`trt-gemma build --quant int4-awq` and run `trt-gemma bench throughput` on it",
}
# Fixed estimates (seconds) and, for model steps, seconds per GB of weights (random weights made
# and quantized on the GPU, Triton compilation for the step's shapes, then the run itself).
BASE_S = {"gpu-tests": 150.0, "cuda-graph": 45.0, "kernels": 60.0, "tensor-parallel": 90.0,
          "throughput": 25.0, "latency": 20.0}
PER_GB_S = {"throughput": 2.0, "latency": 1.5}
BYTES_PER_PARAM = {"none": 2.0, "fp8": 1.0, "int4": 0.5}
THROUGHPUT = {"num_requests": 64, "input_len": 128, "output_len": 128}
LATENCY = {"batch_sizes": [1, 8], "input_len": 128, "output_len": 32, "iterations": 2}
GRAPH_CHECK_PRESET = "gemma-3-270m"
NUM_LAYERS: int | None = None  # decoder layers of the model steps; None = the preset's all
KERNEL_ARGS = ["--batches", "1,64", "--contexts", "2048,8192"]
NO_CUDA = "no CUDA device: gpu-suite measures a GPU; see --dry-run"


@dataclass(frozen=True)
class Step:
    kind: str  # gpu-tests | cuda-graph | kernels | tensor-parallel | throughput | latency
    estimate_s: float  # how long it is expected to take; compared with the time left
    preset: str | None = None  # model shapes, for throughput / latency
    quant: str | None = None  # none | fp8 | int4, for throughput / latency

    @property
    def name(self) -> str:
        return "-".join(x for x in (self.kind, self.preset, self.quant) if x)


def weight_gb(preset_name: str, quant: str) -> float:
    from trt_gemma.config import preset

    return preset(preset_name).num_parameters() * BYTES_PER_PARAM[quant] / 1e9


def plan(presets: list[str], quants: list[str], gpus: int = 1) -> list[Step]:
    """The steps in order; ``tensor-parallel`` only with ``gpus`` >= 2."""
    kinds = ["gpu-tests", "cuda-graph", "kernels"] + (["tensor-parallel"] if gpus >= 2 else [])
    steps = [Step(kind, BASE_S[kind]) for kind in kinds]
    for p in presets:
        for q in quants:
            for kind in ("throughput", "latency"):
                est = BASE_S[kind] + PER_GB_S[kind] * weight_gb(p, q)
                steps.append(Step(kind, round(est, 1), p, q))
    return steps


def parse_list(text: str, allowed: tuple[str, ...] | None, flag: str) -> list[str]:
    from trt_gemma.config import preset

    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise ConfigError(f"{flag} must name at least one, got {text!r}")
    for item in items:
        if item == "int4-awq" and flag == "--quant":
            why = QUANT_NOTES["int4-awq"].removeprefix("not run: ")
            raise ConfigError(f"--quant int4-awq: {why}")
        if allowed is not None and item not in allowed:
            raise ConfigError(f"{flag}: unknown {item!r}; known: {', '.join(allowed)}")
        if allowed is None:
            preset(item)  # unknown preset: a one-line error naming the known ones
    return items


def format_plan(steps: list[Step], budget_s: float, output_dir: str) -> str:
    lines = [f"gpu-suite plan: {len(steps)} steps, budget {budget_s / 60:.1f} min, "
             f"results in {output_dir}/"]
    total = 0.0
    for i, s in enumerate(steps, 1):
        total += s.estimate_s
        fits = "" if total <= budget_s else "   (beyond the budget: would be skipped)"
        lines.append(f"  {i:2}. {s.name:32} ~{s.estimate_s:6.0f} s{fits}")
    lines.append(f"estimated total {total / 60:.1f} min (estimates made without a GPU)")
    for q in [*dict.fromkeys(s.quant for s in steps if s.quant), "int4-awq"]:
        lines.append(f"  {q}: {QUANT_NOTES[q]}")
    return "\n".join(lines)


Runner = Callable[[Step, float], dict]  # (step, seconds left) -> result; "status" key optional


def run_suite(steps: list[Step], budget_s: float, runners: dict[str, Runner],
              json_path: str | Path, header: dict[str, Any],
              clock: Callable[[], float] = time.monotonic) -> dict:
    """Run ``steps`` in order while each one's estimate fits in what is left of ``budget_s``;
    the first that does not stops the suite. Writes ``json_path`` after every step."""
    from trt_gemma.bench.report import write_json

    start = clock()
    out = {**header, "budget_s": budget_s, "plan": [asdict(s) | {"name": s.name} for s in steps],
           "steps": [], "ran": [], "skipped": [], "elapsed_s": 0.0}
    stop_why = None
    for step in steps:
        left = budget_s - (clock() - start)
        if stop_why is None and step.estimate_s > left:
            stop_why = (f"out of time: {step.name} needs ~{step.estimate_s:.0f} s, "
                        f"{max(left, 0):.0f} s of {budget_s:.0f} s left")
        if stop_why is not None:
            why = stop_why if not out["skipped"] else "out of time: the suite stopped before it"
            out["skipped"].append({"step": step.name, "why": why})
            out["steps"].append({"step": step.name, "status": "skipped", "why": why})
            continue
        t0 = clock()
        try:
            result = dict(runners[step.kind](step, left))
            status = result.pop("status", "ok")
        except Exception as e:  # one step's failure must not lose the others' results
            result, status = {"error": f"{type(e).__name__}: {e}"}, "error"
        record = {"step": step.name, "status": status, "estimate_s": step.estimate_s,
                  "elapsed_s": round(clock() - t0, 3), **result}
        out["steps"].append(record)
        if status == "skipped":  # the runner found nothing to run (e.g. no source tree)
            out["skipped"].append({"step": step.name, "why": result.get("why")})
        else:
            out["ran"].append(step.name)
        out["elapsed_s"] = round(clock() - start, 3)
        write_json(json_path, out)
        print(f"gpu-suite: {step.name}: {status} in {record['elapsed_s']:.0f} s", flush=True)
    out["elapsed_s"] = round(clock() - start, 3)
    write_json(json_path, out)
    return out


def gpu_test_files(tests_dir: Path) -> list[Path]:
    """Test files with GPU-only tests: marked ``gpu`` or skipped without CUDA."""
    return sorted(p for p in tests_dir.glob("test_*.py")
                  if re.search(r"mark\.gpu|cuda\.is_available\(\)", p.read_text()))


def pytest_counts(output: str) -> dict[str, int]:
    """Counts from pytest's last summary line ("3 passed, 1 failed, 2 skipped in 4.2s")."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "deselected": 0}
    lines = [ln for ln in output.strip().splitlines()
             if re.search(r"\d+ (passed|failed|error)", ln)]
    for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)",
                              lines[-1] if lines else ""):
        counts["errors" if word.startswith("error") else word] += int(n)
    return counts


def run_gpu_tests(step: Step, left: float) -> dict:
    files = gpu_test_files(ROOT / "tests") if (ROOT / "tests").is_dir() else []
    if not files:
        return {"status": "skipped", "why": f"no GPU test files under {ROOT / 'tests'}"}
    env = _real_kernels_env()
    timeout = min(left, 2 * step.estimate_s)
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider",
           *map(str, files)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        tail = e.stdout or ""
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return {"status": "failed", "why": f"timed out after {timeout:.0f} s",
                "files": [f.name for f in files], "output_tail": tail[-3000:]}
    counts = pytest_counts(proc.stdout)
    ok = proc.returncode == 0 and counts["failed"] == counts["errors"] == 0
    return {"status": "ok" if ok else "failed", "returncode": proc.returncode, **counts,
            "files": [f.name for f in files], "output_tail": proc.stdout[-3000:]}


def quantized_random_target(preset_name: str, quant: str, device: str, num_layers: int | None
                            = None, seed: int = 0):
    """A BenchTarget of random bfloat16 weights at the preset's shapes, its decoder linears
    quantized in memory (``quant``: none | fp8 | int4); norms and embeddings stay dense."""
    import torch

    from trt_gemma.bench.target import INIT_STD, BenchTarget, truncated
    from trt_gemma.checkpoint.base import expected_tensor_shapes
    from trt_gemma.config import preset
    from trt_gemma.model import GemmaModel
    from trt_gemma.quant import Fp8Weight, Int4Weight, quantize_fp8, quantize_int4_rtn
    from trt_gemma.quant.runtime import prepare_for_device

    _free()  # a failed step's model may still be waiting for the collector
    full = preset(preset_name)
    config = truncated(full, num_layers)
    dtype = torch.bfloat16
    gen = torch.Generator(device).manual_seed(seed)
    weights: dict[str, Any] = {}
    for name, shape in expected_tensor_shapes(config).items():
        w = torch.empty(shape, dtype=dtype, device=device)
        w.normal_(0.0, 0.1 if "norm" in name else INIT_STD, generator=gen)
        if name.startswith("layers.") and name.endswith("_proj.weight") and quant != "none":
            w = (quantize_fp8(w, per_channel=True) if quant == "fp8" else
                 quantize_int4_rtn(w, INT4_GROUP, symmetric=False, scale_dtype=dtype))
        weights[name] = w
    quantized = quant != "none"
    weights = prepare_for_device(weights, device, dtype)
    kept = any(isinstance(w, (Fp8Weight, Int4Weight)) for w in weights.values())
    model = GemmaModel.from_state_dict(config, weights, dtype=dtype, device=device)
    info = {"source": None, "random_weights": True, "preset": preset_name,
            "num_layers": config.num_hidden_layers, "preset_num_layers": full.num_hidden_layers,
            "layers_truncated": config.num_hidden_layers != full.num_hidden_layers,
            "quant": quant, "quant_method": QUANT_NOTES[quant], "dtype": "bfloat16",
            # False: this GPU has no kernel for the format, the weights were dequantized at load
            "quantized_kernels": kept if quantized else None}
    return BenchTarget(model, None, info)


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _greedy_ids(engine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from trt_gemma.bench.runner import params

    for i, ids in enumerate(prompts):
        engine.add_request(f"g{i}", ids, params(max_tokens))
    done: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
    return [done[f"g{i}"] for i in range(len(prompts))]


def _engine(model, **kw):
    """The engine's defaults (CUDA graphs on); greedy_head_max_rows=0 only skips a CPU-only
    LM-head build, so the CPU tests of this module stay fast: it changes nothing on a GPU."""
    from trt_gemma.runtime import EngineConfig, LLMEngine

    return LLMEngine(model, None, EngineConfig(greedy_head_max_rows=0, **kw))


def run_cuda_graph_check(step: Step, left: float, device: str = "cuda") -> dict:
    """Greedy token ids with CUDA graphs vs eager, batches of 6 (a padded graph size) and 1."""
    import random

    target = quantized_random_target(GRAPH_CHECK_PRESET, "none", device, NUM_LAYERS)
    rng = random.Random(0)
    vocab = target.model.config.vocab_size
    batches = [[[2, *(rng.randrange(4, vocab) for _ in range(n))] for n in (5, 9, 17, 30, 41, 64)],
               [[2, *(rng.randrange(4, vocab) for _ in range(12))]]]
    ids, captured = {}, None
    for eager in (True, False):
        engine = _engine(target.model, enforce_eager=eager, kv_cache_memory=1 << 30)
        if not eager:
            graphs = engine.runner.graphs
            captured = None if graphs is None else list(graphs.batch_sizes)
        ids[eager] = [_greedy_ids(engine, prompts, 24) for prompts in batches]
        del engine
        _free()
    equal = ids[True] == ids[False]
    # Where each differing request first diverged: late divergence after many equal tokens points
    # at bf16 rounding (a padded graph batch may pick another GEMM or split count), an early one
    # at a replay bug.
    mismatched = [{"batch": b, "request": i, "first_diff": _first_diff(x, y)}
                  for b, (e, g) in enumerate(zip(ids[True], ids[False]))
                  for i, (x, y) in enumerate(zip(e, g)) if x != y]
    return {"status": "ok" if equal and captured else "failed", "preset": GRAPH_CHECK_PRESET,
            "token_ids_equal": equal, "mismatched": mismatched, "graph_batch_sizes": captured,
            "requests": [len(b) for b in batches], "max_tokens": 24,
            **({} if captured else {"why": "no CUDA graphs were captured"})}


def _first_diff(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _real_kernels_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _run_script(step: Step, left: float, name: str, args: list[str], out_path: Path) -> dict:
    """``benchmarks/NAME ARGS`` in a subprocess (real kernels, not the interpreter), bounded by
    the step's time; {"data": its JSON at out_path} or a failed / skipped record."""
    import json

    script = ROOT / "benchmarks" / name
    if not script.is_file():
        return {"status": "skipped", "why": f"{script} not found (no source tree)"}
    timeout = min(left, 2 * step.estimate_s)
    out_path.unlink(missing_ok=True)  # never read an earlier run's file
    try:
        proc = subprocess.run([sys.executable, str(script), *args], cwd=ROOT,
                              env=_real_kernels_env(), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "why": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0 or not out_path.is_file():
        return {"status": "failed", "returncode": proc.returncode,
                "output_tail": (proc.stdout + proc.stderr)[-3000:]}
    return {"data": json.loads(out_path.read_text())}


def run_kernels(step: Step, left: float, out_path: Path) -> dict:
    out_path = out_path.resolve()  # the subprocess runs in the source tree
    ran = _run_script(step, left, "kernels.py", [*KERNEL_ARGS, "--out", str(out_path)],
                      out_path)
    if "data" not in ran:
        return ran
    data = ran["data"]
    best = {}
    for r in data["results"]:
        k = r["kernel"]
        if r.get("roofline_fraction") is not None and (
                k not in best or r["roofline_fraction"] > best[k]["roofline_fraction"]):
            best[k] = {key: r[key] for key in ("model", "batch", "context", "gbs",
                                               "roofline_fraction", "speedup")}
    return {"json": str(out_path), "args": KERNEL_ARGS, "device": data["device"],
            "peaks": data["peaks"], "best_roofline": best, "results": data["results"]}


def tensor_parallel_sizes(gpus: int) -> list[int]:
    """1, 2 and 4 where that many GPUs are visible (the 270M's 4 query heads divide by them)."""
    return [n for n in (1, 2, 4) if n <= gpus]


def run_tensor_parallel(step: Step, left: float, out_path: Path, gpus: int) -> dict:
    out_path = out_path.resolve()
    sizes = [str(n) for n in tensor_parallel_sizes(gpus)]
    args = ["--device", "cuda", "--dtype", "bfloat16", "--sizes", *sizes, "--kv-cache-mib",
            "1024", "--output-json", str(out_path)]
    ran = _run_script(step, left, "tensor_parallel.py", args, out_path)
    if "data" not in ran:
        return ran
    return {"json": str(out_path), **ran["data"]}


def run_throughput(step: Step, left: float, plot_dir: Path, device: str = "cuda") -> dict:
    from trt_gemma.bench import report, runner, throughput
    from trt_gemma.bench.commands import _engine_record, _telemetry
    from trt_gemma.bench.workload import synthetic
    from trt_gemma.runtime.engine import choose_kv_dtype

    target = quantized_random_target(step.preset, step.quant, device, NUM_LAYERS)
    model = target.model
    w = THROUGHPUT
    requests = synthetic(w["num_requests"], w["input_len"], w["output_len"],
                         model.config.vocab_size, 0.0, 0, model.config.bos_token_id)
    engine = _engine(model)
    runner.check_fits(engine, requests)
    record = _engine_record(engine)
    runner.warm_up(engine, requests)
    with _telemetry(model, 0.1) as tm:
        trace = runner.run(engine, requests)
    kv_itemsize = choose_kv_dtype(model, engine.config.kv_cache_dtype).itemsize
    res = throughput.results(model, kv_itemsize, requests, trace, engine.get_stats().num_kv_blocks)
    plot = plot_dir / f"{step.name}.png"
    report.plot_throughput(plot, trace, tm.samples, f"gpu-suite {step.name}")
    del engine, model, target
    _free()
    return {"workload": w, "engine": record, "results": res, "telemetry": tm.summary(),
            "plot": str(plot)}


def run_latency(step: Step, left: float, plot_dir: Path, device: str = "cuda") -> dict:
    from trt_gemma.bench import latency, report, runner
    from trt_gemma.bench.commands import _engine_record, _telemetry
    from trt_gemma.bench.workload import synthetic

    target = quantized_random_target(step.preset, step.quant, device, NUM_LAYERS)
    model = target.model
    w = LATENCY
    engine = _engine(model)
    runner.check_fits(engine, synthetic(1, w["input_len"], w["output_len"],
                                        model.config.vocab_size))
    with _telemetry(model, 0.1) as tm:
        res, traces = latency.measure(engine, w["batch_sizes"], w["input_len"], w["output_len"],
                                      w["iterations"], model.config.bos_token_id)
    record = _engine_record(engine)
    plot = plot_dir / f"{step.name}.png"
    report.plot_latency(plot, traces, tm.samples, f"gpu-suite {step.name}")
    del engine, model, target
    _free()
    return {"workload": w, "engine": record, "results": res, "telemetry": tm.summary(),
            "plot": str(plot)}


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--minutes", type=float, default=8.0, help="time budget of the whole suite")
    p.add_argument("--output-dir", default="benchmarks/results",
                   help="where gpu-<device>-<date>.json and its plots go")
    p.add_argument("--presets", default=DEFAULT_PRESETS, help="comma-separated model presets")
    p.add_argument("--quant", default=",".join(QUANT_MODES),
                   help="comma-separated: none, fp8, int4 (int4-awq needs calibration)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (steps, presets, modes, minutes) and run nothing")


def run(args: argparse.Namespace, cuda_available: Callable[[], bool] | None = None) -> int:
    if not args.minutes > 0:
        raise ConfigError(f"--minutes must be > 0, got {args.minutes}")
    presets = parse_list(args.presets, None, "--presets")
    quants = parse_list(args.quant, QUANT_MODES, "--quant")
    import torch

    steps = plan(presets, quants, torch.cuda.device_count() if torch.cuda.is_available() else 1)
    budget_s = args.minutes * 60
    if args.dry_run:
        print(format_plan(steps, budget_s, args.output_dir))
        return 0
    if cuda_available is None:
        cuda_available = torch.cuda.is_available
    if not cuda_available():
        raise ConfigError(NO_CUDA)
    from trt_gemma.bench import report

    name = torch.cuda.get_device_name()
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    stem = f"gpu-{device_slug(name)}-{today}"
    out_dir = Path(args.output_dir)
    plot_dir = out_dir / stem
    runners: dict[str, Runner] = {
        "gpu-tests": run_gpu_tests,
        "cuda-graph": run_cuda_graph_check,
        "kernels": lambda s, left: run_kernels(s, left, plot_dir / "kernels.json"),
        "tensor-parallel": lambda s, left: run_tensor_parallel(
            s, left, plot_dir / "tensor_parallel.json", torch.cuda.device_count()),
        "throughput": lambda s, left: run_throughput(s, left, plot_dir),
        "latency": lambda s, left: run_latency(s, left, plot_dir),
    }
    header = {"suite": "gpu-suite",
              "options": {"minutes": args.minutes, "presets": args.presets, "quant": args.quant,
                          "output_dir": args.output_dir},
              "environment": report.environment(torch.device("cuda"),
                                                {"quant": None, "dtype": "bfloat16"}),
              "presets": presets, "quant_modes": {q: QUANT_NOTES[q] for q in quants},
              "not_run": {"int4-awq": QUANT_NOTES["int4-awq"]},
              "workloads": {"throughput": THROUGHPUT, "latency": LATENCY}}
    path = out_dir / f"{stem}.json"
    out = run_suite(steps, budget_s, runners, path, header)
    print(f"gpu-suite: {len(out['ran'])} steps ran, {len(out['skipped'])} skipped; wrote {path}")
    for s in out["skipped"]:
        print(f"  skipped {s['step']}: {s['why']}")
    return 0
