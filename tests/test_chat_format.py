"""The chat format (trt_gemma/chat_format.py) against independent references.

- plain chats: the official Gemma 3 jinja template (rendered with jinja2, as in test_tokenizer);
- FunctionGemma: prompts its official template produced, as published (a llama.cpp-tokenized
  reference prompt, and the call / response / answer turn of Google's "full function calling
  sequence" page);
- the call grammar: xgrammar's own matcher accepts valid calls and rejects the rest, and every
  string it accepts is read back by the parser, so grammar, prompt and parser agree.
"""

from __future__ import annotations

import json

import pytest
from test_tokenizer import CONVERSATIONS, _render_official

from trt_gemma.chat_format import (
    FUNCTION_GEMMA,
    GEMMA3,
    TOOLS_INSTRUCTION,
    ParsedReply,
    Tool,
    ToolCall,
    chat_format_for,
    render_chat,
    tools_from_openai,
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["c", "f"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    }, "required": ["city"]}}}
PING = {"type": "function", "function": {"name": "ping"}}
TOOLS = tools_from_openai([WEATHER, PING])
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


# -- Gemma 3 rendering ----------------------------------------------------------------------------

@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_plain_chats_match_the_official_template(messages, add_generation_prompt):
    expected = _render_official(messages, add_generation_prompt, bos_token="")
    assert GEMMA3.render(messages, add_generation_prompt) == expected
    assert render_chat(messages, add_generation_prompt, tools=None) == expected
    if messages[0]["role"] == "system":  # developer is OpenAI's newer name for system
        developer = [{**messages[0], "role": "developer"}, *messages[1:]]
        assert GEMMA3.render(developer, add_generation_prompt) == expected


def test_tools_go_first_in_the_first_user_turn():
    prompt = GEMMA3.render([{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": "Weather?"}], tools=TOOLS)
    definitions = (
        '{"name": "get_weather", "description": "Current weather.", "parameters": '
        + json.dumps(WEATHER["function"]["parameters"]) + "},\n"
        '{"name": "ping", "parameters": {"type": "object", "properties": {}}}'
    )
    assert prompt == (f"<start_of_turn>user\nBe brief.\n\n{TOOLS_INSTRUCTION}[\n{definitions}\n]"
                      "\n\nWeather?<end_of_turn>\n<start_of_turn>model\n")
    assert "```tool_code\n" in TOOLS_INSTRUCTION and "```tool_output" in TOOLS_INSTRUCTION


def test_call_history_and_results_render_as_fenced_blocks():
    second = {"id": "call_2", "type": "function", "function": {"name": "ping", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [CALL, second]},
        {"role": "tool", "tool_call_id": "call_2", "content": "pong"},  # any order, by id
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 15}'},
        {"role": "user", "content": "And in F?"},  # joins the results' user turn
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c3", "function": {"name": "get_weather",
                                      "arguments": {"city": "Paris", "unit": "f"}}}]},
        {"role": "tool", "content": '{"temp": 59}'},  # no id: the next unanswered call
    ]
    assert GEMMA3.render(messages) == (
        "<start_of_turn>user\nWeather in Paris?<end_of_turn>\n"
        "<start_of_turn>model\nLet me look.\n```tool_code\n"
        '{"name": "get_weather", "parameters": {"city": "Paris"}}\n'
        '{"name": "ping", "parameters": {}}\n```<end_of_turn>\n'
        "<start_of_turn>user\n```tool_output\npong\n```\n```tool_output\n{\"temp\": 15}\n```\n"
        "And in F?<end_of_turn>\n"
        "<start_of_turn>model\n```tool_code\n"
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "f"}}\n```<end_of_turn>\n'
        "<start_of_turn>user\n```tool_output\n{\"temp\": 59}\n```<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


@pytest.mark.parametrize(("messages", "match"), [
    ([{"role": "tool", "content": "x"}], "message 0: a 'tool' message must follow"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "x"}], "message 1"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [CALL]},
      {"role": "tool", "tool_call_id": "nope", "content": "x"}], "'nope' matches no"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [CALL]},
      {"role": "tool", "content": "x"}, {"role": "tool", "content": "y"}], "more 'tool'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [
        {"id": "c", "function": {"name": "f", "arguments": "{oops"}}]}], "not valid JSON"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [{"id": "c"}]}],
     "function name"),
    ([{"role": "function", "content": "x"}], "unknown role 'function'"),
    ([{"role": "user", "content": "a"}, {"role": "developer", "content": "b"}], "message 1"),
    ([{"role": "assistant", "content": None}], "message 0"),
])
def test_broken_conversations_are_value_errors_naming_the_message(messages, match):
    for fmt in (GEMMA3, FUNCTION_GEMMA):
        with pytest.raises(ValueError, match=match):
            fmt.render(messages, tools=TOOLS)


@pytest.mark.parametrize(("tools", "match"), [
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}],
     "tools.0.function.parameters"),
    ([PING, PING], "used twice"),
    ([{"type": "function"}], "tools.0"),
])
def test_bad_tool_definitions(tools, match):
    with pytest.raises(ValueError, match=match):
        tools_from_openai(tools)


