"""Request and response bodies of the OpenAI API (the part a text model serves), in pydantic.

Requests are validated strictly (no "10" for 10, no true for 1.0, no NaN): a malformed request is
the client's bug and deserves a 400 naming the field, not a guess.

No field is silently ignored. Every field of OpenAI's Completions and Chat Completions request
schemas and of vLLM's extensions to them is declared here and is either honoured, accepted with a
documented lack of effect on the output (metadata such as ``user``), or refused with a 400 naming
it (``unsupported``), where a value would change the output in a way we cannot produce. A field
neither OpenAI nor vLLM knows is refused as OpenAI does ("Unrecognized request argument supplied:
X"). The whole table, field by field, is docs/api-fields.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from trt_gemma.sampling_params import MAX_LOGPROBS

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_N = 128  # samples per prompt; the engine's max_num_seqs bounds it further
MAX_STOP_STRINGS = 16


class _Request(BaseModel):
    # extra="forbid": an unknown field is a 400 naming it (errors.py words it as OpenAI does)
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


# What a refused field may hold and still be honoured (its "off" values). ``_refusal`` walks a
# table of (field, accepted, why) and names the first field whose value is outside it.
def _unset(v) -> bool:
    return v is None


def _empty(v) -> bool:
    return not v


def _off(v) -> bool:
    return v is None or v is False


def _refusal(req: BaseModel,
             table: tuple[tuple[str, Callable[[Any], bool], str], ...]) -> tuple[str, str] | None:
    for name, accepted, why in table:
        value = getattr(req, name)
        if not accepted(value):
            return name, f"{name}: {why}"
    return None


class StreamOptions(_Request):
    include_usage: bool | None = False
    include_obfuscation: bool | None = None  # accepted: stream padding, no effect on content
    continuous_usage_stats: bool | None = False  # vLLM: refused when true

    def unsupported(self) -> tuple[str, str] | None:
        if self.continuous_usage_stats:
            return ("stream_options.continuous_usage_stats",
                    "stream_options.continuous_usage_stats is not supported (usage comes once, "
                    "in the last chunk, with include_usage)")
        return None


class JSONSchemaFormat(_Request):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False,
                              populate_by_name=True)
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    # the schema is always enforced; strict (the default) also forbids properties and items the
    # schema does not name, false allows what JSON Schema allows (xgrammar's strict_mode)
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputsRequest(_Request):
    """vLLM's ``structured_outputs`` body field: exactly one constraint, plus backend options."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_fallback: bool = False  # accepted: we never fall back to another backend
    disable_any_whitespace: bool = False  # honoured: compact JSON
    disable_additional_properties: bool = False  # honoured: true is strict JSON (our default)
    whitespace_pattern: str | None = None
    structural_tag: str | None = None
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False,
                              populate_by_name=True)

    REFUSED: ClassVar[tuple] = (
        ("whitespace_pattern", _unset, "is not supported"),
        ("structural_tag", _unset, "structural tags are not supported"),
    )

    def unsupported(self) -> tuple[str, str] | None:
        refused = _refusal(self, self.REFUSED)
        if refused is not None:
            return f"structured_outputs.{refused[0]}", f"structured_outputs.{refused[1]}"
        return None


