"""SynthID-Text: g-values, the watermarked scores and detection against transformers' own
SynthIDTextWatermarkLogitsProcessor (the reference), on random scores and a tiny random Gemma."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
from transformers.generation.logits_process import (  # noqa: E402
    SynthIDTextWatermarkLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from trt_gemma.errors import ConfigError  # noqa: E402
from trt_gemma.responsible.detect import (  # noqa: E402
    context_repetition_mask,
    detect,
    eos_mask,
    weighted_mean_score,
)
from trt_gemma.responsible.synthid import WatermarkConfig, Watermarker  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

KEYS = (654, 400, 836, 123, 340, 443, 597, 160, 57, 2**62 + 12345, -(2**61) - 7)


def _pair(ngram_len=5, history=1024, size=2**16, seed=0, keys=KEYS, skip=False):
    config = WatermarkConfig(keys=keys, ngram_len=ngram_len, sampling_table_size=size,
                             sampling_table_seed=seed, context_history_size=history,
                             skip_first_ngram_calls=skip)
    reference = SynthIDTextWatermarkLogitsProcessor(
        ngram_len=ngram_len, keys=list(keys), sampling_table_size=size, sampling_table_seed=seed,
        context_history_size=history, device="cpu", skip_first_ngram_calls=skip)
    return Watermarker(config), reference


@pytest.mark.parametrize("size,seed", [(2**16, 0), (1000, 7)])  # 2^k (bit mask) and any size
def test_g_values_equal_reference(size, seed):
    ours, ref = _pair(ngram_len=4, size=size, seed=seed)
    assert torch.equal(ours.sampling_table, ref.sampling_table)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 262144, (3, 50), generator=gen)
    assert torch.equal(ours.g_values(ids), ref.compute_g_values(ids))
    # every candidate after a context (the hot path's affine hash) equals the n-gram hash
    state = ours.new_state()
    for t in ids[0, :3].tolist():
        state.advance(t)
    cand = ours.g_values_for_candidates([state.context_hash], 300)
    ngrams = torch.tensor([[*state.context, v] for v in range(300)])[None]
    assert torch.equal(cand, ref.sample_g_values(ref.compute_ngram_keys(ngrams)))


def _run_steps(ours, ref, *, batch, vocab, steps, warp, tokens_from, seed=0):
    """Feed the same scores to both for several steps; return (max |difference| of the sampling
    distributions, number of steps whose scores were bitwise equal)."""
    gen = torch.Generator().manual_seed(seed)
    states = [ours.new_state() for _ in range(batch)]
    input_ids = torch.randint(0, vocab, (batch, 6), generator=gen)  # the prompt: ignored by both
    worst, exact = 0.0, 0
    for step in range(steps):
        scores = torch.randn(batch, vocab, generator=gen) * 3
        scores = warp(input_ids, scores, step)
        expected = ref(input_ids, scores.clone())
        got = ours.apply(scores.clone(), states)
        diff = torch.softmax(expected, -1) - torch.softmax(got, -1)
        worst = max(worst, float(diff.abs().max()))
        exact += bool(torch.equal(expected, got))
        token = tokens_from(expected, gen, step)  # [batch]
        input_ids = torch.cat([input_ids, token[:, None]], dim=1)
        for state, t in zip(states, token.tolist(), strict=True):
            state.advance(t)
    return worst, exact


def _sample(scores, gen, step):
    return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=gen)[:, 0]


def test_apply_equals_reference_dense_bitwise():
    """Unfiltered scores take the dense path: the reference's float ops in its order."""
    ours, ref = _pair(history=1024)
    worst, exact = _run_steps(ours, ref, batch=3, vocab=2000, steps=12,
                              warp=lambda ids, s, step: s, tokens_from=_sample)
    assert worst == 0.0 and exact == 12


def test_apply_equals_reference_with_repeated_contexts_and_small_history():
    """Tokens from a 3-token alphabet repeat contexts often; a history of 4 forgets them."""
    ours, ref = _pair(ngram_len=3, history=4)

    def tokens(scores, gen, step):
        return torch.randint(0, 3, (scores.shape[0],), generator=gen)

    worst, exact = _run_steps(ours, ref, batch=4, vocab=500, steps=40,
                              warp=lambda ids, s, step: s, tokens_from=tokens)
    assert worst == 0.0 and exact == 40


