"""``trt-gemma bench gpu-suite`` on CPU: the plan, the refusal without CUDA, the time budget (a
fake clock and fake step runners), the JSON layout, and the model steps' own code on a 1-layer
model. None of the GPU path itself (real tests, CUDA graphs, kernels) can run here.
"""

from __future__ import annotations

import datetime
import json
import re

import pytest
import torch

from trt_gemma import packed_linear
from trt_gemma.bench import gpu_suite
from trt_gemma.bench.gpu_suite import Step, plan, run_suite
from trt_gemma.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def gpu_suite_cli(*args: str) -> int:
    return main(["bench", "gpu-suite", *args])


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fake_runners(clock: FakeClock, durations: dict[str, float], results: dict | None = None):
    """Runners that take ``durations[step.name]`` seconds of the fake clock (default 1 s)."""
    calls = []

    def runner(step: Step, left: float) -> dict:
        calls.append((step.name, left))
        clock.now += durations.get(step.name, 1.0)
        out = (results or {}).get(step.name, {"value": step.name})
        if isinstance(out, Exception):
            raise out
        return dict(out)

    kinds = ("gpu-tests", "cuda-graph", "kernels", "throughput", "latency")
    return {k: runner for k in kinds}, calls


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out_dir = tmp_path / "results"
    assert gpu_suite_cli("--dry-run", "--minutes", "5", "--presets", "gemma-2b,gemma-3-4b",
                         "--quant", "none,int4", "--output-dir", str(out_dir)) == 0
    text = capsys.readouterr().out
    steps = plan(["gemma-2b", "gemma-3-4b"], ["none", "int4"])
    names = ["gpu-tests", "cuda-graph", "kernels"] + [
        f"{k}-{p}-{q}" for p in ("gemma-2b", "gemma-3-4b") for q in ("none", "int4")
        for k in ("throughput", "latency")]
    assert [s.name for s in steps] == names
    lines = [ln for ln in text.splitlines() if re.match(r"\s*\d+\. ", ln)]
    assert [ln.split()[1] for ln in lines] == names  # in order, one line each
    assert [int(ln.split(".")[0]) for ln in lines] == list(range(1, 12))
    total = 0.0
    for s, ln in zip(steps, lines):
        total += s.estimate_s
        assert f"~{s.estimate_s:6.0f} s" in ln
        assert ("beyond the budget" in ln) == (total > 300)
    assert "11 steps, budget 5.0 min" in text
    assert "int4-awq" in text and "calibration" in text and "group 128" in text
    assert not out_dir.exists()


def test_bigger_models_and_wider_formats_are_estimated_longer():
    est = {s.name: s.estimate_s for s in plan(["gemma-2b", "gemma-2-9b"], ["none", "fp8", "int4"])}
    for kind in ("throughput", "latency"):
        for q in ("none", "fp8", "int4"):
            assert est[f"{kind}-gemma-2-9b-{q}"] > est[f"{kind}-gemma-2b-{q}"]
        assert est[f"{kind}-gemma-2b-none"] > est[f"{kind}-gemma-2b-fp8"] > est[
            f"{kind}-gemma-2b-int4"]


