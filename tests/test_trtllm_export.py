"""The TensorRT-LLM backend: the checkpoint we write and the trtllm-build command we form.

TensorRT-LLM cannot be installed here, so what is tested is the exact checkpoint (names, shapes,
dtypes, config fields, scale values) against the native engine built from the same calibration,
the INT4 packing against ModelOpt's documented algorithm, and the command line. A fake
``trtllm-build`` on PATH checks that the command is run when the tools are present.
"""

from __future__ import annotations

import json
import os
import stat
import sys

import pytest
import torch
from safetensors.torch import load_file

from trt_gemma import cli
from trt_gemma.converter import trtllm
from trt_gemma.converter.engine import BuildOptions, build_engine
from trt_gemma.converter.profiles import get_profile, resolve_profile
from trt_gemma.config import PRESETS, QuantConfig
from trt_gemma.engine_dir import read_engine
from trt_gemma.errors import CheckpointError, ConfigError
from trt_gemma.kernels.gemm_w4a16 import unpack_int4

# refine_steps/distill_steps 0: the AWQ search still runs (pre-quant scales are exported); the
# refits only change scale values, which both builds share (80 s -> a few s)
OPTS = dict(kv_cache_dtype="fp8", group_size=64, dtype="bfloat16", calib_tokens=512, calib_rows=128,
            refine_steps=0, distill_steps=0)


pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(src, tmp_path, mode):
    """(native engine weights, TensorRT-LLM config, TensorRT-LLM tensors) built alike."""
    native, export = tmp_path / "native", tmp_path / "export"
    build_engine(src, native, BuildOptions(quant=mode, **OPTS), progress=False, log=lambda m: None)
    build_engine(src, export, BuildOptions(quant=mode, backend="tensorrt-llm", **OPTS),
                 progress=False, log=lambda m: None)
    ckpt = export / trtllm.CHECKPOINT_DIR
    config = json.loads((ckpt / "config.json").read_text())
    return read_engine(native).load_weights(), config, load_file(ckpt / "rank0.safetensors")


