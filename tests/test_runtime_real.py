"""LLMEngine on the real Gemma 3 270M (fp32): batch invariance, preemption, prefix cache, stop
strings with the real tokenizer. The model is loaded once per session (conftest's fixture)."""

from __future__ import annotations

import pytest
from runtime_helpers import drain, greedy, make_engine

from trt_gemma.sampling_params import SamplingParams

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea:",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a",
]
MAX_TOKENS = [4, 10, 7, 12]
JOIN_AT = [0, 0, 2, 4]  # steps at which the requests arrive


@pytest.fixture(scope="module")
def real(real_llm_fp32):
    return real_llm_fp32.model, real_llm_fp32.tokenizer


def _engine(real, **config):
    model, tokenizer = real
    config.setdefault("kv_cache_memory", 64 << 20)
    return make_engine(model, tokenizer, **config)


@pytest.fixture(scope="module")
def alone(real):
    """Each prompt's greedy tokens, generated with nothing else in the engine."""
    engine = _engine(real)
    outs = {}
    for i, (p, m) in enumerate(zip(PROMPTS, MAX_TOKENS, strict=True)):
        outs.update(drain(engine, {0: [(str(i), p, greedy(m))]}))
    return {rid: out.outputs[0].token_ids for rid, out in outs.items()}


def test_batch_invariance_on_the_real_model(real, alone):
    engine = _engine(real)
    schedule = {}
    for i, (p, m) in enumerate(zip(PROMPTS, MAX_TOKENS, strict=True)):
        schedule.setdefault(JOIN_AT[i], []).append((str(i), p, greedy(m)))
    outs = drain(engine, schedule)
    assert {rid: o.outputs[0].token_ids for rid, o in outs.items()} == alone


def test_preemption_on_the_real_model(real, alone):
    # 3 blocks of 16 tokens in the full-attention pool: at most ~2 of these sequences fit. The
    # full LM head here (the int8 greedy head elsewhere): the same tokens either way.
    engine = _engine(real, num_kv_blocks=3, max_num_seqs=4, max_num_batched_tokens=64,
                     greedy_head_max_rows=0)
    outs = drain(engine, {0: [(str(i), p, greedy(m))
                              for i, (p, m) in enumerate(zip(PROMPTS, MAX_TOKENS, strict=True))]})
    assert engine.get_stats().num_preemptions > 0
    assert {rid: o.outputs[0].token_ids for rid, o in outs.items()} == alone


def test_prefix_cache_on_the_real_model(real):
    model, tokenizer = real
    system = tokenizer.apply_chat_template([
        {"role": "system", "content": "You are a terse assistant. Answer in one short sentence, "
                                      "without any preamble, and never use lists."},
        {"role": "user", "content": "What is the capital of Italy?"},
    ])
    engine = _engine(real)
    first = drain(engine, {0: [("a", system, greedy(6))]})["a"]
    second = drain(engine, {0: [("b", system, greedy(6))]})["b"]
    assert second.num_cached_tokens >= 16 and first.num_cached_tokens == 0
    assert engine.get_stats().prefix_cache_hit_tokens == second.num_cached_tokens
    assert second.outputs[0].token_ids == first.outputs[0].token_ids


def test_stop_string_with_the_real_tokenizer(real, alone):
    engine = _engine(real)
    full_ids = alone["3"]
    full_text = real[1].decode(full_ids)
    stop = full_text[12:17]  # a piece of text that need not align with token boundaries
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=[stop])
    engine.add_request("s", PROMPTS[3], params)
    texts = []
    while engine.has_unfinished_requests():
        texts += [o.outputs[0].text for o in engine.step()]
    assert texts[-1] == full_text[: full_text.index(stop)]
    assert all(stop not in t and texts[-1].startswith(t) for t in texts)
    assert engine.block_manager.all_free()


def test_llm_generate_batches_on_the_engine(real_llm_fp32, alone):
    from trt_gemma.errors import RequestError

    llm = real_llm_fp32
    params = [greedy(m) for m in MAX_TOKENS]
    outs = llm.generate(PROMPTS, params, use_tqdm=True)
    assert [o.outputs[0].token_ids for o in outs] == [alone[str(i)] for i in range(4)]
    assert [o.prompt for o in outs] == PROMPTS and all(o.finished for o in outs)
    with pytest.raises(RequestError):  # one bad prompt fails the call before anything runs
        llm.generate(["fine", [2] * (llm.engine.max_model_len + 1)], greedy(2))
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.block_manager.all_free()
    pieces = list(llm.stream(PROMPTS[0], greedy(MAX_TOKENS[0])))
    assert "".join(pieces) == outs[0].outputs[0].text
