"""``trt-gemma bench throughput | latency`` end to end on a tiny checkpoint, through cli.main.

Token counts are checked against the workload that asked for them (fixed lengths, a dataset's
``output_tokens``), the peer's speedups against its own measured figures, the bandwidth
arithmetic against a token-by-token sum, telemetry sampling against a stand-in NVML.
"""

from __future__ import annotations

import json
import sys
import types

import pytest

from trt_gemma.bench import telemetry, throughput
from trt_gemma.bench.workload import BenchRequest
from trt_gemma.cli import main
from trt_gemma.config import PRESETS, GemmaConfig

pytestmark = pytest.mark.usefixtures("one_thread")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bench(*args: str) -> int:
    return main(["bench", *args])


def one_line_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("trt-gemma: error:")
    for fragment in fragments:
        assert fragment in err[0], err[0]
    return err[0]


def assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000


def test_throughput_fixed_lengths_with_transformers_peer(tiny_gemma3_dir, tmp_path):
    out, png = tmp_path / "t.json", tmp_path / "t.png"
    assert bench("throughput", str(tiny_gemma3_dir), "--num-requests", "5", "--input-len", "9",
                 "--output-len", "6", "--peer", "transformers", "--output-json", str(out),
                 "--plot", str(png)) == 0
    report = json.loads(out.read_text())
    res = report["results"]
    assert res["output_tokens"] == 5 * 6 == sum(res["output_tokens_per_request"])
    assert res["output_tokens_per_request"] == [6] * 5
    assert res["input_tokens"] == 5 * 9
    assert res["requests_per_s"] == pytest.approx(5 / res["elapsed_s"])
    assert res["total_tokens_per_s"] == pytest.approx((45 + 30) / res["elapsed_s"])
    lat = res["latency_s"]
    assert 0 < lat["p50"] <= lat["p99"] <= res["elapsed_s"]
    assert 0 < res["peak_kv_cache_usage"] <= 1
    # CPU: bandwidth and telemetry are null, with the reason
    assert res["bandwidth"]["achieved_gbs"] is None and "cpu" in res["bandwidth"]["why"]
    assert report["telemetry"]["power_w"] is None and report["telemetry"]["why"]
    env = report["environment"]
    for key in ("trt_gemma_version", "git_commit", "torch", "triton", "device_name", "cpu",
                "quant", "dtype", "date_utc"):
        assert key in env
    assert env["quant"] == "none" and env["dtype"] == "float32"
    assert set(env["cpu"]["flags"]) >= {"avx512_bf16", "avx2"}
    peer = report["peers"]["transformers"]
    theirs = peer["results"]
    assert theirs["output_tokens"] == 30
    assert theirs["output_tokens_per_s"] == pytest.approx(30 / theirs["elapsed_s"])
    cmp = peer["comparison"]
    for key in ("requests_per_s", "output_tokens_per_s", "total_tokens_per_s"):
        assert cmp[key]["speedup"] == pytest.approx(res[key] / theirs[key])
    assert cmp["latency_p50_s"]["speedup"] == pytest.approx(
        theirs["latency_s"]["p50"] / lat["p50"])
    assert_png(png)


def test_throughput_dataset(tiny_gemma3_dir, tmp_path):
    from tokenizers import Tokenizer

    lines = [{"input_ids": [2, 40, 41, 42], "output_tokens": 3},
             {"prompt": "hello there", "output_tokens": 5, "task_id": 7},
             {"input_ids": [2, 50], "output_tokens": 1}]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    out = tmp_path / "d.json"
    assert bench("throughput", str(tiny_gemma3_dir), "--dataset", str(data), "--rounds", "2",
                 "--output-json", str(out)) == 0
    res = json.loads(out.read_text())["results"]
    rounds = res["rounds"]  # the kept round is the fastest, and the figures are its own
    assert rounds["count"] == 2 and len(rounds["output_tokens_per_s"]) == 2
    assert rounds["output_tokens_per_s"][rounds["kept"]] == max(rounds["output_tokens_per_s"])
    assert res["output_tokens_per_s"] == pytest.approx(max(rounds["output_tokens_per_s"]))
    assert res["output_tokens"] == 3 + 5 + 1
    assert res["output_tokens_per_request"] == [3, 5, 1]
    text = Tokenizer.from_file(str(tiny_gemma3_dir / "tokenizer.json"))
    prompt_len = 1 + len(text.encode("hello there", add_special_tokens=False).ids)  # + BOS
    assert res["input_tokens"] == 4 + prompt_len + 2


