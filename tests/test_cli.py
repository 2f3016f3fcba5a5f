"""The trt-gemma command as a user runs it: output, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hf_tiny import save_tiny_checkpoint


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trt_gemma.cli", *args],
        capture_output=True, text=True, timeout=timeout,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # no traceback
    assert lines[0].startswith("trt-gemma: error:")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_info_on_hf_dir(tmp_path):
    save_tiny_checkpoint("gemma2-gqa", tmp_path)
    result = run_cli("info", str(tmp_path), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["architecture"] == "gemma2"
    assert info["config"]["attn_logit_softcapping"] == 50.0


def test_missing_source():
    assert_one_line_error(run_cli("info", "/no/such/model"), "/no/such/model")


def test_non_gemma_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert_one_line_error(run_cli("info", str(tmp_path)), "llama", "not a Gemma")


def test_truncated_safetensors(tmp_path):
    save_tiny_checkpoint("gemma1-mqa", tmp_path)
    file = tmp_path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:1000])
    assert_one_line_error(run_cli("generate", str(tmp_path), "hi"), "model.safetensors")


def test_truncated_gguf(tmp_path, real_gguf_path):
    bad = tmp_path / "cut.gguf"
    with open(real_gguf_path, "rb") as src:
        bad.write_bytes(src.read(3_000_000))
    assert_one_line_error(run_cli("info", str(bad)), "cut.gguf")


def test_invalid_sampling_option():
    result = run_cli("generate", "gemma3-270m", "hi", "--top-p", "1.5")
    assert_one_line_error(result, "top_p")


@pytest.mark.parametrize("args", [["generate"], ["frobnicate", "x"]])
def test_usage_errors_exit_non_zero(args):
    result = run_cli(*args)
    assert result.returncode == 2
    assert "usage:" in result.stderr


def test_generate_on_the_real_model():
    result = run_cli("generate", "gemma3-270m", "The capital of France is", "--max-tokens", "8",
                     "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The capital of France is")
    assert len(result.stdout) > len("The capital of France is") + 4


def test_prompt_longer_than_context(tmp_path):
    """A tiny model with a 256-token context and a byte-level tokenizer rejects a long prompt."""
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    save_tiny_checkpoint("gemma3-gqa", tmp_path)
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{f"w{i}": 4 + i for i in range(400)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    result = run_cli("generate", str(tmp_path), " ".join(["w1"] * 300), "--max-tokens", "4")
    assert_one_line_error(result, "context")


def test_build_flags_default_to_build_options():
    """The CLI repeats BuildOptions' defaults (it imports the converter only when it runs): the
    two must not drift apart, or `trt-gemma build` and `build_engine()` build different engines."""
    from trt_gemma.converter.engine import BuildOptions
    from trt_gemma.cli import build_parser

    args = build_parser().parse_args(["build", "src", "-o", "out"])
    defaults = BuildOptions()
    for field in ("quant", "kv_cache_dtype", "group_size", "calib_text", "calib_tokens",
                  "refine_steps", "distill_steps", "profile", "dtype", "quantize_lm_head",
                  "backend", "overwrite", "device"):
        assert getattr(args, field) == getattr(defaults, field), field
