"""LLMEngine on tiny random Gemma 1/2/3 models: parity with transformers, batch invariance,
preemption, prefix caching, chunked prefill, n > 1, stop conditions, errors, abort, stats."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from runtime_helpers import (
    CharTokenizer,
    drain,
    generate_alone,
    greedy,
    make_engine,
    random_prompts,
    tiny_models,
)

from trt_gemma.errors import RequestError
from trt_gemma.sampling_params import SamplingParams

VARIANTS = ["gemma1-mqa", "gemma2-gqa", "gemma3-gqa"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = {}

    def get(variant):
        if variant not in cache:
            cache[variant] = tiny_models(tmp_path_factory.mktemp(variant), variant)
        return cache[variant]

    return get


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_matches_transformers_generate(tiny, variant):
    hf, model = tiny(variant)
    prompts = random_prompts([4, 11, 23])  # windows are 5-6 tokens: generation runs past them
    engine = make_engine(model)
    outs = drain(engine, {0: [(str(i), p, greedy(20)) for i, p in enumerate(prompts)]})
    for i, prompt in enumerate(prompts):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20,
                          do_sample=False)
        assert outs[str(i)].outputs[0].token_ids == ref[0, len(prompt):].tolist()


@pytest.mark.parametrize("variant", ["gemma2-gqa", "gemma3-gqa"])
def test_batch_invariance_mixed_joining_and_leaving(tiny, variant):
    _, model = tiny(variant)
    prompts = random_prompts([3, 17, 9, 30, 1, 12], seed=1)
    max_tokens = [25, 5, 14, 9, 30, 2]
    alone = [generate_alone(model, p, greedy(m)).outputs[0].token_ids
             for p, m in zip(prompts, max_tokens, strict=True)]
    # Requests join at different steps; some leave early; a small budget chunks the prompts.
    for budget in (8, 64):
        engine = make_engine(model, max_num_batched_tokens=budget, max_num_seqs=4)
        schedule = {}
        for i, (p, m) in enumerate(zip(prompts, max_tokens, strict=True)):
            schedule.setdefault([0, 0, 2, 3, 7, 7][i], []).append((str(i), p, greedy(m)))
        outs = drain(engine, schedule)
        assert [outs[str(i)].outputs[0].token_ids for i in range(6)] == alone


def test_preemption_under_a_tiny_pool_gives_the_same_output(tiny):
    _, model = tiny("gemma3-gqa")
    prompts = random_prompts([10, 14, 7, 12], seed=2)
    requests = [(str(i), p, greedy(24)) for i, p in enumerate(prompts)]
    big = make_engine(model)
    expected = drain(big, {0: requests})
    # 10 blocks of 16 tokens for the full layers: four sequences of ~36 tokens cannot all fit.
    small = make_engine(model, num_kv_blocks=6, max_num_batched_tokens=32, max_num_seqs=4)
    got = drain(small, {0: requests})
    assert small.get_stats().num_preemptions > 0
    for rid, out in expected.items():
        assert got[rid].outputs[0].token_ids == out.outputs[0].token_ids


def test_prefix_cache_hits_are_counted_and_change_nothing(tiny):
    _, model = tiny("gemma3-gqa")
    shared = random_prompts([40], seed=3)[0]
    prompts = [shared + tail for tail in random_prompts([3, 5, 1], seed=4)]
    plain = make_engine(model, enable_prefix_caching=False)
    expected = drain(plain, {0: [("a", prompts[0], greedy(8))],
                             1: [("b", prompts[1], greedy(8)), ("c", prompts[2], greedy(8))]})
    assert plain.get_stats().prefix_cache_hit_tokens == 0
    cached = make_engine(model)
    got = drain(cached, {0: [("a", prompts[0], greedy(8))],
                         1: [("b", prompts[1], greedy(8)), ("c", prompts[2], greedy(8))]})
    stats = cached.get_stats()
    assert stats.prefix_cache_hit_tokens == 2 * 32  # two full 16-token blocks each for b, c
    assert got["b"].num_cached_tokens == 32 and got["a"].num_cached_tokens == 0
    for rid in "abc":
        assert got[rid].outputs[0].token_ids == expected[rid].outputs[0].token_ids
    # A repeated prompt after its request finished hits too.
    again = drain(cached, {0: [("a2", prompts[0], greedy(8))]})
    assert again["a2"].num_cached_tokens == 32
    assert again["a2"].outputs[0].token_ids == expected["a"].outputs[0].token_ids


def test_cpu_batched_decode_matches_the_reference_path(tiny):
    _, model = tiny("gemma2-gqa")
    prompts = random_prompts([5, 19, 2], seed=5)
    requests = [(str(i), p, greedy(12)) for i, p in enumerate(prompts)]
    fast = drain(make_engine(model), {0: requests})
    engine = make_engine(model)
    engine.runner.cpu_fast_path = False  # ops' per-sequence references
    ref = drain(engine, {0: requests})
    assert all(fast[r].outputs[0].token_ids == ref[r].outputs[0].token_ids for r in fast)


def test_n_samples_share_the_prompt_and_copy_on_write(tiny):
    _, model = tiny("gemma3-gqa")
    prompt = random_prompts([21], seed=6)[0]  # ends mid-block: the forked block is copied
    engine = make_engine(model)
    engine.add_request("g", prompt, greedy(6, n=3))
    engine.step()  # prefill + fork: three samples on one set of prompt blocks
    full_pool = engine.block_manager.pools[0]
    assert full_pool.num_blocks - full_pool.num_free == 2
    out = drain(engine)["g"]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    single = generate_alone(model, prompt, greedy(6)).outputs[0].token_ids
    assert all(o.token_ids == single for o in out.outputs)  # greedy: copies stay identical
    seeded = SamplingParams(temperature=1.0, n=3, seed=11, max_tokens=6, ignore_eos=True)
    a = generate_alone(model, prompt, seeded)
    engine = make_engine(model)
    b = drain(engine, {0: [("x", random_prompts([9])[0], greedy(9)), ("s", prompt, seeded)]})
    assert [o.token_ids for o in b["s"].outputs] == [o.token_ids for o in a.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1


def test_finish_reasons_and_token_limits(tiny):
    _, model = tiny("gemma1-mqa")
    prompt = random_prompts([6], seed=7)[0]
    free_run = generate_alone(model, prompt, greedy(12)).outputs[0].token_ids
    stop_at = free_run[4]
    out = generate_alone(model, prompt, greedy(12, stop_token_ids=(stop_at,))).outputs[0]
    first = free_run.index(stop_at)
    assert out.token_ids == free_run[: first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_at)
    out = generate_alone(model, prompt, greedy(12, stop_token_ids=(stop_at,),
                                               min_tokens=first + 1)).outputs[0]
    assert stop_at not in out.token_ids[: first + 1] and len(out.token_ids) > first + 1
    out = generate_alone(model, prompt, greedy(3)).outputs[0]
    assert out.token_ids == free_run[:3] and out.finish_reason == "length"
    # The model's eos stops a request unless ignore_eos.
    eos_run = generate_alone(model, prompt, greedy(12, stop_token_ids=())).outputs[0]
    assert eos_run.token_ids == free_run or eos_run.token_ids[-1] == 1


def test_stop_strings_span_tokens_and_are_never_streamed(tiny):
    _, model = tiny("gemma3-gqa")
    tok = CharTokenizer()
    prompt = random_prompts([8], seed=8)[0]
    engine = make_engine(model, tok)
    full = drain(engine, {0: [("f", prompt, greedy(30))]})["f"].outputs[0]
    text = full.text
    assert text == tok.decode(full.token_ids)
    # A stop string that starts inside one token's text and ends in a later token's.
    cuts = [len(tok.decode(full.token_ids[:i])) for i in range(len(full.token_ids) + 1)]
    start = next(c + 1 for c, nxt in zip(cuts, cuts[1:], strict=False) if nxt - c == 2
                 and c > 4)
    stop = text[start:start + 4]
    first = text.index(stop)
    engine.add_request("s", prompt, greedy(30, stop=("zzzzzzzz", stop)))
    seen = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen.append(out.outputs[0].text)
    assert seen[-1] == text[:first]
    assert all(stop not in s for s in seen)
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:], strict=False))  # only grows
    assert engine.block_manager.all_free()


def test_request_errors(tiny):
    _, model = tiny("gemma1-mqa")
    engine = make_engine(model)
    with pytest.raises(RequestError, match="256"):
        engine.add_request("long", list(range(3, 259)), greedy(4))  # context is 256
    with pytest.raises(RequestError, match="empty"):
        engine.add_request("empty", [], greedy(4))
    with pytest.raises(RequestError, match="0, 512"):
        engine.add_request("oov", [5, 512], greedy(4))
    with pytest.raises(RequestError, match="tokenizer"):
        engine.add_request("text", "hello", greedy(4))
    engine.add_request("dup", [5, 6], greedy(4))
    with pytest.raises(RequestError, match="already"):
        engine.add_request("dup", [5, 6], greedy(4))
    drain(engine)
    # Generation stops at the context: a prompt of 250 gets 6 tokens, not 20.
    out = generate_alone(model, list(range(3, 253)), greedy(20)).outputs[0]
    assert len(out.token_ids) == 6 and out.finish_reason == "length"


def test_abort_frees_blocks_at_once(tiny):
    _, model = tiny("gemma2-gqa")
    engine = make_engine(model)
    for i, p in enumerate(random_prompts([30, 30, 30], seed=9)):
        engine.add_request(str(i), p, greedy(50))
    engine.step()
    engine.step()
    before = engine.block_manager.usage()
    assert engine.abort("1") and not engine.abort("1")
    assert engine.block_manager.usage() < before
    assert engine.get_stats().num_running == 2
    outs = drain(engine)
    assert set(outs) == {"0", "2"}


def test_logprobs_and_stats(tiny):
    _, model = tiny("gemma3-gqa")
    engine = make_engine(model)
    prompt = random_prompts([7], seed=10)[0]
    out = drain(engine, {0: [("l", prompt, greedy(5, logprobs=2))]})["l"].outputs[0]
    assert len(out.logprobs) == 5
    for token, entry in zip(out.token_ids, out.logprobs, strict=True):
        assert entry[token].rank == 1 and len(entry) >= 2  # greedy: the sampled token is top-1
        assert entry[token].logprob <= 0.0
    assert out.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in
                                                       zip(out.token_ids, out.logprobs,
                                                           strict=True)))
    stats = engine.get_stats()
    assert stats.num_prompt_tokens == 7 and stats.num_generation_tokens == 5
    assert stats.num_finished_requests == 1 and stats.kv_cache_usage == 0.0


def test_greedy_head_gives_the_argmax_of_the_full_head(tiny, monkeypatch):
    import trt_gemma.runtime.greedy_head as greedy_head
    from trt_gemma.runtime.greedy_head import GreedyHead, Screen, available

    _, model = tiny("gemma2-gqa")
    assert available(model.lm_head)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(64, model.config.hidden_size, generator=g)
    hidden *= torch.rand(64, 1, generator=g) * 4  # flat and peaked rows
    hidden[:8, :3] *= 30  # outlier channels, as Gemma's final hidden states have
    # Near-ties: rows 16.. moved so that their top two logits differ by far less than the int8
    # pre-pass's error; its own argmax is then often wrong, and only the bound saves the row.
    head = model.lm_head.float()
    top2 = F.linear(hidden[16:], head).topk(2).indices
    d = head[top2[:, 0]] - head[top2[:, 1]]
    gap = torch.randn(48, generator=g) * 1e-4
    hidden[16:] -= ((hidden[16:] * d).sum(1) - gap)[:, None] / d.pow(2).sum(1)[:, None] * d
    hidden[8] = 0  # all logits tie: the lowest id
    monkeypatch.setattr(greedy_head, "CHUNK", 100)  # 6 chunks, one partial
    rows = greedy_head._exact_8bit_rows(*model.lm_head.shape)  # one 8-bit level where exact
    # chunks of 100 rows: candidates by a full-width compare; of 128: by blocks of 64 first
    for dtype, smoothed, chunk in itertools.product((torch.float32, torch.bfloat16),
                                                    [False, True], [100, 128]):
        head, h = model.lm_head.to(dtype), hidden.to(dtype)
        expected = F.linear(h, head).argmax(-1).tolist()
        # sorted chunks, per-chunk bounds and id mapping; smoothing factors (from other rows)
        # and, at 20 and 64 rows, one 8-bit level padded to a probed row count
        factors = greedy_head.smoothing_factors(hidden[:16] * 2, head) if smoothed else None
        screened = GreedyHead(head, Screen.build(head, chunk=chunk, factors=factors,
                                                 one_level_rows=rows if smoothed else ()))
        for n in (5, 20, 64):
            assert screened(h[:n]) == expected[:n]
        with monkeypatch.context() as patch:
            patch.setattr(greedy_head, "_MAX_CANDIDATES", 0)  # every row takes the full head
            assert screened(h) == expected
    # Through the engine: forced on for a small vocabulary, same tokens as the full head.
    prompts = random_prompts([6, 13, 2], seed=11)
    requests = [(str(i), p, greedy(15)) for i, p in enumerate(prompts)]
    on = drain(make_engine(model, greedy_head_max_rows=8), {0: requests})
    off = drain(make_engine(model, greedy_head_max_rows=0), {0: requests})
    assert all(on[r].outputs[0].token_ids == off[r].outputs[0].token_ids for r in on)


@pytest.mark.parametrize("one_level", [False, True])
def test_int8_screen_products_are_exact_as_the_greedy_head_bound_assumes(one_level):
    """FBGEMM's int8 GEMM on the greedy head's input: integer products exact, one fp32 rounding
    of their scaled sum; the pinning row makes its input quantization the identity."""
    from trt_gemma.runtime.greedy_head import Screen, _exact_8bit_rows, screen_rows

    if one_level and 33 not in _exact_8bit_rows(300, 640):
        pytest.skip("FBGEMM saturates 8-bit inputs at 33 rows on this CPU: two levels only")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 640, generator=g) * 0.05
    w[:, :4] *= 40  # outlier columns
    w[7] = 0.01  # a row whose scale is tiny
    screen = Screen.build(w, chunk=128)
    hidden = torch.randn(9, 640, generator=g) * 3
    hidden[0] = torch.linspace(-500, 500, 640)  # extreme rows: levels at their range's ends
    x, _, _, _ = screen_rows(hidden, 33 if one_level else 0)
    assert x.abs().max() <= (128 if one_level else 64) and torch.equal(x, x.round())
    for packed in screen.packed:
        qw, _ = torch.ops.quantized.linear_unpack(packed)
        ints, scale = qw.int_repr().double(), qw.q_per_channel_scales().double()
        out = torch.ops.quantized.linear_dynamic(x, packed, not one_level).double()
        exact = (x.double() @ ints.t()) * scale
        assert ((out - exact).abs() <= exact.abs() * 2.0**-23).all()


def test_greedy_tokens_walks_the_vocabulary_in_chunks(tiny, monkeypatch):
    import trt_gemma.model as model_module
    from trt_gemma.model import GemmaModel

    _, model = tiny("gemma3-gqa")
    monkeypatch.setattr(model_module, "GREEDY_CHUNK", 100)  # 512 tokens: 6 chunks, one partial
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(7, model.config.hidden_size, generator=g) * 3
    for dtype in (torch.float32, torch.bfloat16):
        m = GemmaModel(model.config, model.embed.to(dtype), model.layers, model.final_norm,
                       model.lm_head.to(dtype))
        h = hidden.to(dtype)
        assert m.greedy_tokens(h) == m.compute_logits(h).argmax(-1).tolist()
    # A tie between chunks 0 and 2 goes to the lowest id, as torch.argmax does.
    head = torch.randn(512, model.config.hidden_size, generator=g) * 0.01
    u = torch.zeros(model.config.hidden_size)
    u[0] = 1.0
    head[30] = head[230] = u * 10
    m = GemmaModel(model.config, model.embed, model.layers, model.final_norm, head)
    assert m.greedy_tokens(u[None]) == [30] == m.compute_logits(u[None]).argmax(-1).tolist()