@pytest.mark.parametrize("skip", [False, True])
def test_apply_equals_reference_after_top_k_top_p(skip):
    """Filtered rows take the sparse path (finite entries only): the same distribution up to
    float rounding of a differently ordered sum (log-scores of near-zero probabilities may differ
    more: 1 - g_mass cancels), filtered entries finfo.min in both."""
    ours, ref = _pair(ngram_len=3, history=16, skip=skip)
    temp, top_k, top_p = TemperatureLogitsWarper(0.7), TopKLogitsWarper(40), TopPLogitsWarper(0.9)

    def warp(ids, scores, step):
        scores = temp(ids, scores)
        return top_p(ids, top_k(ids, scores)) if step % 3 else top_k(ids, scores)

    def tokens(scores, gen, step):  # sometimes a tiny alphabet, so contexts repeat too
        if step % 4 == 0:
            return torch.randint(0, 3, (scores.shape[0],), generator=gen)
        return _sample(scores, gen, step)

    worst, _ = _run_steps(ours, ref, batch=3, vocab=4096, steps=24, warp=warp, tokens_from=tokens)
    assert worst < 1e-6


def test_sparse_path_equals_dense_path_on_filtered_rows():
    ours, _ = _pair()
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(4, 262144, generator=gen)
    top = scores.topk(64, dim=-1)
    filtered = torch.full_like(scores, float("-inf")).scatter(1, top.indices, top.values)
    hashes = [11, -5, 2**40, 3]
    sparse = ours._tournament_sparse(filtered, torch.isfinite(filtered), hashes)
    dense = ours._tournament_dense(filtered, hashes)
    assert torch.equal(sparse == torch.finfo(torch.float32).min,
                       dense == torch.finfo(torch.float32).min)
    torch.testing.assert_close(torch.softmax(sparse, -1), torch.softmax(dense, -1),
                               rtol=1e-5, atol=1e-7)


def test_state_fork_is_independent():
    ours, _ = _pair(ngram_len=3, history=8)
    a = ours.new_state()
    for t in (5, 6, 7):
        a.advance(t)
    b = a.fork()
    b.advance(9)
    assert a.context == [6, 7] and b.context == [7, 9]
    c = a.fork()
    c.advance(9)
    assert c.context_hash == b.context_hash and c.is_repeated_context == b.is_repeated_context


def test_states_along_a_draft_verify_like_sequential_sampling():
    """Speculative verification: apply() on the rows of a draft with ``along`` states equals
    applying step by step while advancing one state (the reference's sequential processor)."""
    ours, ref = _pair(ngram_len=3, history=8)
    gen = torch.Generator().manual_seed(4)
    state = ours.new_state()
    for t in (3, 4, 5):
        state.advance(t)
    draft = [7, 8, 7, 8]
    logits = torch.randn(len(draft) + 1, 300, generator=gen)
    rows = ours.apply(logits.clone(), state.along(draft))
    ids = torch.tensor([[0, 3, 4, 5]])
    for k in range(3):  # the reference's calls that sampled 3, 4, 5
        ref(ids[:, :k + 1], torch.zeros(1, 300))
    for k in range(len(draft) + 1):
        expected = ref(torch.tensor([[0, 3, 4, 5, *draft[:k]]]), logits[k:k + 1].clone())
        assert torch.equal(rows[k:k + 1], expected)
    assert state.context == [4, 5]  # unchanged


def test_config_from_json_hides_keys(tmp_path):
    path = tmp_path / "wm.json"
    path.write_text(json.dumps({"keys": [123456789, 987654321], "ngram_len": 5,
                                "context_history_size": 64}))
    config = WatermarkConfig.from_json(path)
    assert config.keys == (123456789, 987654321) and config.context_history_size == 64
    for text in (repr(config), str(config), repr(Watermarker(config))):
        assert "123456789" not in text and "987654321" not in text
    path.write_text(json.dumps({"keys": [123456789], "ngram_len": 0}))
    with pytest.raises(ConfigError, match="ngram_len") as e:
        WatermarkConfig.from_json(path)
    assert "123456789" not in str(e.value)
    path.write_text('{"keys": [123456789, "x"], "ngram_len": 5}')
    with pytest.raises(ConfigError, match="keys") as e:
        WatermarkConfig.from_json(path)
    assert "123456789" not in str(e.value)
    path.write_text('{"keys": [123456789,, ]}')
    with pytest.raises(ConfigError, match="not valid JSON") as e:
        WatermarkConfig.from_json(path)
    assert "123456789" not in str(e.value)


# ---- detection ------------------------------------------------------------------------------


