"""Safety screening: the classifier's P(Yes) against transformers on a tiny random Gemma, batching
of concurrent calls, and the server's decisions through the official openai client (prompt 400s,
withheld responses, streams that stop at the flag) on a fake engine."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading

import httpx
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("transformers")

import openai  # noqa: E402
from conftest import save_char_tokenizer  # noqa: E402
from server_process import threaded_server  # noqa: E402
from test_server_app import VOCAB, FakeEngine, FakeTokenizer  # noqa: E402

from trt_gemma.errors import ConfigError  # noqa: E402
from trt_gemma.responsible.safety import (  # noqa: E402
    SafetyClassifier,
    SafetyPolicy,
    Screener,
)
from trt_gemma.server.app import create_app  # noqa: E402
from trt_gemma.server.engine_client import EngineClient  # noqa: E402
from trt_gemma.server.responsible import ResponsibleServing  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = "fake-gemma"
POLICY = SafetyPolicy('* "No Rudeness": be nice.', '* "No Rudeness": the chatbot is nice.')


@pytest.fixture(scope="module")
def tiny_classifier_dir(tmp_path_factory):
    """A tiny random Gemma 3 with a character tokenizer that also knows the words Yes and No."""
    from hf_tiny import save_tiny_checkpoint
    from tokenizers import Tokenizer

    directory = tmp_path_factory.mktemp("tiny-shield")
    save_tiny_checkpoint("gemma3-gqa", directory)
    save_char_tokenizer(directory)
    backend = Tokenizer.from_file(str(directory / "tokenizer.json"))
    backend.add_tokens(["Yes", "No"])
    backend.save(str(directory / "tokenizer.json"))
    return directory


@pytest.fixture(scope="module")
def tiny_classifier(tiny_classifier_dir):
    from trt_gemma.loader import load_model

    model, tokenizer = load_model(str(tiny_classifier_dir), dtype="float32")
    return SafetyClassifier(model, tokenizer)


@pytest.fixture(scope="module")
def hf_p_yes(tiny_classifier_dir, tiny_classifier):
    """P(Yes) of one classification text by transformers' own model on the same token ids."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_classifier_dir, dtype=torch.float32).eval()
    hf.config._attn_implementation = "eager"

    def p_yes(text: str) -> float:
        ids = torch.tensor([tiny_classifier.encode(text)])
        with torch.no_grad():
            logits = hf(ids).logits[0, -1]
        pair = logits[[tiny_classifier.yes_id, tiny_classifier.no_id]]
        return float(torch.softmax(pair, dim=0)[0])

    return p_yes


def test_p_yes_batched_equals_transformers(tiny_classifier, hf_p_yes):
    """Three prompts of different lengths in one packed forward (sliding-window layers
    included): each P(Yes) equals transformers' softmax over the Yes/No logits."""
    texts = [POLICY.prompt_text("hi"), POLICY.prompt_text("you are awful, go away now"),
             POLICY.response_text("hello?", "a rude reply")]
    got = tiny_classifier.p_yes(texts)
    expected = [hf_p_yes(t) for t in texts]
    assert got == pytest.approx(expected, abs=2e-5)
    assert len({round(p, 4) for p in got}) == 3  # the prompts really differ


def test_policy_file(tmp_path):
    path = tmp_path / "policy.txt"
    path.write_text('* "No Spoilers": never reveal endings.\n')
    policy = SafetyPolicy.from_file(path)
    assert '"No Spoilers"' in policy.prompt_text("x") and '"No Spoilers"' in policy.response_text(
        "x", "y")
    path.write_text(json.dumps({"prompt": "P-policy", "response": "R-policy"}))
    policy = SafetyPolicy.from_file(path)
    assert "P-policy" in policy.prompt_text("x") and "R-policy" in policy.response_text("x", "y")
    path.write_text(json.dumps({"prompt": "only one"}))
    with pytest.raises(ConfigError, match="'prompt' and 'response'"):
        SafetyPolicy.from_file(path)
    with pytest.raises(ConfigError, match="threshold"):
        Screener(None, threshold=1.5)


class CountingClassifier:
    """Wraps a classifier, recording the batch size of each forward."""

    def __init__(self, inner, delay_s: float = 0.0):
        self.inner, self.delay_s, self.batches = inner, delay_s, []
        self.started = threading.Event()

    def p_yes(self, texts):
        self.started.set()
        self.batches.append(len(texts))
        if self.delay_s:
            threading.Event().wait(self.delay_s)
        return self.inner.p_yes(texts)


