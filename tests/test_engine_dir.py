"""The engine directory (trt_gemma/engine_dir.py): round trip, checksums, atomic writes, errors."""

import json
from pathlib import Path

import pytest
import torch

from trt_gemma.config import GemmaConfig, QuantConfig
from trt_gemma.engine_dir import ENGINE_FORMAT_VERSION, ENGINE_JSON, read_engine, write_engine
from trt_gemma.errors import CheckpointError
from trt_gemma.kernels.gemm_fp8 import Fp8Weight
from trt_gemma.kernels.gemm_w4a16 import Int4Weight
from trt_gemma.quant import quantize_fp8, quantize_int4_awq, quantize_int4_rtn

CONFIG = GemmaConfig(architecture="gemma3", vocab_size=64, hidden_size=32, intermediate_size=64,
                     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                     head_dim=16, max_position_embeddings=128)
QUANT = QuantConfig(mode="int4-awq", group_size=32, kv_cache_dtype="fp8",
                    extra={"calibration_tokens": 512})


def _weights() -> dict:
    g = torch.Generator().manual_seed(0)
    embed = torch.randn(64, 32, generator=g).bfloat16()
    return {
        "embed_tokens.weight": embed,
        "lm_head.weight": embed,  # tied: the same storage twice must still save
        "layers.0.input_layernorm.weight": torch.randn(32, generator=g)[::1],
        "layers.0.self_attn.q_proj.weight": quantize_int4_awq(
            torch.randn(32, 32, generator=g), scales=torch.rand(32, generator=g) + 0.5,
            group_size=32, scale_dtype=torch.bfloat16),
        "layers.0.mlp.down_proj.weight": quantize_int4_rtn(
            torch.randn(32, 64, generator=g), 32, symmetric=False),
        "layers.1.mlp.up_proj.weight": quantize_fp8(torch.randn(64, 32, generator=g),
                                                    input_scale=0.25),
        "layers.1.mlp.gate_proj.weight": quantize_fp8(torch.randn(64, 32, generator=g), False),
        "kv_scales": torch.tensor([0.5, 0.25]),  # a plain fp32 vector (per-layer KV scales)
    }


@pytest.fixture
def tokenizer_dir(tmp_path: Path) -> Path:
    d = tmp_path / "hf"
    d.mkdir()
    (d / "tokenizer.json").write_text('{"model": "fake"}')
    (d / "tokenizer_meta.json").write_text('{"bos_id": 2}')
    (d / "model.safetensors").write_bytes(b"not a tokenizer file")
    return d