@pytest.mark.parametrize("line, why", [
    ("{not json", "not valid JSON"),
    ('{"input_ids": [2, 3]}', "'output_tokens' must be a positive integer"),
    ('{"input_ids": [2, 3], "output_tokens": 0}', "'output_tokens' must be a positive integer"),
    ('{"input_ids": "2 3", "output_tokens": 4}', "'input_ids' must be a non-empty list"),
    ('{"input_ids": [2, 99999], "output_tokens": 4}', "'input_ids' must be in [0, 512)"),
    ('{"text": "hi", "output_tokens": 4}', "needs 'prompt'"),
    ("[1, 2]", "expected a JSON object"),
    ('{"input_ids": [2, 3], "output_tokens": 300}', "2 prompt + 300 output tokens exceed"),
])
def test_malformed_dataset_line(tiny_gemma3_dir, tmp_path, capsys, line, why):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"input_ids": [2, 3], "output_tokens": 2}\n' + line + "\n")
    assert bench("throughput", str(tiny_gemma3_dir), "--dataset", str(data),
                 "--output-json", str(tmp_path / "x.json")) == 2
    one_line_error(capsys, f"{data}:2:", why)
    assert not (tmp_path / "x.json").exists()


def test_unknown_preset_and_option_errors(tmp_path, capsys):
    out = str(tmp_path / "x.json")
    assert bench("throughput", "--random-weights", "--preset", "gemma-9z",
                 "--output-json", out) == 2
    line = one_line_error(capsys, "unknown preset 'gemma-9z'")
    assert all(name in line for name in PRESETS)
    assert bench("throughput", "--random-weights", "--output-json", out) == 2
    one_line_error(capsys, "--preset")
    assert bench("throughput", "--output-json", out) == 2
    one_line_error(capsys, "SOURCE")
    assert bench("throughput", "x", "--peer", "vllm", "--output-json", out) == 2
    one_line_error(capsys, "unknown --peer 'vllm'", "transformers")
    assert bench("throughput", "--random-weights", "--preset", "gemma-2b", "--num-layers", "99",
                 "--output-json", out) == 2
    one_line_error(capsys, "--num-layers must be in [1, 18]")
    assert bench("latency", "x", "--batch-sizes", "1,a") == 2
    one_line_error(capsys, "--batch-sizes")
    assert bench("latency", "x", "--peer", "vllm") == 2
    one_line_error(capsys, "unknown --peer 'vllm'", "llama.cpp", "URL")
    assert bench("throughput", "--random-weights", "--preset", "gemma-2b", "--peer",
                 "transformers", "--output-json", out) == 2  # refused before building anything
    one_line_error(capsys, "--peer transformers needs a checkpoint SOURCE")


def test_latency(tiny_gemma3_dir, tmp_path):
    out, png = tmp_path / "l.json", tmp_path / "l.png"
    assert bench("latency", str(tiny_gemma3_dir), "--batch-sizes", "1,3", "--input-len", "7",
                 "--output-len", "4", "--iterations", "2", "--peer", "transformers",
                 "--output-json", str(out), "--plot", str(png)) == 0
    report = json.loads(out.read_text())
    for b in (1, 3):
        r = report["results"][str(b)]
        assert r["output_tokens"] == b * 4 * 2
        ttft, tok = r["ttft_s"], r["per_token_s"]
        assert 0 < ttft["p50"] <= ttft["p99"] <= ttft["max"]
        assert 0 < tok["p50"] <= tok["p99"] <= tok["max"]
        # a request's latency is its TTFT plus its 3 token gaps
        assert r["request_latency_s"]["mean"] == pytest.approx(ttft["mean"] + 3 * tok["mean"])
        peer = report["peers"]["transformers"][str(b)]
        theirs, cmp = peer["results"], peer["comparison"]
        assert theirs["per_token_s"] == pytest.approx(
            (theirs["request_latency_s"] - theirs["ttft_s"]) / 3)
        assert cmp["ttft_s"]["speedup"] == pytest.approx(theirs["ttft_s"] / ttft["mean"])
        assert cmp["per_token_s"]["speedup"] == pytest.approx(theirs["per_token_s"] / tok["mean"])
    assert report["environment"]["device_name"] == "cpu"
    assert_png(png)


def test_random_weights_preset_with_fewer_layers(tmp_path):
    out = tmp_path / "r.json"
    assert bench("throughput", "--random-weights", "--preset", "gemma-3-270m", "--num-layers",
                 "1", "--dtype", "bfloat16", "--num-requests", "2", "--input-len", "5",
                 "--output-len", "3", "--greedy-head-max-rows", "0",
                 "--output-json", str(out)) == 0
    report = json.loads(out.read_text())
    assert report["engine"]["greedy_head_max_rows"] == 0
    target = report["target"]
    assert target["random_weights"] and target["preset"] == "gemma-3-270m"
    assert target["num_layers"] == 1 and target["layers_truncated"]
    assert target["preset_num_layers"] == 18
    assert report["results"]["output_tokens"] == 6
    cfg = PRESETS["gemma-3-270m"]
    h, layer = cfg.hidden_size, cfg.intermediate_size
    linears = h * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * h + 3 * h * layer
    # bf16 linears and LM head of one layer; norms are small next to them
    expected = 2 * (linears + cfg.vocab_size * h)
    got = report["results"]["bandwidth"]["weight_bytes_per_step"]
    assert expected <= got < expected * 1.001