def test_concurrent_screening_calls_share_forwards(tiny_classifier):
    counting = CountingClassifier(tiny_classifier, delay_s=0.3)
    latencies = []
    screener = Screener(counting, POLICY, threshold=0.5, on_latency=latencies.append)

    async def main():
        first = asyncio.create_task(screener.screen_prompts(["first"]))
        await asyncio.to_thread(counting.started.wait, 10)  # the worker is busy with "first"
        rest = [screener.screen_prompts([f"prompt {k}"]) for k in range(5)]
        return [await first, *await asyncio.gather(*rest)]

    try:
        verdicts = asyncio.run(main())
    finally:
        screener.close()
    assert counting.batches == [1, 5]  # the five that queued behind the first: one forward
    direct = tiny_classifier.p_yes([POLICY.prompt_text(t) for t in
                                    ["first", *(f"prompt {k}" for k in range(5))]])
    assert [v[0].p_yes for v in verdicts] == pytest.approx(direct, abs=1e-6)
    assert [v[0].flagged for v in verdicts] == [p > 0.5 for p in direct]
    assert len(latencies) == 6


# ---- the server ------------------------------------------------------------------------------


class MarkerClassifier:
    """Stand-in classifier for the server's streaming logic: P(Yes) 0.9 when the classified
    response contains the marker, else 0.1. Records every text it classified."""

    def __init__(self, marker: str):
        self.marker, self.seen = marker, []

    def p_yes(self, texts):
        self.seen.extend(texts)
        return [0.9 if f"Chatbot Response: {self.marker}" in t or self._in_response(t) else 0.1
                for t in texts]

    def _in_response(self, text: str) -> bool:
        if "Chatbot Response:" not in text:
            return False
        response = text.split("Chatbot Response:", 1)[1].split("<end_of_turn>", 1)[0]
        return self.marker in response


@contextlib.contextmanager
def serve(guard: ResponsibleServing, engine: FakeEngine | None = None, **app_kwargs):
    engine = engine or FakeEngine()
    client = EngineClient(engine, FakeTokenizer(), max_model_len=256, vocab_size=VOCAB,
                          max_num_seqs=8, max_queue=8)
    with threaded_server(create_app(client, MODEL, guard=guard, **app_kwargs)) as url:
        yield url, engine


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=20)


def test_prompt_flags_follow_direct_p_yes(tiny_classifier):
    """A threshold between two prompts' P(Yes) (computed directly): the higher one is refused
    with 400 content_filter before reaching the engine, the lower one is served."""
    prompts = ["tell me a story", "you are awful, go away now"]
    p = tiny_classifier.p_yes([POLICY.prompt_text(t) for t in prompts])
    low, high = sorted(range(2), key=lambda k: p[k])
    assert p[high] > p[low]
    threshold = (p[low] + p[high]) / 2
    screener = Screener(tiny_classifier, POLICY, threshold=threshold)
    guard = ResponsibleServing(screener=screener, screen="prompts")
    with serve(guard) as (url, engine):
        client = sdk(url)
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=[
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": prompts[high]}])
        assert e.value.code == "content_filter" and e.value.param == "messages"
        assert engine.generated == 0  # never reached generation
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt=prompts[high], max_tokens=4)
        assert e.value.code == "content_filter" and engine.generated == 0
        ok = client.completions.create(model=MODEL, prompt=prompts[low], max_tokens=4)
        assert ok.choices[0].text == "hell" and ok.choices[0].finish_reason == "length"
        metrics = httpx.get(f"{url}/metrics").text
        assert 'trt_gemma_safety_flagged_total{kind="prompt",model_name="fake-gemma"} 2.0' \
            in metrics
        assert "trt_gemma_safety_screening_seconds_count" in metrics


@pytest.mark.parametrize("threshold,flagged", [(0.0, True), (1.0, False)])
def test_thresholds_zero_and_one(tiny_classifier, threshold, flagged):
    guard = ResponsibleServing(screener=Screener(tiny_classifier, POLICY, threshold=threshold))
    with serve(guard) as (url, engine):
        if flagged:
            with pytest.raises(openai.BadRequestError, match="content filter"):
                sdk(url).completions.create(model=MODEL, prompt="hi", max_tokens=3)
            assert engine.generated == 0
        else:
            r = sdk(url).completions.create(model=MODEL, prompt="hi", max_tokens=3)
            assert r.choices[0].text == "hel" and r.choices[0].finish_reason == "length"


def test_flagged_response_is_withheld_non_streaming():
    """"hello world": a response containing "o w" is flagged; the non-streaming choice comes
    back empty with finish_reason content_filter; a clean one is untouched."""
    classifier = MarkerClassifier("o w")
    guard = ResponsibleServing(screener=Screener(classifier, POLICY), screen="responses")
    with serve(guard) as (url, _):
        client = sdk(url)
        r = client.chat.completions.create(model=MODEL, messages=[
            {"role": "user", "content": "greet me"}], logprobs=True, top_logprobs=1)
        choice = r.choices[0]
        assert choice.finish_reason == "content_filter"
        assert choice.message.content == "" and not (choice.logprobs and choice.logprobs.content)
        # the classifier saw the whole reply once, after it ended
        assert sum("Chatbot Response: hello world" in t for t in classifier.seen) == 1
        r = client.completions.create(model=MODEL, prompt="x", max_tokens=4)  # "hell": clean
        assert r.choices[0].text == "hell" and r.choices[0].finish_reason == "length"


