"""Model math against transformers on tiny random Gemma 1/2/3 checkpoints (fp32, 1e-4 max abs)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hf_tiny import TINY_VARIANTS, save_tiny_checkpoint

from trt_gemma.checkpoint import open_checkpoint
from trt_gemma.kv_cache import ContiguousKVCache
from trt_gemma.model import GemmaModel

TOL = 1e-4


def _ours(tmp_path, variant, dtype=torch.float32, **config_changes):
    hf = save_tiny_checkpoint(variant, tmp_path)
    checkpoint = open_checkpoint(tmp_path)
    config = dataclasses.replace(checkpoint.config, **config_changes)
    return hf, GemmaModel.from_state_dict(config, checkpoint.state_dict(), dtype=dtype)


def _logits(model, ids, chunks=(None,)):
    """Logits of every position, feeding the sequence in chunks through one cache."""
    cache = ContiguousKVCache(model.config, 128, model.dtype)
    bounds = [0, *[c for c in chunks if c is not None], len(ids)]
    parts = [model.compute_logits(cache.forward(model, ids[a:b]))
             for a, b in zip(bounds, bounds[1:])]
    return torch.cat(parts)


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_logits_match_transformers(tmp_path, variant):
    hf, ours = _ours(tmp_path, variant)
    ids = torch.randint(3, 512, (17,), generator=torch.Generator().manual_seed(1))
    ref = hf(ids[None]).logits[0]
    # whole prompt at once, and prefill + chunk + single-token decode steps through the cache
    for chunks in [(None,), (7, 12, 13, 14)]:
        got = _logits(ours, ids, chunks)
        assert (got - ref).abs().max().item() < TOL, (variant, chunks)


@pytest.mark.parametrize("variant", ["gemma2-softcap-small", "gemma3-gqa"])
def test_window_and_softcap_change_the_result(tmp_path, variant):
    """Guard against a test that could not fail: dropping the window or the caps must matter."""
    hf, ours = _ours(tmp_path, variant)
    ids = torch.randint(3, 512, (17,), generator=torch.Generator().manual_seed(2))
    ref = hf(ids[None]).logits[0]
    for change in [dict(sliding_window=10_000),
                   dict(attn_logit_softcapping=None, final_logit_softcapping=None)]:
        cfg = dataclasses.replace(ours.config, **change)
        if cfg == ours.config:
            continue
        ours.config = cfg
        assert (_logits(ours, ids) - ref).abs().max().item() > 1e-3, change


def test_scaled_rope_is_read_from_config(tmp_path):
    _, ours = _ours(tmp_path, "gemma3-scaled-rope")
    assert ours.config.rope_scaling_factor == 8.0
    assert ours.config.rope_theta == 1_000_000.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_stays_close(tmp_path, dtype):
    hf, ours = _ours(tmp_path, "gemma3-gqa", dtype=dtype)
    ids = torch.randint(3, 512, (12,), generator=torch.Generator().manual_seed(3))
    ref = hf(ids[None]).logits[0]
    got = _logits(ours, ids)
    assert got.dtype == torch.float32
    assert (got - ref).abs().max().item() < 0.1


@pytest.mark.parametrize("variant", ["gemma1-mqa", "gemma2-softcap-small", "gemma3-gqa",
                                     "gemma3-scaled-rope"])
def test_model_on_triton_kernels_matches_transformers(tmp_path, variant, monkeypatch):
    """The whole forward through ops.py's Triton path (interpreted on CPU)."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRT_GEMMA_TRITON_ON_CPU", "1")
    hf, ours = _ours(tmp_path, variant)
    ids = torch.randint(3, 512, (11,), generator=torch.Generator().manual_seed(4))
    ref = hf(ids[None]).logits[0]
    got = _logits(ours, ids, chunks=(8, 9))
    assert (got - ref).abs().max().item() < TOL