def _reference_weighted_mean(ref, ids, eos_id):
    """The reference's masks and g-values, with synthid-text's weighted_mean_score written out."""
    n = ref.ngram_len
    eos = ref.compute_eos_token_mask(ids, eos_id)[:, n - 1:]
    mask = ref.compute_context_repetition_mask(ids) * eos
    g = ref.compute_g_values(ids).double()
    depth = g.shape[-1]
    w = torch.linspace(10, 1, depth, dtype=torch.float64)
    w *= depth / w.sum()
    g *= w[None, None, :]
    return (g * mask[:, :, None]).sum(dim=(1, 2)) / (depth * mask.sum(dim=1)), mask


@pytest.mark.parametrize("history", [3, 1024])
def test_detection_masks_and_score_equal_reference(history):
    ours, ref = _pair(ngram_len=3, history=history)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 6, (3, 80), generator=gen)  # small alphabet: repeats
    ids[1, 50] = 1  # an eos: masked from there on
    expected, ref_mask = _reference_weighted_mean(ref, ids, eos_id=1)
    mask = context_repetition_mask(ours, ids) & eos_mask(ids, [1])[:, 2:]
    assert torch.equal(mask, ref_mask.bool())
    got = weighted_mean_score(ours.g_values(ids), mask)
    torch.testing.assert_close(got, expected)
    one = detect(ours, ids[1].tolist(), eos_token_ids=[1])
    assert one.num_scored_tokens == int(ref_mask[1].sum())
    assert one.score == pytest.approx(float(expected[1]))


def test_p_value_is_calibrated_on_unwatermarked_tokens():
    """Random token sequences are unwatermarked: p-values roughly uniform, few below 0.05."""
    ours, _ = _pair(keys=KEYS[:6])
    gen = torch.Generator().manual_seed(5)
    p = [detect(ours, torch.randint(0, 262144, (120,), generator=gen).tolist()).p_value
         for _ in range(200)]
    assert sum(x < 0.05 for x in p) <= 25  # 10 expected
    assert 0.35 < sum(p) / len(p) < 0.65


@pytest.fixture(scope="module")
def tiny_hf_gemma():
    from hf_tiny import make_tiny_hf_model

    return make_tiny_hf_model("gemma3-gqa")


def test_transformers_watermarked_text_detected(tiny_hf_gemma):
    """transformers' own generate with its SynthIDTextWatermarkingConfig watermarks; our
    detector scores it high with a tiny p-value, and the same sampling without it not."""
    from transformers import SynthIDTextWatermarkingConfig

    keys = list(KEYS[:8])
    hf_config = SynthIDTextWatermarkingConfig(keys=keys, ngram_len=4)
    ours = Watermarker(WatermarkConfig(keys=tuple(keys), ngram_len=4))
    prompt = torch.tensor([[2, 40, 41, 42, 43]])
    results = {}
    for name, wm in (("on", hf_config), ("off", None)):
        torch.manual_seed(0)
        out = tiny_hf_gemma.generate(prompt, do_sample=True, max_new_tokens=80, min_new_tokens=80,
                                     top_k=0, watermarking_config=wm, pad_token_id=0)
        results[name] = detect(ours, out[0, prompt.shape[1]:].tolist(), eos_token_ids=[1])
    assert results["on"].num_scored_tokens > 50
    assert results["on"].p_value < 1e-6 and results["on"].score > 0.6
    assert results["off"].p_value > 1e-3


def test_our_sampling_loop_watermarks_and_reference_agrees(tiny_hf_gemma):
    """A plain sampling loop with apply() on the tiny model: transformers' processor scores the
    output (its own g-values and masks) as watermarked; apply() matched it at every step."""
    keys = KEYS[:6]
    ours, ref = _pair(ngram_len=3, keys=keys)
    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor([[2, 10, 11]])
    state = ours.new_state()
    generated = []
    with torch.no_grad():
        for _ in range(60):
            logits = tiny_hf_gemma(ids).logits[:, -1, :].float()
            scores = ours.apply(logits, [state])
            torch.testing.assert_close(scores, ref(ids, logits.clone()), rtol=0, atol=0)
            token = int(torch.multinomial(torch.softmax(scores, -1), 1, generator=gen))
            state.advance(token)
            generated.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    out = torch.tensor([generated])
    ref_score, mask = _reference_weighted_mean(ref, out, eos_id=1)
    assert float(ref_score[0]) > 0.6 and int(mask.sum()) > 40


# ---- CLI and endpoint -----------------------------------------------------------------------