def test_streaming_stops_at_the_flag():
    """Screened every 4 tokens: "hell" passes and is sent; "hello wo" is flagged, so no more
    text, a last chunk with finish_reason content_filter, and the engine request is aborted."""
    classifier = MarkerClassifier("o w")
    guard = ResponsibleServing(screener=Screener(classifier, POLICY), screen="responses",
                               stream_screen_tokens=4)
    engine = FakeEngine(step_s=0.01)
    with serve(guard, engine) as (url, _):
        for api in ("chat", "completions"):
            if api == "chat":
                stream = sdk(url).chat.completions.create(model=MODEL, stream=True, messages=[
                    {"role": "user", "content": "greet me"}])
                parts = [(c.choices[0].delta.content, c.choices[0].finish_reason)
                         for c in stream if c.choices]
            else:
                stream = sdk(url).completions.create(model=MODEL, prompt="x", stream=True,
                                                     max_tokens=30)
                parts = [(c.choices[0].text, c.choices[0].finish_reason) for c in stream]
            text = "".join(t or "" for t, _ in parts)
            assert text == "hell", parts
            assert parts[-1][1] == "content_filter"
            assert [f for _, f in parts[:-1]] == [None] * (len(parts) - 1)
        assert len(set(engine.aborted)) == 2  # both flagged requests stopped in the engine


def test_self_mode_uses_the_served_model(tiny_classifier):
    """--safety-model self screens with the served engine's own model and tokenizer."""
    from types import SimpleNamespace

    from trt_gemma.server.responsible import build_guard

    client = SimpleNamespace(engine=SimpleNamespace(engine=SimpleNamespace(
        model=tiny_classifier.model)), tokenizer=tiny_classifier.tokenizer)
    args = SimpleNamespace(watermark_config=None, safety_model="self", safety_policy=None,
                           safety_threshold=0.3, screen="both", safety_stream_tokens=16)
    guard = build_guard(args, client)
    assert guard.screener.classifier.model is tiny_classifier.model
    assert guard.screens_prompts and guard.screens_responses
    bare = SimpleNamespace(engine=object(), tokenizer=tiny_classifier.tokenizer)
    with pytest.raises(ConfigError, match="self"):
        build_guard(args, bare)


# ---- the real model, `trt-gemma serve` --------------------------------------------------------


@pytest.mark.slow
def test_serve_real_model_screens_with_itself_and_detects(tmp_path, real_llm_fp32):
    """Slow (a server process on the real 270M, ~1-2 min): `trt-gemma serve gemma3-270m
    --safety-model self --watermark-config FILE`. A threshold just under the prompt's directly
    computed P(Yes) flags it (400 content_filter); one just above serves it; detection answers
    behind the API key with the scores detect() gives on the same tokens."""
    from server_process import running_server

    from trt_gemma.responsible.detect import detect
    from trt_gemma.responsible.synthid import WatermarkConfig, Watermarker

    question = "How do I bake bread?"
    classifier = SafetyClassifier(real_llm_fp32.engine.model, real_llm_fp32.tokenizer)
    p = classifier.p_yes([SafetyPolicy.default().prompt_text(question)])[0]
    config = tmp_path / "wm.json"
    config.write_text(json.dumps({"keys": [5, 6, 7, 8], "ngram_len": 3}))
    for threshold, flagged in ((p - 1e-3, True), (p + 1e-3, False)):
        args = ["--api-key", "k", "--safety-model", "self", "--screen", "prompts",
                "--safety-threshold", str(threshold), "--watermark-config", str(config),
                "--max-num-seqs", "2"]
        with running_server("gemma3-270m", args, tmp_path / "serve.log", threads=2,
                            startup_timeout_s=300) as (url, _):
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0,
                                   timeout=120)
            messages = [{"role": "user", "content": question}]
            if flagged:
                with pytest.raises(openai.BadRequestError) as e:
                    client.chat.completions.create(model="gemma3-270m", messages=messages,
                                                   max_tokens=4)
                assert e.value.code == "content_filter"
                continue
            r = client.chat.completions.create(model="gemma3-270m", messages=messages,
                                               max_tokens=4)
            assert r.choices[0].finish_reason == "length"
            text = "Bread needs flour, water, salt and time to rise before baking."
            got = client.post("/watermark/detect", cast_to=httpx.Response,
                              body={"text": text}).json()["data"][0]
            ids = real_llm_fp32.tokenizer.encode(text, add_bos=False)
            expected = detect(Watermarker(WatermarkConfig.from_json(config)), ids,
                              eos_token_ids=real_llm_fp32.tokenizer.stop_token_ids)
            assert got["num_scored_tokens"] == expected.num_scored_tokens
            assert got["score"] == pytest.approx(expected.score)