def _modelopt_pack(signed: torch.Tensor) -> torch.Tensor:
    """ModelOpt's to_quantized_weight INT4 packing, as documented (signed int8 [out, in])."""
    out_dim, in_dim = signed.shape
    t = signed.T.reshape(in_dim, out_dim // 2, 2)
    return ((t[..., 0] & 0x0F) | (t[..., 1] << 4)).T.contiguous()


def test_int4_packing_matches_modelopt():
    from trt_gemma.quant import quantize_int4_rtn

    w = torch.randn(128, 192, generator=torch.Generator().manual_seed(0))
    q = quantize_int4_rtn(w, 64)
    signed = (unpack_int4(q.qweight).to(torch.int16) - 8).to(torch.int8)
    packed = trtllm.pack_int4_rows(q)
    assert packed.dtype == torch.int8 and packed.shape == (64, 192)
    assert torch.equal(packed, _modelopt_pack(signed))
    assert torch.equal(trtllm.unpack_int4_rows(packed), signed)


@pytest.mark.parametrize(("name", "arch"), [("gemma-7b", "GemmaForCausalLM"),
                                            ("gemma-2-9b", "Gemma2ForCausalLM"),
                                            ("gemma-3-270m", "Gemma3ForCausalLM"),
                                            ("gemma-3-1b", "Gemma3ForCausalLM")])
def test_config_fields(name, arch):
    cfg = PRESETS[name]
    d = trtllm.trtllm_config(cfg, QuantConfig(mode="int4-awq", kv_cache_dtype="fp8"),
                             torch.bfloat16)
    assert d["architecture"] == arch and d["dtype"] == "bfloat16"
    assert d["head_size"] == cfg.head_dim and d["num_key_value_heads"] == cfg.num_key_value_heads
    assert d["hidden_act"] == "gelu" and d["position_embedding_type"] == "rope_gpt_neox"
    assert d["mapping"] == {"world_size": 1, "tp_size": 1, "pp_size": 1}
    assert d["use_parallel_embedding"] is False and d["embedding_sharding_dim"] == 0
    assert d["quantization"] == {"quant_algo": "W4A16_AWQ", "kv_cache_quant_algo": "FP8",
                                 "group_size": 128, "has_zero_point": False,
                                 "pre_quant_scale": True, "exclude_modules": None}
    if arch == "GemmaForCausalLM":
        assert "query_pre_attn_scalar" not in d
    if arch == "Gemma2ForCausalLM":
        assert d["attn_logit_softcapping"] == 50.0 and d["final_logit_softcapping"] == 30.0
        assert d["query_pre_attn_scalar"] == 256
    if arch == "Gemma3ForCausalLM":
        assert d["_sliding_window_pattern"] == 6 and d["rope_local_base_freq"] == 10_000.0
        assert d["sliding_window"] == cfg.sliding_window and d["rotary_base"] == 1e6
        assert d["rotary_scaling"] is None  # 4B+ (scaled) are refused: test_trtllm_conformance
    for mode, algo in (("none", None), ("fp8", "FP8"), ("int4", "W4A16_AWQ")):
        q = trtllm.trtllm_config(cfg, QuantConfig(mode=mode), torch.float16)["quantization"]
        assert q["quant_algo"] == algo and q["kv_cache_quant_algo"] is None


def _expected_names(n_layers: int, extra: tuple[str, ...]) -> set[str]:
    names = {"transformer.vocab_embedding.weight", "transformer.ln_f.weight", "lm_head.weight"}
    for i in range(n_layers):
        p = f"transformer.layers.{i}."
        names |= {p + n + ".weight" for n in (
            "input_layernorm", "post_layernorm", "pre_feedforward_layernorm",
            "post_feedforward_layernorm", "attention.q_layernorm", "attention.k_layernorm")}
        names.add(p + "attention.kv_cache_scaling_factor")
        for lin in ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj"):
            names |= {f"{p}{lin}.{e}" for e in ("weight", *extra)}
    return names


def test_int4_awq_checkpoint(tiny_gemma3_dir, tmp_path):
    native, config, t = _pair(tiny_gemma3_dir, tmp_path, "int4-awq")
    n = config["num_hidden_layers"]
    assert set(t) == _expected_names(n, ("weights_scaling_factor", "prequant_scaling_factor",
                                         "zero"))
    quant = config["quantization"]
    assert quant["quant_algo"] == "W4A16_AWQ" and quant["group_size"] == 64
    assert quant["has_zero_point"] and quant["pre_quant_scale"]
    for i in range(n):
        p, s = f"transformer.layers.{i}.", f"layers.{i}."
        parts = [native[s + f"self_attn.{x}_proj.weight"] for x in "qkv"]
        w = t[p + "attention.qkv.weight"]
        assert w.dtype == torch.int8 and w.shape == (sum(q.out_features for q in parts) // 2, 64)
        codes = torch.cat([unpack_int4(q.qweight).to(torch.int16) - 8 for q in parts])
        assert torch.equal(trtllm.unpack_int4_rows(w).to(torch.int16), codes)
        scales = t[p + "attention.qkv.weights_scaling_factor"]
        assert scales.dtype == torch.bfloat16 and torch.equal(scales,
                                                              torch.cat([q.scales for q in parts]))
        assert torch.equal(t[p + "attention.qkv.prequant_scaling_factor"], parts[0].pre_quant_scale)
        # What TensorRT-LLM's kernel multiplies by, (q - 8) * scale + zero, is our grid.
        zero = t[p + "attention.qkv.zero"]
        assert zero.dtype == torch.bfloat16 and zero.shape == (1, w.shape[0] * 2)  # [in/g, out]
        signed = trtllm.unpack_int4_rows(w).float()
        theirs = signed * scales.float() + zero.T.float()  # one group: scales [out, 1]
        ours = torch.cat([q.dequantize(apply_pre_quant_scale=False) for q in parts])
        assert torch.allclose(theirs, ours, rtol=1e-2, atol=1e-2 * float(ours.abs().max()))
        down = native[s + "mlp.down_proj.weight"]
        assert t[p + "mlp.proj.weights_scaling_factor"].shape == (64, 2)  # [out, in / group]
        # fc is the activated branch (gate_proj), gate the linear one (up_proj).
        up = native[s + "mlp.up_proj.weight"]
        assert torch.equal(trtllm.unpack_int4_rows(t[p + "mlp.gate.weight"]).to(torch.int16),
                           unpack_int4(up.qweight).to(torch.int16) - 8)
        assert torch.equal(t[p + "mlp.proj.prequant_scaling_factor"], down.pre_quant_scale)
        for ours, theirs in (("input_layernorm", "input_layernorm"),
                             ("post_attention_layernorm", "post_layernorm"),
                             ("self_attn.q_norm", "attention.q_layernorm")):
            expected = (native[f"{s}{ours}.weight"].float() + 1).to(torch.bfloat16)
            assert torch.equal(t[f"{p}{theirs}.weight"], expected)
        kv = t[p + "attention.kv_cache_scaling_factor"]
        assert kv.dtype == torch.float32 and kv.shape == (1,)
        assert float(kv) == max(float(native[s + "self_attn.k_scale"]),
                                float(native[s + "self_attn.v_scale"]))
    assert torch.equal(t["lm_head.weight"], native["embed_tokens.weight"])
    assert torch.equal(t["transformer.vocab_embedding.weight"], native["embed_tokens.weight"])


def test_int4_rtn_uses_a_unit_prequant_scale(tiny_gemma3_dir, tmp_path):
    _, config, t = _pair(tiny_gemma3_dir, tmp_path, "int4")
    assert config["quantization"]["quant_algo"] == "W4A16_AWQ"
    assert config["quantization"]["has_zero_point"]
    pqs = t["transformer.layers.0.mlp.fc.prequant_scaling_factor"]
    assert pqs.dtype == torch.bfloat16 and torch.equal(pqs, torch.ones(64, dtype=torch.bfloat16))


def test_fp8_checkpoint(tiny_gemma3_dir, tmp_path):
    native, config, t = _pair(tiny_gemma3_dir, tmp_path, "fp8")
    n = config["num_hidden_layers"]
    assert set(t) == _expected_names(n, ("weights_scaling_factor", "activation_scaling_factor"))
    assert config["quantization"]["quant_algo"] == "FP8"
    for i in range(n):
        p, s = f"transformer.layers.{i}.", f"layers.{i}."
        parts = [native[s + f"self_attn.{x}_proj.weight"] for x in "qkv"]
        w, ws = t[p + "attention.qkv.weight"], t[p + "attention.qkv.weights_scaling_factor"]
        xs = t[p + "attention.qkv.activation_scaling_factor"]
        assert w.dtype == torch.float8_e4m3fn and ws.shape == xs.shape == (1,)
        assert ws.dtype == xs.dtype == torch.float32
        assert float(ws) == max(float(q.weight_scale.max()) for q in parts)  # one per tensor
        assert float(xs) == float(parts[0].input_scale)
        dense = torch.cat([q.dequantize() for q in parts])
        got = w.float() * ws
        assert float((got - dense).norm() / dense.norm()) < 0.05  # a second e4m3 rounding


def test_none_checkpoint_is_dense(tiny_gemma3_dir, tmp_path):
    native, config, t = _pair(tiny_gemma3_dir, tmp_path, "none")
    assert config["quantization"]["quant_algo"] is None
    qkv = torch.cat([native[f"layers.1.self_attn.{x}_proj.weight"] for x in "qkv"])
    assert torch.equal(t["transformer.layers.1.attention.qkv.weight"], qkv)
    assert t["transformer.layers.1.mlp.fc.weight"].dtype == torch.bfloat16


def test_build_command_from_profile():
    limits = resolve_profile(get_profile("l40s"), PRESETS["gemma-3-4b"])
    cmd = trtllm.build_command("ck", "out", limits)
    assert cmd == ["trtllm-build", "--checkpoint_dir", "ck", "--output_dir", "out",
                   "--gemm_plugin", "auto", "--max_batch_size", str(limits.max_batch_size),
                   "--max_input_len", str(limits.max_input_len),
                   "--max_seq_len", str(limits.max_seq_len),
                   "--max_num_tokens", str(limits.max_num_tokens)]
    assert limits.max_seq_len == 16384 and limits.max_num_tokens == 8192


def test_cli_without_tensorrt_llm_prints_the_command(tiny_gemma3_dir, tmp_path, capsys,
                                                     monkeypatch):
    monkeypatch.setattr(trtllm, "trtllm_available", lambda: False)
    out = tmp_path / "e"
    assert cli.main(["build", str(tiny_gemma3_dir), "-o", str(out), "--backend", "tensorrt-llm",
                     "--quant", "int4", "--group-size", "64", "--profile", "h100-80gb",
                     "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "TensorRT-LLM is not installed" in text
    expected = (f"trtllm-build --checkpoint_dir {out / 'trtllm_checkpoint'} --output_dir "
                f"{out / 'trtllm_engine'} --gemm_plugin auto --max_batch_size")
    assert expected in text
    assert (out / "trtllm_checkpoint" / "rank0.safetensors").is_file()
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    meta = json.loads((out / trtllm.EXPORT_JSON).read_text())
    assert meta["trtllm_build_command"].startswith("trtllm-build --checkpoint_dir")
    # tiny Gemma 3: window 6 on local layers, the profile's max_seq_len (the context, 256) else
    assert meta["runtime"]["max_attention_window"] == [6, 6, 256] * 2
    assert (f"python examples/run.py --engine_dir {out / 'trtllm_engine'} --tokenizer_dir "
            f"{out / 'tokenizer'} --max_output_len 256 --max_attention_window_size 6 6 256 "
            "--sink_token_length 0") in text
    assert "KvCacheConfig(max_attention_window=[6, 6, 256], sink_token_length=0)" in text
    assert not (out / "trtllm_engine").exists()


def _fake_trtllm_build(bin_dir, exit_code: int):
    script = bin_dir / "trtllm-build"
    script.write_text(f"""#!{sys.executable}
import sys, pathlib
args = sys.argv[1:]
out = pathlib.Path(args[args.index("--output_dir") + 1])
out.mkdir(parents=True)
(out / "args.txt").write_text(" ".join(args))
print("fake trtllm-build failing" if {exit_code} else "ok", file=sys.stderr)
sys.exit({exit_code})
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_runs_trtllm_build_when_present(tiny_gemma3_dir, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_trtllm_build(bin_dir, 0)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "e"
    result = build_engine(tiny_gemma3_dir, out, BuildOptions(quant="int4", group_size=64,
                                                             backend="tensorrt-llm",
                                                             profile="h100-80gb"),
                          progress=False, log=lambda m: None)
    assert not result.trtllm_built  # no tensorrt_llm module: not "available"
    # With the check forced, the fake builder runs on the checkpoint inside the atomic write.
    weights = read_engine(build_engine(tiny_gemma3_dir, tmp_path / "n", BuildOptions(
        quant="int4", group_size=64), progress=False, log=lambda m: None).output).load_weights()
    cfg = read_engine(tmp_path / "n").config
    target = tmp_path / "run"
    cmd, ran = trtllm.export_and_build(target, config=cfg, quant=QuantConfig(mode="int4",
                                       group_size=64), weights=weights, tokenizer=None,
                                       run_build=True, log=lambda m: None)
    assert ran and cmd[0] == "trtllm-build"
    args = (target / trtllm.ENGINE_DIR / "args.txt").read_text().split()
    # It ran inside the temporary dir that was then renamed to the target.
    assert args[0] == "--checkpoint_dir" and args[1].startswith(f"{target}.tmp-")
    assert args[1].endswith(trtllm.CHECKPOINT_DIR)
    assert args[args.index("--gemm_plugin") + 1] == "auto"
    runtime = json.loads((target / trtllm.ENGINE_DIR / trtllm.RUNTIME_JSON).read_text())
    assert runtime["max_attention_window"] == [6, 6, 256] * 2 and runtime["tp_size"] == 1
    # A failing trtllm-build: a one-line error naming it, nothing at the target.
    _fake_trtllm_build(bin_dir, 3)
    with pytest.raises(CheckpointError, match="trtllm-build failed .exit 3.: fake trtllm-build"):
        trtllm.export_and_build(tmp_path / "fail", config=cfg, quant=QuantConfig(
            mode="int4", group_size=64), weights=weights, tokenizer=None, run_build=True,
            log=lambda m: None)
    assert not (tmp_path / "fail").exists()
    assert not list(tmp_path.glob("fail.tmp-*"))


def test_unsupported_combinations(tiny_gemma3_dir, tmp_path):
    import dataclasses

    with pytest.raises(ConfigError, match="quantize-lm-head"):
        build_engine(tiny_gemma3_dir, tmp_path / "e", BuildOptions(
            quant="int4", quantize_lm_head=True, backend="tensorrt-llm"), progress=False)
    cfg = PRESETS["gemma-3-270m"]
    odd = dataclasses.replace(cfg, layer_types=cfg.layer_types[::-1])
    with pytest.raises(ConfigError, match="one period"):
        trtllm.trtllm_config(odd, QuantConfig(), torch.bfloat16)