class _SamplingRequest(_Request):
    """Fields the two generation endpoints share (OpenAI's, then vLLM's extensions)."""

    model: str | None = None  # None: the one served model
    temperature: float | None = Field(None, ge=0.0, le=2.0)  # OpenAI's range; None: the default
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX - MAX_N)  # + sample index stays int64
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None  # refused unless empty
    user: str | None = None  # accepted: no effect on the output
    # -- vLLM's sampling extensions
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: all tokens
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    use_beam_search: bool = False
    length_penalty: float = 1.0  # beam search only
    include_stop_str_in_output: bool = False
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
    truncation_side: Literal["left", "right"] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    prompt_logprobs: int | None = None
    logprob_token_ids: list[int] | None = None
    # -- structured output: response_format (OpenAI), structured_outputs and the older guided_*
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None  # "xgrammar" or "auto"; others refused
    guided_whitespace_pattern: str | None = None
    structural_tag: str | None = None
    # -- vLLM's other extensions
    priority: int = Field(0, ge=INT64_MIN, le=INT64_MAX)
    request_id: str | None = None  # accepted: no effect on the output
    logits_processors: list[Any] | None = None
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool | None = None
    return_token_offsets: bool | None = None
    cache_salt: str | None = None
    kv_transfer_params: dict[str, Any] | None = None
    ec_transfer_params: dict[str, Any] | None = None
    vllm_xargs: dict[str, Any] | None = None
    repetition_detection: dict[str, Any] | None = None
    thinking_token_budget: int | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    media_io_kwargs: dict[str, Any] | None = None

    # (field, values we honour, why others are refused); checked in this order.
    REFUSED: ClassVar[tuple] = (
        ("logit_bias", _empty, "is not supported"),
        ("use_beam_search", _off, "beam search is not supported"),
        ("length_penalty", lambda v: v == 1.0, "length_penalty only applies to beam search, "
         "which is not supported"),
        ("include_stop_str_in_output", _off, "is not supported (stop strings are never "
         "emitted)"),
        ("spaces_between_special_tokens", lambda v: v is True, "false is not supported"),
        ("truncate_prompt_tokens", _unset, "prompt truncation is not supported; shorten the "
         "prompt"),
        ("truncation_side", _unset, "prompt truncation is not supported"),
        ("allowed_token_ids", _unset, "is not supported"),
        ("bad_words", _empty, "is not supported"),
        ("prompt_logprobs", _unset, "prompt logprobs are not supported"),
        ("logprob_token_ids", _unset, "is not supported"),
        ("guided_decoding_backend", lambda v: v in (None, "auto", "xgrammar"),
         "the only guided decoding backend is 'xgrammar' (or 'auto')"),
        ("guided_whitespace_pattern", _unset, "is not supported"),
        ("structural_tag", _unset, "structural tags are not supported"),
        ("priority", lambda v: v == 0, "priority scheduling is not supported (priority must "
         "be 0)"),
        ("logits_processors", _empty, "custom logits processors are not supported"),
        ("return_tokens_as_token_ids", _off, "is not supported"),
        ("return_token_ids", _off, "is not supported"),
        ("return_token_offsets", _off, "is not supported"),
        ("cache_salt", _unset, "prefix cache salting is not supported"),
        ("kv_transfer_params", _empty, "disaggregated serving is not supported"),
        ("ec_transfer_params", _empty, "disaggregated serving is not supported"),
        ("vllm_xargs", _empty, "no custom extensions are installed"),
        ("repetition_detection", _unset, "is not supported"),
        ("thinking_token_budget", lambda v: v is None or v == -1, "this model does not "
         "reason (no thinking tokens)"),
        ("mm_processor_kwargs", _empty, "this model takes text only"),
        ("media_io_kwargs", _empty, "this model takes text only"),
    )

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def unsupported(self) -> tuple[str, str] | None:
        """(param, why) for a field set to something this server cannot honour."""
        refused = _refusal(self, _SamplingRequest.REFUSED)
        if refused is not None:
            return refused
        if self.stream_options is not None:
            if not self.stream:
                return "stream_options", "stream_options is only allowed when stream is true"
            if (refused := self.stream_options.unsupported()) is not None:
                return refused
        if self.structured_outputs is not None:
            return self.structured_outputs.unsupported()
        return None


class CompletionRequest(_SamplingRequest):
    # text, texts, token ids, or lists of token ids: one generation per prompt
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # None: up to the end of the context
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = False
    best_of: int | None = Field(None, ge=1)  # only best_of == n (no reranking)
    suffix: str | None = None  # refused unless empty (no fill-in-the-middle)
    # vLLM
    add_special_tokens: bool = True  # honoured: False encodes text prompts without <bos>
    prompt_embeds: Any = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.best_of is not None and self.best_of != self.n:
            return "best_of", "best_of other than n is not supported"
        if self.suffix:
            return "suffix", "suffix (fill-in-the-middle) is not supported"
        if self.echo and self.logprobs is not None:
            return "echo", "echo with logprobs needs prompt logprobs, which are not supported"
        if self.prompt_embeds is not None:
            return "prompt_embeds", "prompt_embeds: prompt embeddings are not supported"
        return super().unsupported()


