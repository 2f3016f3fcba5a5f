"""Speculative decoding on the real Gemma 3 270M (fp32): greedy tokens identical with and without
it, for n-gram prompt lookup and a draft model, in a batch, with preemption forced by a small KV
cache (slow), and a cheaper n-gram case in the default suite."""

from __future__ import annotations

import pytest
from runtime_helpers import drain, greedy

from trt_gemma.runtime import EngineConfig, LLMEngine

PASSAGE = ("The lighthouse stood at the edge of the rocky cape, its white tower streaked with "
           "salt. Every night the keeper climbed the spiral stairs, trimmed the wick, and polished "
           "the great lens until it shone.")
GROUNDED = [
    f"Repeat this passage exactly:\n{PASSAGE}\nPassage:",
    f"{PASSAGE}\nQuote the second sentence of the passage above:",
    f"Text: {PASSAGE}\nThe same text, with 'lighthouse' replaced by 'tower':",
]
OPEN = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a",
    "Write a short poem about the sea:",
    "The three primary colours are",
]


@pytest.fixture(scope="module")
def real(real_llm_fp32):
    return real_llm_fp32.model, real_llm_fp32.tokenizer


def _run(real, requests, draft=None, **config):
    model, tokenizer = real
    config.setdefault("kv_cache_memory", 64 << 20)
    engine = LLMEngine(model, tokenizer, EngineConfig(**config), draft=draft)
    outs = drain(engine, {0: requests})
    return {rid: o.outputs[0].token_ids for rid, o in outs.items()}, engine.get_stats()


def test_ngram_greedy_identical_on_the_real_model(real):
    requests = [(f"g{i}", p, greedy(24)) for i, p in enumerate(GROUNDED[:2])]
    requests.append(("o", OPEN[0], greedy(12)))
    expected, _ = _run(real, requests)
    got, stats = _run(real, requests, speculative_method="ngram", num_speculative_tokens=6)
    assert got == expected
    assert stats.spec_num_accepted_tokens > 10  # the passage is copied: drafts accepted


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_many_prompts_with_preemption_on_the_real_model(real, method):
    """Slow (2-6 min on 2 shared cores): 8 prompts at once, the full pool 8 blocks of 16 tokens (the
    longest sequence, ~100 tokens, fits alone; all 8 at once do not)."""
    prompts = GROUNDED + OPEN
    requests = [(str(i), p, greedy(40 if i < 3 else 20)) for i, p in enumerate(prompts)]
    expected, _ = _run(real, requests, max_num_seqs=8)
    config = dict(speculative_method=method, num_speculative_tokens=4, num_kv_blocks=8,
                  max_num_seqs=8, max_num_batched_tokens=64, speculative_disable_by_batch_size=0)
    got, stats = _run(real, requests, draft=real[0] if method == "draft" else None, **config)
    assert stats.num_preemptions > 0
    assert got == expected
    assert stats.spec_num_accepted_tokens > 0
    if method == "draft":  # the target drafting for itself
        assert stats.spec_num_accepted_tokens == stats.spec_num_draft_tokens
