"""Gemma's chat format, whole: messages of every role, tools, tool calls and tool results in the
prompt; tool calls parsed out of the reply; the grammar that makes a required call parse.

Two dialects, picked by the tokenizer (``chat_format_for``):

- **Gemma 3** (no tool tokens). Plain chats are the official Gemma 3 jinja template, less the BOS:
  ``<start_of_turn>user\\n{text}<end_of_turn>\\n``, ``<start_of_turn>model\\n...``, alternating, a
  leading system (or developer) message folded into the first user turn as ``{system}\\n\\n{user}``.
  Tools follow Google's "Function calling with Gemma" guide: the function definitions (OpenAI's
  JSON schema) and the instruction go at the head of the first user turn, and the model answers
  with its call in a fenced block, results coming back in a ``tool_output`` block of a user turn.
  Of the guide's two call styles we instruct the JSON one, one call per line::

      ```tool_code
      {"name": "get_weather", "parameters": {"city": "Paris"}}
      ```

  because a JSON call can be constrained by xgrammar to each function's own parameter schema (the
  grammar for ``tool_choice`` "required" or a named function), and a schema has no Python-literal
  grammar. The parser also reads the guide's Python style (``[get_weather(city="Paris")]``), bare
  or fenced, since a model may answer in either.
- **FunctionGemma** (the tokenizer has ``<start_function_call>``): its own tokens, as its
  chat_template.jinja writes them: declarations in a ``developer`` turn, calls as
  ``<start_function_call>call:name{key:<escape>text<escape>,n:1}<end_function_call>``, results as
  ``<start_function_response>response:name{...}<end_function_response>`` inside the model turn.
  Its special tokens must stay in the text (``skip_special_tokens``), and it has no call grammar
  yet (xgrammar cannot force a special token), so "required" and named calls are refused for it.

Every error is a ValueError naming the message (or tool) at fault; the server answers it with 400.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from trt_gemma.tokenizer_vocab import END_OF_TURN, START_OF_TURN

# Google's guide words it "You have access to functions. If you decide to invoke any of the
# function(s), you MUST put it in the format of ... You SHOULD NOT include any other text in the
# response if you call a function"; ours says the same of the fenced JSON form.
TOOLS_INSTRUCTION = (
    "You have access to functions. If you decide to invoke any of the function(s), you MUST put "
    "it in the format of\n```tool_code\n"
    '{"name": function name, "parameters": dictionary of argument name and its value}\n```\n'
    "with one call per line. You SHOULD NOT include any other text in the response if you call "
    "a function. The result of each call comes back in a ```tool_output block.\n"
)
CALL_FENCE, OUTPUT_FENCE, FENCE_END = "```tool_code\n", "```tool_output\n", "\n```"
_CALL_LANGUAGES = ("tool_code", "tool_call", "json", "python", "")  # fences a call is read from
_FENCE = re.compile(r"```([A-Za-z_]*)[ \t]*\n(.*?)\n?```", re.DOTALL)
_GRAMMAR_ROOT = "trt_gemma_tool_calls"  # a rule name no JSON-schema grammar generates


@dataclass(frozen=True)
class Tool:
    """One function the model may call (OpenAI's ``tools[i].function``)."""

    name: str
    description: str | None = None
    parameters: Mapping | None = None  # a JSON schema of the arguments; None: no arguments


@dataclass(frozen=True)
class ToolCall:
    """A call the model made: OpenAI's ``tool_calls[i]`` once given an id."""

    name: str
    arguments: dict

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


@dataclass(frozen=True)
class ParsedReply:
    """A reply split into calls and the text around them (``content``: the rest, unstripped)."""

    content: str
    tool_calls: tuple[ToolCall, ...]


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tools_from_openai(tools: Sequence[Mapping] | None) -> list[Tool]:
    """``[{"type": "function", "function": {...}}]`` (or bare function dicts) as Tools."""
    result: list[Tool] = []
    for i, tool in enumerate(tools or ()):
        function = tool.get("function", tool) if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise ValueError(f"tools.{i}: expected {{'type': 'function', 'function': {{'name': "
                             "..., 'parameters': {...}}}}")
        parameters = function.get("parameters")
        if parameters is not None and (not isinstance(parameters, Mapping)
                                       or parameters.get("type", "object") != "object"):
            raise ValueError(f"tools.{i}.function.parameters: must be a JSON schema of type "
                             "'object'")
        if any(t.name == function["name"] for t in result):
            raise ValueError(f"tools.{i}: the function name {function['name']!r} is used twice")
        result.append(Tool(function["name"], function.get("description"), parameters))
    return result


# -- messages -------------------------------------------------------------------------------------

def _message_text(message: Mapping, index: int, strip: bool) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content.strip() if strip else content
    if not isinstance(content, list):
        raise ValueError(f"chat message {index}: content must be a string or a list of text parts")
    texts = []
    for part in content:
        if not isinstance(part, Mapping) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise ValueError(f"chat message {index}: only text parts are supported, got {kind!r}")
        text = part.get("text")
        if not isinstance(text, str):
            raise ValueError(f"chat message {index}: a text part needs a string 'text'")
        texts.append(text.strip() if strip else text)
    return "".join(texts)


def _calls_of(message: Mapping, index: int) -> list[tuple[str, str, dict]]:
    """(id, name, arguments) of an assistant message's ``tool_calls``."""
    calls = []
    for k, call in enumerate(message.get("tool_calls") or ()):
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise ValueError(f"chat message {index}: tool_calls.{k} needs a function name")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                raise ValueError(f"chat message {index}: tool_calls.{k}.function.arguments is "
                                 "not valid JSON") from None
        if not isinstance(arguments, dict):
            raise ValueError(f"chat message {index}: tool_calls.{k}.function.arguments must be "
                             "a JSON object")
        calls.append((str(call.get("id", "")), function["name"], arguments))
    return calls


@dataclass
class _Turn:
    role: str  # "user" or "model"
    parts: list[str]
    tool_results: bool = False  # a user turn of tool outputs, which a user message may join


class _Conversation:
    """Walks the messages once, checking roles, alternation and which call each result answers."""

    def __init__(self, messages: Sequence[Mapping]):
        if not messages:
            raise ValueError("chat messages: the list is empty")
        self.messages = messages
        self.system: str | None = None
        self.start = 0
        if messages[0].get("role") in ("system", "developer"):
            self.system = _message_text(messages[0], 0, strip=False)
            self.start = 1
            if len(messages) == 1:
                raise ValueError("chat messages: a system message must be followed by a user "
                                 "message")

    def walk(self):
        """(index, role, text, calls, answered call name) per message after the system one."""
        pending: list[tuple[str, str]] = []  # (id, name) of calls not yet answered
        previous = None
        for index in range(self.start, len(self.messages)):
            message = self.messages[index]
            role = message.get("role")
            calls, name = [], None
            if role == "tool":
                if previous not in ("assistant_calls", "tool"):
                    raise ValueError(f"chat message {index}: a 'tool' message must follow an "
                                     "assistant message with tool_calls")
                if not pending:
                    raise ValueError(f"chat message {index}: more 'tool' messages than the "
                                     "assistant's tool_calls")
                wanted = message.get("tool_call_id")
                ids = [call_id for call_id, _ in pending]
                if wanted is not None and wanted not in ids:
                    raise ValueError(f"chat message {index}: tool_call_id {wanted!r} matches no "
                                     "unanswered tool call of the assistant message before it")
                name = pending.pop(ids.index(wanted) if wanted is not None else 0)[1]
                text = _message_text(message, index, strip=True)
                previous = "tool"
            elif role in ("user", "assistant", "model"):
                if role != "user" and message.get("tool_calls"):
                    calls = _calls_of(message, index)
                    pending = [(call_id, n) for call_id, n, _ in calls]
                    text = ("" if message.get("content") is None
                            else _message_text(message, index, strip=True))
                    previous = "assistant_calls"
                else:
                    text = _message_text(message, index, strip=True)
                    previous = role
            else:
                raise ValueError(f"chat message {index}: unknown role {role!r} (expected system, "
                                 "developer, user, assistant, tool)")
            yield index, role, text, calls, name


def _alternation_error(index: int, role: str, expected: str) -> ValueError:
    return ValueError(f"chat message {index}: role {role!r} breaks the user/assistant alternation "
                      f"(expected {'user' if expected == 'user' else 'assistant'})")


# -- Gemma 3 --------------------------------------------------------------------------------------

class Gemma3Format:
    """The Gemma 3 chat template, with Google's prompted function calling (module docstring)."""

    name = "gemma3"
    skip_special_tokens = True  # the call is plain text
    stop_strings: tuple[str, ...] = ()

    def render(self, messages: Sequence[Mapping], add_generation_prompt: bool = True,
               tools: Sequence[Tool] | None = None) -> str:
        conversation = _Conversation(messages)
        turns: list[_Turn] = []
        for index, role, text, calls, _ in conversation.walk():
            if role == "tool":
                block = f"{OUTPUT_FENCE}{text}{FENCE_END}"
                if turns and turns[-1].tool_results:
                    turns[-1].parts.append(block)
                else:
                    self._expect(turns, index, role, "user")
                    turns.append(_Turn("user", [block], tool_results=True))
                continue
            if role == "user" and turns and turns[-1].tool_results:
                turns[-1].parts.append(text)  # a question after the results: one user turn
                turns[-1].tool_results = False
                continue
            self._expect(turns, index, role, "user" if role == "user" else "model")
            parts = [text] if text or not calls else []
            if calls:
                parts.append(self.format_calls([ToolCall(n, a) for _, n, a in calls]))
            turns.append(_Turn("user" if role == "user" else "model", parts))
        head = [] if conversation.system is None else [conversation.system]
        if tools:
            # one definition per line: the guide's JSON list, in half the tokens of indent=2
            definitions = ",\n".join(json.dumps(_definition(t), ensure_ascii=False)
                                      for t in tools)
            head.append(f"{TOOLS_INSTRUCTION}[\n{definitions}\n]")
        if head:  # the official template's first_user_prefix, then the user's text
            turns[0].parts[0] = "\n\n".join(head) + "\n\n" + turns[0].parts[0]
        prompt = [f"{START_OF_TURN}{t.role}\n{chr(10).join(t.parts)}{END_OF_TURN}\n" for t in turns]
        if add_generation_prompt:
            prompt.append(f"{START_OF_TURN}model\n")
        return "".join(prompt)

    @staticmethod
    def _expect(turns: list[_Turn], index: int, role: str, want: str) -> None:
        expected = "user" if len(turns) % 2 == 0 else "model"
        if want != expected:
            raise _alternation_error(index, role, expected)

    @staticmethod
    def format_calls(calls: Sequence[ToolCall]) -> str:
        lines = [json.dumps({"name": c.name, "parameters": c.arguments}, ensure_ascii=False)
                 for c in calls]
        return CALL_FENCE + "\n".join(lines) + FENCE_END

    def parse(self, text: str, tools: Sequence[Tool]) -> ParsedReply:
        """The calls of known functions in ``text``; anything that does not parse stays text."""
        names = {t.name for t in tools}
        found, kept, cursor = [], [], 0
        for match in _FENCE.finditer(text):
            if match.group(1) not in _CALL_LANGUAGES:
                continue
            calls = _read_calls(match.group(2), names)
            if calls:
                found.extend(calls)
                kept.append(text[cursor:match.start()])
                cursor = match.end()
        if found:
            return ParsedReply("".join(kept) + text[cursor:], tuple(found))
        calls = _read_calls(text, names)  # the guide's bare form: the whole reply is the call
        return ParsedReply("", tuple(calls)) if calls else ParsedReply(text, ())

    def hold_from(self, text: str) -> int:
        """Where text must be held back in a stream because a call may be starting there."""
        stripped = text.lstrip()
        if stripped[:1] in ("{", "["):  # a bare JSON or Python-list call
            return len(text) - len(stripped)
        fence = text.find("```")
        if fence >= 0:
            return fence
        for k in (2, 1):
            if text.endswith("`" * k):
                return len(text) - k
        return len(text)

    def call_grammar(self, tools: Sequence[Tool], parallel: bool) -> str:
        """xgrammar EBNF: one fenced block of one call (or, ``parallel``, one per line) of these
        tools, each call's parameters matching its function's schema."""
        import xgrammar as xgr

        cases = []
        for tool in tools:
            parameters = dict(tool.parameters or {"type": "object", "properties": {}})
            cases.append({"type": "object", "properties": {"name": {"const": tool.name},
                                                           "parameters": parameters},
                          "required": ["name", "parameters"], "additionalProperties": False})
        schema = cases[0] if len(cases) == 1 else {"anyOf": cases}
        try:
            call = str(xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False))
        except (RuntimeError, ValueError, TypeError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
            names = ", ".join(repr(t.name) for t in tools)
            raise ValueError(f"tools: the parameters of {names} do not compile as a JSON schema: "
                             f"{reason}") from None
        more = ' ("\\n" root)*' if parallel else ""
        ebnf = f'{call}\n{_GRAMMAR_ROOT} ::= "```tool_code\\n" root{more} "\\n```"\n'
        return str(xgr.Grammar.from_ebnf(ebnf, root_rule_name=_GRAMMAR_ROOT))


def _definition(tool: Tool) -> dict:
    out: dict = {"name": tool.name}
    if tool.description:
        out["description"] = tool.description
    out["parameters"] = dict(tool.parameters or {"type": "object", "properties": {}})
    return out


def _read_calls(text: str, names: set[str]) -> list[ToolCall]:
    """Calls of known functions: JSON (an object, a list, one object per line) or Python-style
    (``f(a=1)``, ``[f(a=1), g()]``). Empty unless the whole text is calls."""
    text = text.strip()
    if not text:
        return []
    try:
        candidates = [json.loads(text)]
    except ValueError:
        try:
            candidates = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError:
            candidates = None
    if candidates is not None:
        flat = [c for item in candidates for c in (item if isinstance(item, list) else [item])]
        calls = [_json_call(c) for c in flat]
    else:
        calls = _python_calls(text)
    if not calls or any(c is None or c.name not in names for c in calls):
        return []
    return calls


def _json_call(obj) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get("parameters", obj.get("arguments", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    extra = set(obj) - {"name", "parameters", "arguments"}
    return ToolCall(obj["name"], arguments) if isinstance(arguments, dict) and not extra else None


_PY_NAMES = {"true": True, "false": False, "null": None, "True": True, "False": False,
             "None": None}


def _python_calls(text: str) -> list[ToolCall | None] | None:
    try:
        tree = ast.parse(text, mode="exec")
    except SyntaxError:
        return None
    nodes = []
    for statement in tree.body:
        if not isinstance(statement, ast.Expr):
            return None
        value = statement.value
        nodes.extend(value.elts if isinstance(value, (ast.List, ast.Tuple)) else [value])
    calls = []
    for node in nodes:
        if not isinstance(node, ast.Call) or node.args or not isinstance(node.func, ast.Name):
            return None
        try:
            arguments = {k.arg: _py_literal(k.value) for k in node.keywords}
        except ValueError:
            return None
        if None in arguments:  # **kwargs
            return None
        calls.append(ToolCall(node.func.id, arguments))
    return calls


def _py_literal(node):
    if isinstance(node, ast.Name) and node.id in _PY_NAMES:
        return _PY_NAMES[node.id]
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_py_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise ValueError("** in a dict")
        return {str(_py_literal(k)): _py_literal(v) for k, v in zip(node.keys, node.values)}
    value = ast.literal_eval(node)  # numbers, strings, -1; anything else raises ValueError
    if not isinstance(value, (str, int, float, bool, type(None))):
        raise ValueError("not a JSON value")
    return value


# -- FunctionGemma --------------------------------------------------------------------------------

ESCAPE = "<escape>"
CALL_START, CALL_END = "<start_function_call>", "<end_function_call>"
RESPONSE_START, RESPONSE_END = "<start_function_response>", "<end_function_response>"
DECLARATION_START, DECLARATION_END = "<start_function_declaration>", "<end_function_declaration>"
_FG_CALL = re.compile(re.escape(CALL_START) + r"call:([\w.-]+)\{(.*?)\}" + re.escape(CALL_END),
                      re.DOTALL)


class FunctionGemmaFormat(Gemma3Format):
    """FunctionGemma's template: tool tokens, a developer turn, results inside the model turn."""

    name = "functiongemma"
    skip_special_tokens = False  # the call tokens are special; they must reach the parser
    stop_strings = (RESPONSE_START,)  # the model would go on to invent the result

    def render(self, messages: Sequence[Mapping], add_generation_prompt: bool = True,
               tools: Sequence[Tool] | None = None) -> str:
        conversation = _Conversation(messages)
        out, open_role = [], None  # open_role: the turn not yet closed
        if conversation.system is not None or tools:
            declarations = "".join(f"{DECLARATION_START}{_fg_declaration(t)}{DECLARATION_END}"
                                   for t in tools or ())
            system = (conversation.system or "").strip()
            out.append(f"{START_OF_TURN}developer\n{system}{declarations}{END_OF_TURN}\n")
        turns = 0
        for index, role, text, calls, name in conversation.walk():
            if role == "tool":
                out.append(f"{RESPONSE_START}response:{name}{_fg_response(text)}{RESPONSE_END}")
                continue
            want = "user" if role == "user" else "model"
            continuing = want == "model" and open_role == "model"  # the answer after results
            if not continuing:
                if open_role is not None:
                    out.append(f"{END_OF_TURN}\n")
                if want != ("user" if turns % 2 == 0 else "model"):
                    raise _alternation_error(index, role, "user" if turns % 2 == 0 else "model")
                out.append(f"{START_OF_TURN}{want}\n")
                turns += 1
            out.append(text)
            out.extend(f"{CALL_START}call:{n}{_fg_value(a)}{CALL_END}" for _, n, a in calls)
            open_role = "model" if calls else want
            if not calls:
                out.append(f"{END_OF_TURN}\n")
                open_role = None
        if open_role == "model":  # results came last: the model answers in the same turn
            return "".join(out)
        if add_generation_prompt:
            out.append(f"{START_OF_TURN}model\n")
        return "".join(out)

    def parse(self, text: str, tools: Sequence[Tool]) -> ParsedReply:
        names = {t.name for t in tools}
        found, kept, cursor = [], [], 0
        for match in _FG_CALL.finditer(text):
            try:
                arguments = _FGReader("{" + match.group(2) + "}").read()
            except ValueError:
                continue
            if match.group(1) in names and isinstance(arguments, dict):
                found.append(ToolCall(match.group(1), arguments))
                kept.append(text[cursor:match.start()])
                cursor = match.end()
        return ParsedReply("".join(kept) + text[cursor:], tuple(found))

    def hold_from(self, text: str) -> int:
        start = text.find(CALL_START)
        if start >= 0:
            return start
        for k in range(len(CALL_START) - 1, 0, -1):
            if text.endswith(CALL_START[:k]):
                return len(text) - k
        return len(text)

    def call_grammar(self, tools: Sequence[Tool], parallel: bool) -> str:
        raise ValueError("tool_choice: 'required' and a named function need a constrained call, "
                         "which this checkpoint's FunctionGemma format cannot express yet (its "
                         "call tokens are special tokens); use 'auto'")


def _fg_value(value, top: bool = True) -> str:
    """A JSON value the way FunctionGemma's template writes it: strings in <escape>, keys bare
    and sorted, numbers and booleans bare."""
    if isinstance(value, str):
        return f"{ESCAPE}{value}{ESCAPE}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_fg_value(value[k], False)}" for k in sorted(value)) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_fg_value(v, False) for v in value) + "]"
    return json.dumps(value)


def _fg_response(text: str) -> str:
    """A tool result: a JSON object's fields, or the text under ``value``."""
    try:
        value = json.loads(text)
    except ValueError:
        value = text
    return _fg_value(value if isinstance(value, dict) else {"value": value})


def _fg_schema(schema: Mapping) -> str:
    """One property's schema: description, then per type enum / properties / items, then type."""
    parts = []
    if "description" in schema:
        parts.append(f"description:{_fg_value(str(schema['description']))}")
    kind = str(schema.get("type", "")).upper()
    if kind == "STRING" and "enum" in schema:
        parts.append(f"enum:{_fg_value(list(schema['enum']))}")
    if kind == "OBJECT":
        if "properties" in schema:
            parts.append(f"properties:{_fg_properties(schema['properties'])}")
        if schema.get("required"):
            parts.append(f"required:{_fg_value(list(schema['required']))}")
    if kind == "ARRAY" and isinstance(schema.get("items"), Mapping):
        parts.append(f"items:{{{_fg_schema(schema['items'])}}}")
    if kind:
        parts.append(f"type:{_fg_value(kind)}")
    return ",".join(parts)


def _fg_properties(properties: Mapping) -> str:
    return "{" + ",".join(f"{k}:{{{_fg_schema(properties[k])}}}" for k in sorted(properties)
                          if isinstance(properties[k], Mapping)) + "}"


def _fg_declaration(tool: Tool) -> str:
    parts = [f"description:{_fg_value(tool.description or '')}"]
    if tool.parameters:
        schema = {**tool.parameters, "type": tool.parameters.get("type", "object")}
        parts.append("parameters:{" + _fg_schema({k: v for k, v in schema.items()
                                                   if k != "description"}) + "}")
    return f"declaration:{tool.name}{{{','.join(parts)}}}"


class _FGReader:
    """Reads FunctionGemma's argument syntax back into JSON values; ValueError if malformed."""

    _SCALAR = re.compile(r"[^,}\]]*")

    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def read(self):
        value = self._value()
        if self.pos != len(self.text):
            raise ValueError("trailing text")
        return value

    def _value(self):
        text = self.text
        if text.startswith(ESCAPE, self.pos):
            end = text.find(ESCAPE, self.pos + len(ESCAPE))
            if end < 0:
                raise ValueError("unterminated <escape>")
            value, self.pos = text[self.pos + len(ESCAPE):end], end + len(ESCAPE)
            return value
        if text.startswith("{", self.pos):
            return dict(self._items("}", keyed=True))
        if text.startswith("[", self.pos):
            return [v for _, v in self._items("]", keyed=False)]
        scalar = self._SCALAR.match(text, self.pos).group(0)
        self.pos += len(scalar)
        word = scalar.strip()
        if word in _PY_NAMES:
            return _PY_NAMES[word]
        try:
            return json.loads(word)
        except ValueError:
            return word  # an unescaped string, as the model sometimes writes one

    def _items(self, close: str, keyed: bool):
        self.pos += 1
        if self.text.startswith(close, self.pos):
            self.pos += 1
            return
        while True:
            key = None
            if keyed:
                colon = self.text.find(":", self.pos)
                if colon < 0:
                    raise ValueError("a key without ':'")
                key, self.pos = self.text[self.pos:colon].strip(), colon + 1
            yield key, self._value()
            if self.text.startswith(",", self.pos):
                self.pos += 1
            elif self.text.startswith(close, self.pos):
                self.pos += 1
                return
            else:
                raise ValueError(f"expected ',' or {close!r} at {self.pos}")


# -- picking the dialect --------------------------------------------------------------------------

GEMMA3 = Gemma3Format()
FUNCTION_GEMMA = FunctionGemmaFormat()


def chat_format_for(tokenizer) -> Gemma3Format:
    """FunctionGemma's format when the tokenizer has its call token, else Gemma 3's."""
    token_to_id = getattr(tokenizer, "token_to_id", None)
    if token_to_id is not None and token_to_id(CALL_START) is not None:
        return FUNCTION_GEMMA
    return GEMMA3


def render_chat(messages: Sequence[Mapping], add_generation_prompt: bool = True,
                tools: Sequence[Tool] | None = None) -> str:
    """The Gemma 3 chat prompt (no BOS): the official template for plain chats. Like it, turn
    text is stripped (system text is not) and text parts are concatenated; unlike it, a
    multi-part system message keeps all its parts, and non-text parts (images) are refused."""
    return GEMMA3.render(messages, add_generation_prompt, tools)
