"""Checkpoint readers: canonical names, formats, dtypes, and clear errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch
from hf_tiny import make_tiny_hf_model, save_tiny_checkpoint

from trt_gemma.checkpoint import expected_tensor_shapes, open_checkpoint
from trt_gemma.config import PRESETS, GemmaConfig
from trt_gemma.errors import CheckpointError, ConfigError


def _hf_canonical(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in model.state_dict().items():
        name = name.removeprefix("model.")
        if model.config.model_type == "gemma":
            name = name.replace("post_attention_layernorm", "pre_feedforward_layernorm")
        out[name] = t
    if model.config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


@pytest.mark.parametrize("variant", ["gemma1-mqa", "gemma2-gqa", "gemma3-gqa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_hf_dir_reads_every_tensor(tmp_path, variant, dtype):
    model = save_tiny_checkpoint(variant, tmp_path, dtype=dtype)
    checkpoint = open_checkpoint(tmp_path)
    got = checkpoint.state_dict()
    want = _hf_canonical(model)
    assert set(got) == set(want) == set(expected_tensor_shapes(checkpoint.config))
    for name, tensor in want.items():
        assert got[name].dtype == dtype
        assert torch.equal(got[name], tensor), name


def test_sharded_hf_dir(tmp_path):
    model = make_tiny_hf_model("gemma2-gqa")
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    got = open_checkpoint(tmp_path).state_dict()
    for name, tensor in _hf_canonical(model).items():
        assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize("variant", ["gemma1-mha", "gemma2-gqa", "gemma3-scaled-rope"])
def test_config_from_hf_matches_hf_fields(variant):
    hf = make_tiny_hf_model(variant).config
    cfg = GemmaConfig.from_hf_config(hf.to_dict())
    assert cfg.num_key_value_heads == hf.num_key_value_heads
    assert cfg.head_dim == hf.head_dim
    assert cfg.sliding_window == getattr(hf, "sliding_window", None)
    assert cfg.attn_logit_softcapping == getattr(hf, "attn_logit_softcapping", None)
    if hasattr(hf, "layer_types"):
        assert list(cfg.layer_types) == list(hf.layer_types)


def test_presets_have_the_released_sizes():
    billions = {name: cfg.num_parameters() / 1e9 for name, cfg in PRESETS.items()}
    assert 2.4 < billions["gemma-2b"] < 2.6
    assert 8.4 < billions["gemma-7b"] < 8.6
    assert 9.1 < billions["gemma-2-9b"] < 9.3
    assert 0.26 < billions["gemma-3-270m"] < 0.28
    assert 26.5 < billions["gemma-3-27b"] < 27.5
    assert PRESETS["gemma-3-4b"].rope_scaling_factor == 8.0
    assert PRESETS["gemma-3-1b"].rope_scaling_factor == 1.0


# Bad input ------------------------------------------------------------------------------------

def test_missing_path():
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint("/nonexistent/model")


def test_non_gemma_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10}))
    with pytest.raises(ConfigError, match="llama.*not a Gemma"):
        open_checkpoint(tmp_path)


def test_config_missing_field(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma2"}))
    with pytest.raises(ConfigError, match="missing field"):
        open_checkpoint(tmp_path)


def test_truncated_safetensors(tmp_path):
    save_tiny_checkpoint("gemma1-mqa", tmp_path)
    file = tmp_path / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: truncated"):
        open_checkpoint(tmp_path)


def test_pickle_files_are_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="never loaded"):
        open_checkpoint(tmp_path / "pytorch_model.bin")


def test_wrong_tensor_shape(tmp_path):
    from safetensors.torch import load_file, save_file

    save_tiny_checkpoint("gemma1-mqa", tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    tensors["model.norm.weight"] = torch.zeros(3)
    save_file(tensors, file)
    with pytest.raises(CheckpointError, match=r"norm.weight has shape \(3,\), expected \(64,\)"):
        open_checkpoint(tmp_path).state_dict()


def test_truncated_gguf(tmp_path, real_gguf_path):
    bad = tmp_path / "cut.gguf"
    with open(real_gguf_path, "rb") as src:
        bad.write_bytes(src.read(5_000_000))
    with pytest.raises(CheckpointError, match="cut.gguf"):
        open_checkpoint(bad).state_dict()


def test_gguf_config_of_the_real_model(real_gguf_path):
    cfg = open_checkpoint(real_gguf_path).config
    expected = PRESETS["gemma-3-270m"]
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "head_dim", "sliding_window", "layer_types", "rope_theta",
                  "rope_local_base_freq", "query_pre_attn_scalar", "vocab_size"):
        assert getattr(cfg, field) == getattr(expected, field), field