class FunctionDefinition(_Request):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments
    strict: bool | None = None


class ChatTool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ToolCallFunction(_Request):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class MessageToolCall(_Request):
    """A tool call an earlier assistant turn made, sent back in the conversation."""

    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Request):
    role: str  # system | developer | user | assistant | tool; the chat format checks it
    # a string or a list of {"type": "text", "text": ...} parts; the chat format checks the parts
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant turns
    tool_call_id: str | None = None  # tool turns: the call this is the result of
    # OpenAI's other assistant-turn fields: an echoed reply carries them as null
    refusal: str | None = None
    audio: dict[str, Any] | None = None
    function_call: dict[str, Any] | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.refusal is not None:
            return "refusal", "a refusal in an earlier turn is not supported; send it as content"
        if self.audio is not None:
            return "audio", "audio is not supported (this model takes text only)"
        if self.function_call is not None:
            return "function_call", "function_call (deprecated) is not supported; use tool_calls"
        return None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # None: up to the end of the context
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name; wins if set
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[ChatTool] | None = None
    tool_choice: ToolChoice | None = None  # None: "auto" with tools, "none" without
    parallel_tool_calls: bool | None = True
    # OpenAI's other fields
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None  # accepted: a latency hint, never changes output
    functions: list[Any] | None = None
    function_call: Any = None
    metadata: dict[str, str] | None = None  # accepted: no effect on the output
    store: bool | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None
    moderation: dict[str, Any] | None = None
    safety_identifier: str | None = None  # accepted: no effect on the output
    prompt_cache_key: str | None = None  # accepted: a cache routing hint
    prompt_cache_retention: str | None = None  # accepted: a cache lifetime hint
    prompt_cache_options: dict[str, Any] | None = None  # accepted: a cache lifetime hint
    # vLLM's chat extensions
    add_generation_prompt: bool = True
    echo: bool = False
    continue_final_message: bool = False
    add_special_tokens: bool = False
    documents: list[Any] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    include_reasoning: bool = True  # accepted: this model produces no reasoning to include

    CHAT_REFUSED: ClassVar[tuple] = (
        ("audio", _unset, "audio output is not supported"),
        ("modalities", lambda v: v is None or set(v) <= {"text"}, "only the 'text' modality "
         "is supported"),
        ("functions", _empty, "deprecated and not supported; use tools"),
        ("function_call", _unset, "deprecated and not supported; use tool_choice"),
        ("store", _off, "nothing is stored on this server"),
        ("service_tier", lambda v: v in (None, "auto", "default"), "only 'auto' and "
         "'default' are served"),
        ("reasoning_effort", _unset, "this model does not reason"),
        ("verbosity", _unset, "is not supported"),
        ("web_search_options", _unset, "web search is not supported"),
        ("moderation", _unset, "moderation is not supported"),
        ("echo", _off, "echo is not supported on chat completions"),
        ("continue_final_message", _off, "is not supported"),
        ("add_special_tokens", _off, "the chat template already adds <bos>"),
        ("documents", _unset, "documents (RAG) are not supported by the chat format"),
        ("chat_template", _unset, "a per-request chat template is not supported"),
        ("chat_template_kwargs", _empty, "is not supported"),
    )

    def unsupported(self) -> tuple[str, str] | None:
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs set to true"
        refused = _refusal(self, ChatCompletionRequest.CHAT_REFUSED)
        if refused is not None:
            return refused
        for i, message in enumerate(self.messages):
            if (refused := message.unsupported()) is not None:
                return f"messages.{i}.{refused[0]}", f"messages.{i}.{refused[1]}"
        return super().unsupported()

    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# -- responses ----------------------------------------------------------------------------------

class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "trt-gemma"
    max_model_len: int | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]


class CompletionLogprobs(_Response):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # vLLM: the stop string or stop token id that ended it


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Response):
    content: list[ChatTokenLogprob] | None = None


class FunctionCall(_Response):
    name: str
    arguments: str  # JSON text


class ToolCall(_Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # vLLM: the stop string or stop token id that ended it


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaFunctionCall(_Response):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_Response):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class ChatDelta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(_Response):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # on the chunk that finishes the choice


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None  # only on the last chunk, with stream_options.include_usage


class CompletionChunk(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