# -- FunctionGemma --------------------------------------------------------------------------------

def test_functiongemma_declarations_match_the_official_template():
    """The prompt FunctionGemma's chat_template.jinja renders for this request, as published
    with its llama.cpp tokenization (85 ids from <bos>)."""
    tool = {"type": "function", "function": {
        "name": "get_weather", "description": "Get current weather for a location",
        "parameters": {"type": "object", "properties": {
            "location": {"type": "string", "description": "City name"}},
            "required": ["location"]}}}
    messages = [{"role": "developer", "content": "You are a model that can do function calling "
                 "with the following functions"},
                {"role": "user", "content": "What's the weather in Paris?"}]
    assert FUNCTION_GEMMA.render(messages, tools=tools_from_openai([tool])) == (
        "<start_of_turn>developer\n"
        "You are a model that can do function calling with the following functions"
        "<start_function_declaration>declaration:get_weather{description:<escape>Get current "
        "weather for a location<escape>,parameters:{properties:{location:{description:<escape>"
        "City name<escape>,type:<escape>STRING<escape>}},required:[<escape>location<escape>],"
        "type:<escape>OBJECT<escape>}}<end_function_declaration><end_of_turn>\n"
        "<start_of_turn>user\nWhat's the weather in Paris?<end_of_turn>\n"
        "<start_of_turn>model\n")


def test_functiongemma_call_response_and_answer_share_the_model_turn():
    """Google's full function calling sequence: call, response, answer in one model turn."""
    call = {"id": "c1", "type": "function", "function": {
        "name": "get_current_weather", "arguments": '{"location": "Tokyo, Japan"}'}}
    head = [{"role": "user", "content": "Hey, what's the weather in Tokyo right now?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1",
             "content": '{"temperature": 15, "weather": "sunny"}'}]
    answer = ("The current weather in Tokyo is sunny with a temperature of 15 degrees "
              "Celsius.")
    model_turn = (
        "<start_of_turn>model\n<start_function_call>call:get_current_weather{location:<escape>"
        "Tokyo, Japan<escape>}<end_function_call><start_function_response>response:"
        "get_current_weather{temperature:15,weather:<escape>sunny<escape>}"
        "<end_function_response>")
    user_turn = "<start_of_turn>user\nHey, what's the weather in Tokyo right now?<end_of_turn>\n"
    # the results last: the model answers in the same turn, no new one is opened
    assert FUNCTION_GEMMA.render(head) == user_turn + model_turn
    full = FUNCTION_GEMMA.render([*head, {"role": "assistant", "content": answer}])
    assert full == f"{user_turn}{model_turn}{answer}<end_of_turn>\n<start_of_turn>model\n"


def test_functiongemma_parse():
    text = ("<start_function_call>call:get_weather{city:<escape>Tokyo, {Japan}<escape>,"
            "days:3,opts:{deep:[1,<escape>a<escape>,true]}}<end_function_call>")
    parsed = FUNCTION_GEMMA.parse("Sure. " + text, TOOLS)
    assert parsed.content == "Sure. "
    assert parsed.tool_calls == (ToolCall("get_weather", {
        "city": "Tokyo, {Japan}", "days": 3, "opts": {"deep": [1, "a", True]}}),)
    broken = "<start_function_call>call:get_weather{city:<escape>Tokyo}<end_function_call>"
    unknown = "<start_function_call>call:nope{}<end_function_call>"
    for text in (broken, unknown):
        assert FUNCTION_GEMMA.parse(text, TOOLS).tool_calls == ()
    assert FUNCTION_GEMMA.hold_from("abc<start_fun") == 3
    with pytest.raises(ValueError, match="^tool_choice"):
        FUNCTION_GEMMA.call_grammar(TOOLS, parallel=True)


def test_the_dialect_follows_the_tokenizer(tmp_path):
    from conftest import save_char_tokenizer
    from tokenizers import Tokenizer

    from trt_gemma.tokenizer import GemmaTokenizer

    save_char_tokenizer(tmp_path)
    plain = GemmaTokenizer.from_hf_dir(tmp_path)
    backend = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    backend.add_special_tokens(["<start_function_call>", "<end_function_call>", "<escape>"])
    backend.save(str(tmp_path / "tokenizer.json"))
    function_gemma = GemmaTokenizer.from_hf_dir(tmp_path)
    assert chat_format_for(plain) is GEMMA3 and chat_format_for(function_gemma) is FUNCTION_GEMMA
    messages = [{"role": "user", "content": "hi"}]
    assert plain.apply_chat_template(messages, tools=[PING]) == GEMMA3.render(messages, True,
                                                                              TOOLS[1:])
    assert "<start_function_declaration>declaration:ping{" in function_gemma.apply_chat_template(
        messages, tools=[PING])
    assert chat_format_for(object()) is GEMMA3  # a tokenizer that cannot say


# -- parsing Gemma 3 replies ----------------------------------------------------------------------

