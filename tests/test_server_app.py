"""The HTTP layer against a fake engine (no model, seconds): shapes, errors, auth, limits, aborts.

The app runs in a real uvicorn on a loopback port in a thread, so disconnects, SSE framing and
status codes are the real thing; only the engine is a stand-in with the AsyncLLMEngine surface.
The real model end to end is in test_server_e2e.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from server_process import threaded_server  # noqa: E402
import openai  # noqa: E402

from trt_gemma.outputs import CompletionOutput, Logprob, RequestOutput  # noqa: E402
from trt_gemma.runtime import EngineStats  # noqa: E402
from trt_gemma.server.app import create_app  # noqa: E402
from trt_gemma.server.engine_client import EngineClient  # noqa: E402
from trt_gemma.tokenizer import render_chat  # noqa: E402

MODEL = "fake-gemma"
EOT = 106  # <end_of_turn> in Gemma 3
VOCAB = 262144


class FakeTokenizer:
    """One token per character (plus BOS 2), so texts and token counts are easy to predict."""

    bos_id, stop_token_ids, byte_ids = 2, frozenset({1, EOT}), frozenset()

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        return [self.bos_id, *(ord(c) for c in text)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if i >= 32 or not skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        return render_chat(messages, add_generation_prompt)


class FakeEngine:
    """Replies REPLY (rotated by seed) a character per step, then <end_of_turn>."""

    REPLY = "hello world"

    def __init__(self, step_s: float = 0.0):
        self.step_s = step_s
        self.running: dict[str, int] = {}
        self.aborted: list[str] = []
        self.alive = True
        self.generated = 0

    async def generate(self, ids, params, request_id):
        if ids[-1] == ord("!"):  # a prompt ending in '!' plays an engine bug
            raise RuntimeError("boom")
        self.running[request_id] = params.n
        self.last_params = params
        try:
            reply = self.REPLY
            if params.seed is not None:
                k = params.seed % len(reply)
                reply = reply[k:] + reply[:k]
            outs = [CompletionOutput(i, "", [], logprobs=[] if params.logprobs is not None
                                     else None) for i in range(params.n)]
            for step in range(params.max_tokens):
                await asyncio.sleep(self.step_s)
                done = step == len(reply) and not params.ignore_eos
                token = EOT if done else ord(reply[step % len(reply)])
                for out in outs:
                    out.token_ids = [*out.token_ids, token]
                    self.generated += 1
                    if out.logprobs is not None:
                        alt = ord("?")
                        out.logprobs = [*out.logprobs, {token: Logprob(token, -0.5, 1, chr(token)),
                                                        alt: Logprob(alt, -1.5, 2, "?")}]
                    if done:
                        out.finish_reason, out.stop_reason = "stop", EOT
                    else:
                        out.text += chr(token)
                        if step + 1 == params.max_tokens:
                            out.finish_reason = "length"
                finished = outs[0].finish_reason is not None
                yield RequestOutput(request_id, None, list(ids),
                                    [CompletionOutput(**vars(o)) for o in outs], finished)
                if finished:
                    return
        finally:
            self.running.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.running.pop(request_id, None)

    def is_alive(self) -> bool:
        return self.alive

    def get_stats(self) -> EngineStats:
        running = sum(self.running.values())
        return EngineStats(running, 0, min(1.0, running / 8), 0, 0, 0, 0, self.generated, 0, (8,))

    async def shutdown(self) -> None:
        self.alive = False


@contextlib.contextmanager
def serve(engine: FakeEngine, max_num_seqs: int = 8, max_queue: int = 8, **app_kwargs):
    client = EngineClient(engine, FakeTokenizer(), max_model_len=256, vocab_size=VOCAB,
                          max_num_seqs=max_num_seqs, max_queue=max_queue)
    with threaded_server(create_app(client, MODEL, **app_kwargs)) as url:
        yield url, client


@pytest.fixture(scope="module")
def fast():
    engine = FakeEngine()
    with serve(engine) as (url, _):
        yield url, engine


def sdk(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=10)


def assert_error(r: httpx.Response, status: int | tuple[int, ...]) -> dict:
    statuses = status if isinstance(status, tuple) else (status,)
    assert r.status_code in statuses, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    return err


def sse_events(r: httpx.Response) -> list:
    lines = [line for line in r.text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


# -- shapes -------------------------------------------------------------------------------------

def test_models_health_and_metrics(fast):
    url, _ = fast
    assert [m.id for m in sdk(url).models.list().data] == [MODEL]
    assert httpx.get(f"{url}/health").status_code == 200
    sdk(url).completions.create(model=MODEL, prompt="hi", max_tokens=3)
    text = httpx.get(f"{url}/metrics").text
    for name in ("trt_gemma_requests_running", "trt_gemma_requests_waiting",
                 "trt_gemma_kv_cache_usage_ratio", "trt_gemma_prompt_tokens_total",
                 "trt_gemma_generation_tokens_total", "trt_gemma_preemptions_total",
                 "trt_gemma_time_to_first_token_seconds_bucket",
                 "trt_gemma_inter_token_latency_seconds_bucket",
                 "trt_gemma_e2e_request_latency_seconds_bucket"):
        assert f"\n{name}" in text, name
    assert f'trt_gemma_requests_total{{finish_reason="length",model_name="{MODEL}"}}' in text


def test_completion_choices_usage_logprobs_echo(fast):
    url, _ = fast
    out = sdk(url).completions.create(model=MODEL, prompt=[[2, 97, 98], [2, 120]], max_tokens=4,
                                      n=2, logprobs=1, seed=1)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert all(c.text == "ello" and c.finish_reason == "length" for c in out.choices)
    assert out.usage.prompt_tokens == 3 + 2 and out.usage.completion_tokens == 16
    lp = out.choices[0].logprobs
    assert lp.tokens == list("ello") and lp.token_logprobs == [-0.5] * 4
    assert lp.text_offset == [0, 1, 2, 3] and lp.top_logprobs[0] == {"e": -0.5}
    echoed = sdk(url).completions.create(model=MODEL, prompt="ab", max_tokens=20, echo=True)
    # the stop token ends the text without appearing in it; it counts as a completion token
    assert echoed.choices[0].text == "abhello world" and echoed.choices[0].finish_reason == "stop"
    assert echoed.usage.completion_tokens == len("hello world") + 1


def test_chat_logprobs_and_stream_usage(fast):
    url, _ = fast
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    out = sdk(url).chat.completions.create(model=MODEL, messages=msgs, logprobs=True,
                                           top_logprobs=2, max_tokens=30)
    choice = out.choices[0]
    assert choice.message.content == "hello world" and choice.finish_reason == "stop"
    tokens = choice.logprobs.content
    assert [t.token for t in tokens] == list("hello world")  # not the stop token
    assert [t.token for t in tokens[0].top_logprobs] == ["h", "?"] and tokens[0].bytes == [104]
    stream = sdk(url).chat.completions.create(model=MODEL, messages=msgs, stream=True, n=2,
                                              stream_options={"include_usage": True})
    chunks = list(stream)
    texts = ["".join(c.choices[0].delta.content or "" for c in chunks
                     if c.choices and c.choices[0].index == j) for j in (0, 1)]
    assert texts == ["hello world"] * 2
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 2 * 12
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes.count("stop") == 2


def test_chat_stops_on_end_of_turn_even_with_ignore_eos(fast):
    url, engine = fast
    sdk(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                     max_tokens=2, extra_body={"ignore_eos": True})
    assert EOT in engine.last_params.stop_token_ids


def test_sse_framing_ends_with_done(fast):
    url, _ = fast
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 3, "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert "".join(e["choices"][0]["text"] for e in events) == "hel"
    assert events[-1]["choices"][0]["finish_reason"] == "length"


# -- errors -------------------------------------------------------------------------------------

MALFORMED = [
    ("/v1/completions", b"{not json", 400),
    ("/v1/completions", b"[1, 2]", 400),
    ("/v1/completions", b'"just a string"', 400),
    ("/v1/completions", b"", 400),
    ("/v1/completions", {"max_tokens": 3}, 400),  # no prompt
    ("/v1/completions", {"prompt": 5}, 400),
    ("/v1/completions", {"prompt": []}, 400),
    ("/v1/completions", {"prompt": [[]]}, 400),
    ("/v1/completions", {"prompt": [1, "a"]}, 400),
    ("/v1/completions", {"prompt": [-1]}, 400),
    ("/v1/completions", {"prompt": [VOCAB]}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": "10"}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1.5}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**6}, 400),
    ("/v1/completions", {"prompt": "x" * 300}, 400),  # over the context of 256
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400),
    ("/v1/completions", {"prompt": "x", "top_k": -2}, 400),
    ("/v1/completions", {"prompt": "x", "min_p": 2}, 400),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400),
    ("/v1/completions", {"prompt": "x", "n": 9}, 400),  # > max_num_seqs
    ("/v1/completions", {"prompt": "x", "n": True}, 400),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400),
    ("/v1/completions", {"prompt": "x", "stop": 3}, 400),
    ("/v1/completions", {"prompt": "x", "seed": "s"}, 400),
    ("/v1/completions", {"prompt": "x", "seed": 2**70}, 400),
    ("/v1/completions", {"prompt": "x", "logprobs": 99}, 400),
    ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 1}, 400),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 3}, 400),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": -3}, 400),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, 400),
    ("/v1/completions", {"prompt": "x", "min_tokens": 5, "max_tokens": 2}, 400),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [-5]}, 400),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 1}}, 400),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, 400),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404),
    ("/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400),
    ("/v1/completions", b'{"prompt": "x", "temperature": Infinity}', 400),
    ("/v1/chat/completions", {"messages": []}, 400),
    ("/v1/chat/completions", {"messages": "hi"}, 400),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"},
                                           {"role": "user", "content": "b"}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "s"}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 300}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "top_logprobs": 2}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": 1000}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_object"}}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function"}]}, 400),
    ("/v1/nope", {}, 404),
    ("/v1/completions", b"null", 400),
    ("/v1/completions", b"\xff\xfe{", 400),
    ("/v1/completions", b"[" * 100000, 400),  # deeper than the JSON parser recurses
    ("/v1/completions", {"prompt": [[1, 2], []]}, 400),
    ("/v1/completions", {"prompt": ["x"] * 20}, 400),  # 20 sequences > 8 + 8 ever admitted
    ("/v1/completions", {"prompt": "x", "logprobs": True}, 400),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [1.5]}, 400),
    ("/v1/completions", {"prompt": "x", "stream": True,
                         "stream_options": {"include_usage": "yes"}}, 400),
    ("/v1/completions", {"prompt": "x", "model": ""}, 404),
    ("/v1/chat/completions", {"messages": [None]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": ["hi"]}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
     400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": 5}]}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"},
                                           {"role": "system", "content": "b"}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "a"}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "n": 1.0}, 400),
]


def test_malformed_requests_get_openai_errors_and_the_server_survives(fast):
    url, _ = fast
    with httpx.Client(base_url=url, timeout=10) as http:
        for path, body, status in MALFORMED:
            if isinstance(body, bytes):
                r = http.post(path, content=body, headers={"content-type": "application/json"})
            else:
                r = http.post(path, json=body)
            err = assert_error(r, status)
            assert r.status_code < 500, (path, body, err)
        assert_error(http.get("/v1/completions"), 405)
        assert_error(http.get("/v1/models/other"), 404)
        assert http.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
        for content_type in ("text/plain", "application/x-www-form-urlencoded"):
            r = http.post("/v1/completions", content=b"prompt=x",
                          headers={"content-type": content_type})
            assert_error(r, 400)
        r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1.5})
        assert r.json()["error"]["param"] == "max_tokens"
        r = http.post("/v1/completions", json={"prompt": "x", "top_p": 1.5})
        assert r.json()["error"]["param"] == "top_p"
        r = http.post("/v1/chat/completions", json={"messages": [{"role": "wizard",
                                                                  "content": "x"}]})
        assert r.json()["error"]["param"] == "messages" and "wizard" in r.json()["error"]["message"]
        # unknown fields are refused, as OpenAI does (never silently ignored)
        r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "frobnicate": 1})
        assert assert_error(r, 400)["param"] == "frobnicate"
        assert r.json()["error"]["message"] == "Unrecognized request argument supplied: frobnicate"
        assert http.get("/health").status_code == 200


def test_engine_bug_is_a_500_and_the_server_survives(fast):
    url, _ = fast
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "crash!", "max_tokens": 2})
    assert assert_error(r, 500)["type"] == "server_error"
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "crash!", "stream": True})
    assert r.status_code == 200 and "error" in sse_events(r)[-1]
    assert httpx.post(f"{url}/v1/completions", json={"prompt": "ok"}).status_code == 200


def test_api_key_and_body_limit():
    with serve(FakeEngine(), api_key="sekrit", max_body_bytes=2048) as (url, _):
        assert sdk(url, "sekrit").completions.create(model=MODEL, prompt="a", max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            sdk(url, "wrong").completions.create(model=MODEL, prompt="a", max_tokens=2)
        err = assert_error(httpx.get(f"{url}/v1/models"), 401)
        assert err["type"] == "authentication_error"
        assert httpx.get(f"{url}/health").status_code == 200  # probes need no key
        auth = {"authorization": "Bearer sekrit"}
        big = {"prompt": "x" * 4096}
        assert_error(httpx.post(f"{url}/v1/completions", json=big, headers=auth), 413)

        def chunked():  # no Content-Length: the limit is enforced while reading
            yield b'{"prompt": "'
            for _ in range(8):
                yield b"x" * 512
            yield b'"}'

        r = httpx.post(f"{url}/v1/completions", content=chunked(),
                       headers={**auth, "content-type": "application/json"})
        assert_error(r, 413)
        assert httpx.get(f"{url}/health").status_code == 200


def test_backpressure_503_beyond_max_queue():
    engine = FakeEngine(step_s=0.05)
    body = {"prompt": "x", "max_tokens": 40, "stream": True, "ignore_eos": True}
    with serve(engine, max_num_seqs=1, max_queue=1) as (url, client), \
            httpx.Client(base_url=url, timeout=10) as http:
        with http.stream("POST", "/v1/completions", json=body) as a, \
                http.stream("POST", "/v1/completions", json=body) as b:
            assert a.status_code == b.status_code == 200
            r = http.post("/v1/completions", json={"prompt": "x"})
            err = assert_error(r, 503)
            assert err["code"] == "server_overloaded" and r.headers["retry-after"] == "1"
        deadline = time.monotonic() + 5
        while client.num_in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.num_in_flight == 0
        assert http.post("/v1/completions", json={"prompt": "x"}).status_code == 200
        text = http.get("/metrics").text
        assert (f'trt_gemma_requests_rejected_total{{model_name="{MODEL}",'
                'reason="server_overloaded"}') in text


def test_client_disconnect_aborts_the_engine_request():
    engine = FakeEngine(step_s=0.05)
    with serve(engine) as (url, client):
        body = {"prompt": "x", "max_tokens": 60, "stream": True, "ignore_eos": True}
        with httpx.Client(base_url=url, timeout=10) as http, \
                http.stream("POST", "/v1/completions", json=body) as r:
            next(r.iter_lines())
        with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=url, timeout=0.3) as http:
            http.post("/v1/completions", json={**body, "stream": False})
        deadline = time.monotonic() + 5
        while (len(set(engine.aborted)) < 2 or engine.running) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(set(engine.aborted)) == 2 and not engine.running
        assert client.num_in_flight == 0


def test_health_is_503_when_the_engine_is_dead():
    engine = FakeEngine()
    with serve(engine) as (url, _):
        engine.alive = False
        assert_error(httpx.get(f"{url}/health"), 503)


def test_serve_options_are_checked_before_loading(capsys):
    from trt_gemma.cli import main
    from trt_gemma.server.commands import _is_loopback, default_model_name

    assert main(["serve", "gemma3-270m", "--max-queue", "-1"]) == 2
    assert "--max-queue must be >= 0" in capsys.readouterr().err
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0")
    assert default_model_name("gemma3-270m") == "gemma3-270m"