def test_without_cuda_the_real_run_exits_2_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_suite_cli("--output-dir", str(tmp_path / "r")) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        "trt-gemma: error: no CUDA device: gpu-suite measures a GPU; see --dry-run"]
    assert captured.out == ""
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--quant", "none,int4-awq"], "needs calibration"),
    (["--quant", "int8"], "unknown 'int8'"),
    (["--presets", "gemma-5b"], "unknown preset 'gemma-5b'"),
    (["--minutes", "0"], "--minutes must be > 0"),
])
def test_bad_options_are_one_line_errors(args, fragment, capsys):
    assert gpu_suite_cli("--dry-run", *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("trt-gemma: error:") and fragment in err[0]


def test_steps_that_do_not_fit_are_skipped_and_listed(tmp_path):
    steps = [Step("gpu-tests", 10), Step("cuda-graph", 10), Step("kernels", 10),
             Step("throughput", 10, "gemma-2b", "none"), Step("latency", 5, "gemma-2b", "none")]
    clock = FakeClock()
    # gpu-tests overruns its estimate (20 s): the clock, not the estimates, decides what is left
    runners, calls = fake_runners(clock, {"gpu-tests": 20.0, "cuda-graph": 4.0,
                                            "kernels": 10.0})
    path = tmp_path / "suite.json"
    out = run_suite(steps, 35.0, runners, path, {"suite": "gpu-suite"}, clock=clock)
    # before each step: 35, 15, 11 s left; kernels (10) fits in 11, throughput (10) not in 1
    assert calls == [("gpu-tests", 35.0), ("cuda-graph", 15.0), ("kernels", 11.0)]
    assert out["ran"] == ["gpu-tests", "cuda-graph", "kernels"]
    assert [s["step"] for s in out["skipped"]] == ["throughput-gemma-2b-none",
                                                   "latency-gemma-2b-none"]
    first = out["skipped"][0]["why"]
    assert first.startswith("out of time") and "needs ~10 s, 1 s of 35 s left" in first
    assert "stopped" in out["skipped"][1]["why"]
    assert [s["status"] for s in out["steps"]] == ["ok"] * 3 + ["skipped"] * 2
    assert out["elapsed_s"] == 34.0
    assert json.loads(path.read_text()) == out


def test_the_suite_stops_at_the_first_misfit_even_if_later_steps_are_small(tmp_path):
    steps = [Step("kernels", 5), Step("throughput", 50, "gemma-2b", "none"),
             Step("latency", 1, "gemma-2b", "none")]
    clock = FakeClock()
    runners, calls = fake_runners(clock, {})
    out = run_suite(steps, 20.0, runners, tmp_path / "s.json", {}, clock=clock)
    assert [c[0] for c in calls] == ["kernels"]
    assert [s["step"] for s in out["skipped"]] == ["throughput-gemma-2b-none",
                                                   "latency-gemma-2b-none"]


def test_failures_errors_and_runner_skips_are_recorded_and_the_suite_goes_on(tmp_path):
    steps = [Step("gpu-tests", 1), Step("cuda-graph", 1), Step("kernels", 1),
             Step("throughput", 1, "gemma-2b", "fp8")]
    clock = FakeClock()
    results = {"gpu-tests": {"status": "failed", "passed": 3, "failed": 1},
               "cuda-graph": RuntimeError("CUDA error: an illegal memory access"),
               "kernels": {"status": "skipped", "why": "benchmarks/kernels.py not found"}}
    runners, _ = fake_runners(clock, {}, results)
    out = run_suite(steps, 100.0, runners, tmp_path / "s.json", {}, clock=clock)
    by_step = {s["step"]: s for s in out["steps"]}
    assert by_step["gpu-tests"]["status"] == "failed" and by_step["gpu-tests"]["failed"] == 1
    assert by_step["cuda-graph"] == {
        "step": "cuda-graph", "status": "error", "estimate_s": 1, "elapsed_s": 1.0,
        "error": "RuntimeError: CUDA error: an illegal memory access"}
    assert by_step["throughput-gemma-2b-fp8"]["status"] == "ok"
    assert out["ran"] == ["gpu-tests", "cuda-graph", "throughput-gemma-2b-fp8"]
    assert out["skipped"] == [{"step": "kernels", "why": "benchmarks/kernels.py not found"}]


def test_real_run_writes_one_json_named_by_device_and_date(tmp_path, monkeypatch, capsys):
    """Through cli.main with CUDA faked and every step runner replaced: the file name, the
    header (environment, quant notes, what was not run) and one record per planned step."""
    import trt_gemma.bench.report as report

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(report, "environment", lambda device, info: {"device": device.type})
    seen = []

    def fake(kind):
        def runner(step, left, *rest):
            seen.append(step.name)
            return {"kind": kind}
        return runner

    for fn, kind in (("run_gpu_tests", "t"), ("run_cuda_graph_check", "g"),
                     ("run_kernels", "k"), ("run_throughput", "tp"), ("run_latency", "l")):
        monkeypatch.setattr(gpu_suite, fn, fake(kind))
    assert gpu_suite_cli("--presets", "gemma-2b", "--quant", "fp8", "--minutes", "60",
                         "--output-dir", str(tmp_path)) == 0
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    path = tmp_path / f"gpu-nvidia-h200-{today}.json"
    report_json = json.loads(path.read_text())
    names = ["gpu-tests", "cuda-graph", "kernels", "throughput-gemma-2b-fp8",
             "latency-gemma-2b-fp8"]
    assert seen == names
    assert report_json["ran"] == names and report_json["skipped"] == []
    assert [s["name"] for s in report_json["plan"]] == names
    assert [s["kind"] for s in report_json["steps"]] == ["t", "g", "k", "tp", "l"]
    assert report_json["environment"] == {"device": "cuda"}
    assert report_json["budget_s"] == 3600
    assert report_json["options"]["presets"] == "gemma-2b"
    assert set(report_json["quant_modes"]) == {"fp8"} and "per-output-channel" in \
        report_json["quant_modes"]["fp8"]
    assert "calibration" in report_json["not_run"]["int4-awq"]
    assert report_json["workloads"]["throughput"] == gpu_suite.THROUGHPUT
    assert f"wrote {path}" in capsys.readouterr().out


def test_pytest_counts_and_gpu_test_files():
    out = "....s\nFAILED tests/x.py::t\n3 passed, 1 failed, 2 skipped, 1 error in 4.20s\n"
    assert gpu_suite.pytest_counts(out) == {"passed": 3, "failed": 1, "skipped": 2, "errors": 1,
                                            "deselected": 0}
    assert gpu_suite.pytest_counts("no tests ran in 0.01s")["passed"] == 0
    assert gpu_suite._first_diff([5, 6, 7], [5, 6, 8]) == 2
    assert gpu_suite._first_diff([5, 6], [5, 6, 7]) == 2
    files = {p.name for p in gpu_suite.gpu_test_files(gpu_suite.ROOT / "tests")}
    assert "test_kernels_attention.py" in files  # its kernels tests need CUDA
    assert "test_bench_gpu_suite.py" not in files and "test_tokenizer.py" not in files


def test_int4_random_weights_are_rtn_of_the_dense_ones():
    """Same seed, dense vs int4: each row group of 128 holds at most 16 values, each within
    half a step (group range / 15) of the dense weight, bf16 rounding aside."""
    dense = gpu_suite.quantized_random_target("gemma-3-270m", "none", "cpu", 1)
    quant = gpu_suite.quantized_random_target("gemma-3-270m", "int4", "cpu", 1)
    assert quant.info["quant"] == "int4" and quant.info["num_layers"] == 1
    assert quant.info["quantized_kernels"] is False  # CPU: dequantized at load
    w = packed_linear.dense(dense.model.layers[0].o).float()
    q = packed_linear.dense(quant.model.layers[0].o).float()
    assert w.shape == q.shape and not torch.equal(w, q)
    wg, qg = w.view(w.shape[0], -1, 128), q.view(q.shape[0], -1, 128)
    step = (wg.amax(-1) - wg.amin(-1)) / 15
    assert ((qg - wg).abs() <= step[..., None] * 0.5 * 1.02 + 1e-3).all()
    assert max(len(torch.unique(g)) for g in qg.reshape(-1, 128)[:64]) <= 16
    assert torch.equal(packed_linear.dense(dense.model.embed).float(),
                       packed_linear.dense(quant.model.embed).float())


def test_model_steps_on_a_one_layer_model(tmp_path, monkeypatch):
    """The throughput and latency steps' own code (on CPU, 1 layer, tiny workloads) through
    run_suite: token counts as asked, a plot each, the results in the step records."""
    monkeypatch.setattr(gpu_suite, "NUM_LAYERS", 1)
    monkeypatch.setattr(gpu_suite, "THROUGHPUT",
                        {"num_requests": 3, "input_len": 6, "output_len": 4})
    monkeypatch.setattr(gpu_suite, "LATENCY", {"batch_sizes": [2], "input_len": 5,
                                               "output_len": 3, "iterations": 1})
    runners = {"throughput": lambda s, left: gpu_suite.run_throughput(s, left, tmp_path, "cpu"),
               "latency": lambda s, left: gpu_suite.run_latency(s, left, tmp_path, "cpu")}
    steps = [Step("throughput", 1, "gemma-3-270m", "int4"),
             Step("latency", 1, "gemma-3-270m", "fp8")]
    out = run_suite(steps, 600.0, runners, tmp_path / "s.json", {})
    tp, lat = out["steps"]
    assert tp["status"] == lat["status"] == "ok", out["steps"]
    assert tp["results"]["output_tokens_per_request"] == [4, 4, 4]
    assert lat["results"]["2"]["output_tokens"] == 2 * 3
    assert tp["engine"]["greedy_head_max_rows"] == 0
    for rec, name in ((tp, "throughput-gemma-3-270m-int4"), (lat, "latency-gemma-3-270m-fp8")):
        assert rec["plot"] == str(tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_tensor_parallel_step_only_with_two_or_more_gpus():
    """One GPU (or none): no tensor-parallel step; two or more: it runs after the kernels, over
    the sizes the visible GPUs allow (1, 2, 4: the 270M's 4 query heads divide by them)."""
    one = [s.name for s in plan(["gemma-2b"], ["none"], gpus=1)]
    two = [s.name for s in plan(["gemma-2b"], ["none"], gpus=2)]
    assert "tensor-parallel" not in one
    assert two == one[:3] + ["tensor-parallel"] + one[3:]
    assert gpu_suite.tensor_parallel_sizes(1) == [1]
    assert gpu_suite.tensor_parallel_sizes(2) == [1, 2]
    assert gpu_suite.tensor_parallel_sizes(3) == [1, 2]
    assert gpu_suite.tensor_parallel_sizes(8) == [1, 2, 4]