def test_kv_bytes_read_against_a_token_by_token_sum():
    cfg = GemmaConfig(architecture="gemma3", vocab_size=64, hidden_size=16, intermediate_size=32,
                      num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                      head_dim=8, max_position_embeddings=128, sliding_window=5,
                      layer_types=("sliding_attention", "full_attention", "sliding_attention"))
    requests = [BenchRequest((2,) * 3, 9), BenchRequest((2,) * 11, 4), BenchRequest((2,), 1)]
    expected = 0
    for r in requests:
        for k in range(1, r.output_len):  # decode token k attends over input_len + k tokens
            for layer in range(3):
                window = cfg.layer_window(layer)
                ctx = r.input_len + k
                expected += 2 * cfg.kv_size * 2 * (min(ctx, window) if window else ctx)
    assert throughput.kv_bytes_read(cfg, 2, requests) == expected


class _FakeNvml(types.ModuleType):
    """Stands in for pynvml: fixed readings, so the sampling thread and summary can be checked."""

    NVML_CLOCK_SM, NVML_TEMPERATURE_GPU = 1, 0

    class NVMLError(Exception):
        pass

    def __init__(self):
        super().__init__("pynvml")
        self.power = iter(range(100_000, 10**9, 50_000))  # mW, rising by 50 W a sample

    def nvmlInit(self): pass
    def nvmlShutdown(self): pass
    def nvmlDeviceGetHandleByIndex(self, i): return i
    def nvmlDeviceGetHandleByUUID(self, uuid): return uuid
    def nvmlDeviceGetName(self, h): return b"Fake GPU"
    def nvmlDeviceGetClockInfo(self, h, kind): return 1980
    def nvmlDeviceGetMemoryInfo(self, h): return types.SimpleNamespace(used=3 * 2**30)
    def nvmlDeviceGetPowerUsage(self, h): return next(self.power)
    def nvmlDeviceGetTemperature(self, h, kind): return 55
    def nvmlDeviceGetUtilizationRates(self, h): return types.SimpleNamespace(gpu=90)


def test_telemetry(monkeypatch):
    import time

    with telemetry.Telemetry(None) as tm:
        pass
    s = tm.summary()
    assert s["why"] == "no CUDA device" and all(s[m] is None for m in telemetry.METRICS)
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml())
    with telemetry.Telemetry(0, interval_s=0.01, device_uuid="GPU-1234") as tm:
        time.sleep(0.1)
    s = tm.summary()
    n = s["samples"]
    assert n >= 2 and s["why"] is None and s["device"] == "Fake GPU"
    assert s["sm_clock_mhz"] == {"mean": 1980.0, "max": 1980.0}
    assert s["memory_used_mib"]["max"] == 3 * 1024
    assert s["power_w"]["max"] == 100 + 50 * (n - 1)
    assert s["power_w"]["mean"] == pytest.approx(100 + 25 * (n - 1))


def test_plots_with_telemetry(tmp_path):
    from trt_gemma.bench.report import plot_latency, plot_throughput
    from trt_gemma.bench.runner import Trace

    trace = Trace(elapsed_s=0.3, num_steps=3, token_times={"a": [0.1, 0.2, 0.3], "b": [0.1]},
                  step_end_s=[0.1, 0.2, 0.3], tokens_after_step=[2, 3, 4])
    samples = [{"t": t, "sm_clock_mhz": 1980.0, "memory_used_mib": 1.0, "power_w": 300.0,
                "temperature_c": 50.0, "utilization_pct": 99.0} for t in (0.0, 0.1, 0.2)]
    assert_png(plot_throughput(tmp_path / "t.png", trace, samples, "t"))
    assert_png(plot_latency(tmp_path / "l.png", {"1": [trace]}, samples, "l"))


def test_llama_cpp_peer_on_the_real_gguf(tmp_path):
    """Optional peer: runs where llama-cpp-python is installed (it builds from source)."""
    pytest.importorskip("llama_cpp")
    out = tmp_path / "l.json"
    assert bench("throughput", "gemma3-270m", "--num-requests", "2", "--input-len", "6",
                 "--output-len", "3", "--greedy-head-max-rows", "0", "--peer", "llama.cpp",
                 "--output-json", str(out)) == 0
    report = json.loads(out.read_text())
    ours, peer = report["results"], report["peers"]["llama.cpp"]
    theirs = peer["results"]
    assert theirs["output_tokens"] == 2 * 3 == ours["output_tokens"]
    assert theirs["input_tokens"] == ours["input_tokens"]
    assert peer["comparison"]["output_tokens_per_s"]["speedup"] == pytest.approx(
        ours["output_tokens_per_s"] / theirs["output_tokens_per_s"])


def test_bench_guided_is_a_bench_subcommand(capsys):
    assert bench("guided", "--num-prompts", "0", "--output-json", "unused.json") == 2
    one_line_error(capsys, "--num-prompts must be >= 1")