def _watermarked_ids(watermarker, allowed: list[int], length: int, seed: int) -> list[int]:
    """Sample `length` tokens from random logits restricted to `allowed` (the rest -inf, so
    apply() takes its sparse path), watermarked by apply()."""
    gen = torch.Generator().manual_seed(seed)
    vocab = max(allowed) + 1
    keep = torch.full((vocab,), float("-inf"))
    keep[allowed] = 0.0
    state, ids = watermarker.new_state(), []
    for _ in range(length):
        logits = (torch.randn(1, vocab, generator=gen) * 2 + keep)
        scores = watermarker.apply(logits, [state])
        token = int(torch.multinomial(torch.softmax(scores, -1), 1, generator=gen))
        state.advance(token)
        ids.append(token)
    return ids


def test_cli_detect(tiny_gemma3_dir, tmp_path, capsys):
    """trt-gemma watermark detect on a watermarked text (a file) and a plain one (an argument)."""
    from trt_gemma.cli import main
    from trt_gemma.tokenizer import GemmaTokenizer

    tokenizer = GemmaTokenizer.from_hf_dir(tiny_gemma3_dir)
    config_path = tmp_path / "wm.json"
    config_path.write_text(json.dumps({"keys": list(KEYS[:6]), "ngram_len": 3}))
    ours = Watermarker(WatermarkConfig.from_json(config_path))
    letters = [tokenizer.token_to_id(c) for c in "abcdefghijklmnopqrstuvwxyz "]
    ids = _watermarked_ids(ours, letters, 150, seed=1)
    text = tokenizer.decode(ids)
    assert tokenizer.encode(text, add_bos=False) == ids
    marked = tmp_path / "marked.txt"
    marked.write_text(text)
    plain = "".join(chr(97 + (i * 7919) % 26) for i in range(150))
    code = main(["watermark", "detect", "--config", str(config_path), "--model",
                 str(tiny_gemma3_dir), "--json", str(marked), plain])
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0]["p_value"] < 1e-6 and lines[0]["num_scored_tokens"] > 100
    assert lines[1]["p_value"] > 1e-3
    assert lines[0] == {"input": str(marked), **detect(ours, ids).to_dict()}


def test_detect_endpoint(tmp_path):
    """POST /v1/watermark/detect behind the API key, through the openai client's low-level post:
    scores equal detect() on the server tokenizer's ids; bad bodies are 400."""
    pytest.importorskip("fastapi")
    import httpx
    import openai
    from server_process import threaded_server
    from test_server_app import VOCAB, FakeEngine, FakeTokenizer

    from trt_gemma.server.app import create_app
    from trt_gemma.server.engine_client import EngineClient
    from trt_gemma.server.responsible import ResponsibleServing

    ours = Watermarker(WatermarkConfig(keys=(*KEYS[:5], KEYS[9]), ngram_len=3))
    letters = [c for c in range(97, 123) if c not in FakeTokenizer.stop_token_ids]  # not 'j'
    marked = _watermarked_ids(ours, letters, 120, seed=2)
    client = EngineClient(FakeEngine(), FakeTokenizer(), max_model_len=256, vocab_size=VOCAB,
                          max_num_seqs=4, max_queue=4)
    app = create_app(client, "fake", api_key="sekret", guard=ResponsibleServing(watermarker=ours))
    with threaded_server(app) as url:
        sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="sekret", max_retries=0, timeout=20)
        r = sdk.post("/watermark/detect", cast_to=httpx.Response,
                     body={"token_ids": [marked, marked[:2]]})
        body = r.json()
        assert body["ngram_len"] == 3 and body["depth"] == 6
        assert '"keys"' not in json.dumps(body) and str(KEYS[9]) not in json.dumps(body)
        first, short = body["data"]
        expected = detect(ours, marked, eos_token_ids=FakeTokenizer.stop_token_ids).to_dict()
        assert first == {"index": 0, **expected} and first["p_value"] < 1e-6
        assert short["num_scored_tokens"] == 0 and short["score"] is None
        text = "the plain text of a person, not watermarked at all, long enough to score"
        r = sdk.post("/watermark/detect", cast_to=httpx.Response, body={"text": text})
        got = r.json()["data"][0]
        plain = detect(ours, FakeTokenizer().encode(text, add_bos=False),
                       eos_token_ids=FakeTokenizer.stop_token_ids)
        assert got["score"] == pytest.approx(plain.score) and got["p_value"] > 1e-3
        for bad, param in (({"text": "a", "token_ids": [1]}, "text"), ({"text": []}, "text"),
                           ({"token_ids": [VOCAB]}, "token_ids"), ({"txt": "a"}, "txt")):
            with pytest.raises(openai.BadRequestError) as e:
                sdk.post("/watermark/detect", cast_to=httpx.Response, body=bad)
            assert e.value.status_code == 400 and e.value.param == param
        assert httpx.post(f"{url}/v1/watermark/detect", json={"text": "a"}).status_code == 401