def _write(target: Path, tokenizer_dir: Path, **kw):
    args = dict(config=CONFIG, quant=QUANT, tensors=_weights(), tokenizer=tokenizer_dir,
                profile={"name": "h100", "max_num_seqs": 64}, extra={"source": "unit-test"},
                shard_bytes=4096)
    return write_engine(target, **{**args, **kw})


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def _same(a, b) -> bool:
    """Bitwise equality of tensors, or of every tensor and the group size of weight objects."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and _same_tensor(a, b)
    if type(a) is not type(b) or getattr(a, "group_size", None) != getattr(b, "group_size", None):
        return False
    ta, tb = a.tensors(), b.tensors()
    return ta.keys() == tb.keys() and all(_same_tensor(ta[k], tb[k]) for k in ta)


def _one_line_error(excinfo, *fragments: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    for fragment in fragments:
        assert fragment in msg
    return msg


def test_written_engine_equals_engine_read(tmp_path, tokenizer_dir):
    target = tmp_path / "engine"
    written = _write(target, tokenizer_dir)
    engine = read_engine(target)  # verifies every checksum
    assert engine.config == CONFIG and engine.quant == QUANT == written.quant
    assert engine.profile == {"name": "h100", "max_num_seqs": 64}
    assert engine.metadata["extra"] == {"source": "unit-test"}
    assert engine.metadata["format_version"] == ENGINE_FORMAT_VERSION
    assert "torch" in engine.metadata["built_with"]
    assert len(engine.shards) > 1  # 4 KiB shards: the writer streamed several
    files = set(engine.metadata["files"])
    assert files == {*engine.shards, "tokenizer/tokenizer.json", "tokenizer/tokenizer_meta.json"}
    assert (target / "tokenizer" / "tokenizer.json").read_text() == '{"model": "fake"}'
    assert not (target / "tokenizer" / "model.safetensors").exists()

    original, loaded = _weights(), engine.load_weights()
    assert set(loaded) == set(original)
    for name, value in original.items():
        assert _same(value, loaded[name]), name
    assert isinstance(loaded["layers.0.self_attn.q_proj.weight"], Int4Weight)
    assert isinstance(loaded["layers.1.mlp.gate_proj.weight"], Fp8Weight)
    assert loaded["layers.0.mlp.down_proj.weight"].zeros is not None

    stored = dict(engine.iter_tensors())
    for suffix in ("qweight", "scales", "pre_quant_scale"):
        assert f"layers.0.self_attn.q_proj.{suffix}" in stored
    assert "layers.0.mlp.down_proj.zeros" in stored
    assert stored["layers.1.mlp.up_proj.weight"].dtype == torch.float8_e4m3fn
    assert stored["layers.1.mlp.up_proj.input_scale"].shape == ()
    assert stored["layers.1.mlp.gate_proj.weight_scale"].shape == ()
    assert torch.equal(engine.load_tensor("kv_scales"), torch.tensor([0.5, 0.25]))
    assert engine.quantized["layers.0.self_attn.q_proj.weight"] == {"format": "int4",
                                                                   "group_size": 32}


def test_tensors_may_be_a_generator_and_tokenizer_an_object(tmp_path):
    class Tok:
        def save(self, directory):
            Path(directory).mkdir(parents=True)
            (Path(directory) / "tokenizer.json").write_text("{}")

    engine = write_engine(tmp_path / "e", config=CONFIG, quant=QuantConfig(),
                          tensors=((f"t{i}", torch.full((3,), float(i))) for i in range(5)),
                          tokenizer=Tok())
    assert engine.metadata["tokenizer_files"] == ["tokenizer/tokenizer.json"]
    assert [n for n, _ in read_engine(tmp_path / "e").iter_weights()] == [f"t{i}" for i in range(5)]


def test_corrupted_file_is_refused_naming_it(tmp_path, tokenizer_dir):
    engine = _write(tmp_path / "engine", tokenizer_dir)
    shard = engine.path / engine.shards[1]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # same size: only the checksum can tell
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as excinfo:
        read_engine(engine.path)
    _one_line_error(excinfo, str(shard), "sha256 mismatch")
    read_engine(engine.path, verify=False)  # the documented escape hatch


def test_truncated_or_missing_file_is_refused_even_without_verify(tmp_path, tokenizer_dir):
    engine = _write(tmp_path / "engine", tokenizer_dir)
    tok = engine.path / "tokenizer" / "tokenizer.json"
    tok.write_text("{")
    with pytest.raises(CheckpointError) as excinfo:
        read_engine(engine.path, verify=False)
    _one_line_error(excinfo, str(tok), "truncated or modified")
    (engine.path / engine.shards[0]).unlink()
    tok.unlink()
    with pytest.raises(CheckpointError) as excinfo:
        read_engine(engine.path, verify=False)
    _one_line_error(excinfo, engine.shards[0], "missing")


def test_interrupted_write_leaves_nothing_at_the_target(tmp_path, tokenizer_dir):
    def failing():
        yield "a", torch.zeros(2048)
        yield "b", torch.zeros(2048)  # past the 4 KiB shard: one shard is already on disk
        raise RuntimeError("conversion failed")

    target = tmp_path / "engine"
    with pytest.raises(RuntimeError, match="conversion failed"):
        _write(target, tokenizer_dir, tensors=failing())
    assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary left behind

    # With overwrite, a failed rebuild keeps the old engine intact.
    _write(target, tokenizer_dir)
    with pytest.raises(RuntimeError, match="conversion failed"):
        _write(target, tokenizer_dir, tensors=failing(), overwrite=True)
    assert set(read_engine(target).load_weights()) == set(_weights())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine", "hf"]


def test_overwrite_semantics(tmp_path, tokenizer_dir):
    target = tmp_path / "engine"
    _write(target, tokenizer_dir)
    with pytest.raises(CheckpointError) as excinfo:
        _write(target, tokenizer_dir)
    _one_line_error(excinfo, str(target), "already exists")
    _write(target, tokenizer_dir, tensors={"only": torch.ones(4)}, overwrite=True)
    assert list(read_engine(target).load_weights()) == ["only"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine", "hf"]

    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not an engine directory"):
        _write(precious, tokenizer_dir, overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"


def _edit_manifest(path: Path, edit) -> Path:
    manifest = path / ENGINE_JSON
    meta = json.loads(manifest.read_text())
    edit(meta)
    manifest.write_text(json.dumps(meta))
    return manifest


def test_unknown_format_version_is_refused(tmp_path, tokenizer_dir):
    engine = _write(tmp_path / "engine", tokenizer_dir)
    manifest = _edit_manifest(engine.path, lambda m: m.update(format_version=99))
    with pytest.raises(CheckpointError) as excinfo:
        read_engine(engine.path)
    _one_line_error(excinfo, str(manifest), "format version 99")


def test_malformed_or_missing_manifest(tmp_path, tokenizer_dir):
    engine = _write(tmp_path / "engine", tokenizer_dir)
    manifest = engine.path / ENGINE_JSON
    _edit_manifest(engine.path, lambda m: m["config"].update(hidden_size=-1))
    with pytest.raises(CheckpointError) as excinfo:
        read_engine(engine.path)
    _one_line_error(excinfo, str(manifest), "hidden_size")
    manifest.write_text('{"format_version": 1, "config": ')
    with pytest.raises(CheckpointError) as excinfo:
        read_engine(engine.path)
    _one_line_error(excinfo, str(manifest), "malformed JSON")
    manifest.unlink()
    with pytest.raises(CheckpointError) as excinfo:
        read_engine(engine.path)
    _one_line_error(excinfo, str(manifest), "missing")
    with pytest.raises(CheckpointError, match="no such engine directory"):
        read_engine(tmp_path / "nowhere")


def test_manifest_cannot_point_outside_the_engine(tmp_path, tokenizer_dir):
    engine = _write(tmp_path / "engine", tokenizer_dir)
    (tmp_path / "outside").write_text("x")
    _edit_manifest(engine.path, lambda m: m["files"].update(
        {"../outside": {"sha256": "0", "bytes": 1}}))
    with pytest.raises(CheckpointError, match="outside the engine"):
        read_engine(engine.path)


def test_bad_inputs_fail_before_writing(tmp_path, tokenizer_dir):
    target = tmp_path / "engine"
    with pytest.raises(ValueError, match="not JSON"):
        _write(target, tokenizer_dir, profile={"bad": object()})
    with pytest.raises(ValueError, match="given twice"):
        _write(target, tokenizer_dir, tensors=[("x", torch.ones(1)), ("x", torch.ones(1))])
    with pytest.raises(CheckpointError, match="tokenizer file not found"):
        _write(target, tokenizer_dir, tokenizer=[tmp_path / "nope.json"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