@pytest.mark.parametrize(("text", "content", "calls"), [
    ('```tool_code\n{"name": "get_weather", "parameters": {"city": "Rome"}}\n```', "",
     [("get_weather", {"city": "Rome"})]),
    ('I will check.\n```tool_code\n{"name": "ping", "arguments": "{}"}\n```\nDone.',
     "I will check.\n\nDone.", [("ping", {})]),
    ('```tool_code\n{"name": "ping", "parameters": {}}\n'
     '{"name": "get_weather", "parameters": {"city": "A", "days": 2}}\n```', "",
     [("ping", {}), ("get_weather", {"city": "A", "days": 2})]),
    ('[{"name": "ping", "parameters": {}}, {"name": "ping", "parameters": {}}]', "",
     [("ping", {}), ("ping", {})]),
    ('[get_weather(city="Rome", unit="c", days=2), ping()]', "",
     [("get_weather", {"city": "Rome", "unit": "c", "days": 2}), ("ping", {})]),
    ('```tool_code\nget_weather(city="Oslo", extra={"a": [true, null]})\n```', "",
     [("get_weather", {"city": "Oslo", "extra": {"a": [True, None]}})]),
])
def test_calls_are_read_from_replies(text, content, calls):
    parsed = GEMMA3.parse(text, TOOLS)
    assert parsed.content == content
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == calls
    assert all(json.loads(c.arguments_json) == c.arguments for c in parsed.tool_calls)


@pytest.mark.parametrize("text", [
    "The weather is fine.",
    '```tool_code\n{"name": "get_weather", "parameters": {"city": \n```',  # broken JSON
    '```tool_code\n{"name": "launch", "parameters": {}}\n```',  # not a known function
    '```tool_code\nget_weather("Rome")\n```',  # positional arguments
    '```python\nprint("hi")\n```',
    '```tool_code\n{"name": "ping", "parameters": {}, "extra": 1}\n```',
    '{"city": "Rome"}',
    "[1, 2, 3]",
])
def test_malformed_calls_stay_content(text):
    assert GEMMA3.parse(text, TOOLS) == ParsedReply(text, ())


def test_streams_hold_text_where_a_call_may_start():
    assert GEMMA3.hold_from("Hello there") == len("Hello there")
    assert GEMMA3.hold_from("Hello ``") == len("Hello ")
    assert GEMMA3.hold_from("Hi\n```tool_code\n{") == 3
    assert GEMMA3.hold_from("  {\"name\"") == 2  # a bare JSON call
    assert GEMMA3.hold_from("[get_weather(") == 0


# -- the call grammar -----------------------------------------------------------------------------

def _accepts(grammar: str, text: str) -> bool:
    from xgrammar.testing import _is_grammar_accept_string

    return _is_grammar_accept_string(grammar, text)


def test_call_grammar_accepts_valid_calls_and_rejects_others():
    pytest.importorskip("xgrammar")
    single = GEMMA3.call_grammar(TOOLS, parallel=False)
    several = GEMMA3.call_grammar(TOOLS, parallel=True)
    weather = '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c", "days": 7}}'
    ping = '{"name": "ping", "parameters": {}}'
    good = [f"```tool_code\n{weather}\n```", f"```tool_code\n{ping}\n```"]
    for text in good:
        assert _accepts(single, text) and _accepts(several, text), text
        assert GEMMA3.parse(text, TOOLS).tool_calls  # what the grammar allows, the parser reads
    two = f"```tool_code\n{weather}\n{ping}\n```"
    assert _accepts(several, two) and not _accepts(single, two)
    assert len(GEMMA3.parse(two, TOOLS).tool_calls) == 2
    bad = [
        weather,  # no fence
        f"Sure!\n```tool_code\n{ping}\n```",  # text before the call
        '```tool_code\n{"name": "launch", "parameters": {}}\n```',  # unknown function
        '```tool_code\n{"name": "get_weather", "parameters": {"unit": "c"}}\n```',  # no city
        '```tool_code\n{"name": "get_weather", "parameters": {"city": "P", "unit": "k"}}\n```',
        '```tool_code\n{"name": "get_weather", "parameters": {"city": "P", "days": 8}}\n```',
        '```tool_code\n{"name": "get_weather", "parameters": {"city": "P", "x": 1}}\n```',
        '```tool_code\n{"name": "ping", "parameters": {}}',  # unclosed
    ]
    for text in bad:
        assert not _accepts(several, text), text
    # a named function: only its calls
    named = GEMMA3.call_grammar([t for t in TOOLS if t.name == "ping"], parallel=False)
    assert _accepts(named, good[1]) and not _accepts(named, good[0])
    # the prompt's history form of a call is a string the grammar accepts
    history = GEMMA3.format_calls([ToolCall("get_weather", {"city": "Paris", "days": 2})])
    assert _accepts(single, history)


def test_call_grammar_names_a_schema_that_does_not_compile():
    pytest.importorskip("xgrammar")
    broken = Tool("f", None, {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": 5, "maximum": 1}}})
    with pytest.raises(ValueError, match="^tools: the parameters of 'f'"):
        GEMMA3.call_grammar([broken], parallel=False)
