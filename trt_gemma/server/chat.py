"""POST /v1/chat/completions: Gemma's chat format, one engine request, ``n`` choices, tool calls.

The chat format (``trt_gemma.chat_format``) renders the messages (a leading system or developer
message folded into the first user turn, tool calls and tool results as the checkpoint's dialect
writes them) and refuses empty lists, unknown roles and broken structure with a ValueError,
answered as 400 on ``messages``. Generation stops on the checkpoint's stop tokens, which include
``<end_of_turn>``; they are added to the request's stop ids so that holds even with ignore_eos.

Tools: ``tool_choice`` "none" leaves them out of the prompt; "auto" (the default with tools) puts
them in and reads a call out of the reply if the model wrote one; "required" or a named function
also constrains the output with the format's call grammar, so it is always a call that parses,
with arguments valid against the function's parameter schema. A reply with calls carries them as
``tool_calls`` with ``finish_reason`` "tool_calls". A stream holds text back only while a call may
be starting (a code fence, or a reply that opens like a bare call) and sends the calls as
OpenAI-style deltas when the reply ends.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from fastapi.responses import JSONResponse, Response

from trt_gemma.chat_format import (
    Gemma3Format,
    ParsedReply,
    Tool,
    chat_format_for,
    new_call_id,
    tools_from_openai,
)
from trt_gemma.sampling_params import StructuredOutputsParams
from trt_gemma.server import responsible, serving
from trt_gemma.server.engine_client import EngineClient
from trt_gemma.server.errors import APIError
from trt_gemma.server.metrics import ServerMetrics
from trt_gemma.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatStreamChoice,
    ChatTokenLogprob,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    NamedToolChoice,
    ToolCall,
    TopLogprob,
)
from trt_gemma.server.serving import Prompt, SampleDelta
from trt_gemma.server.sse import EventStream, with_done


@dataclass(frozen=True)
class ToolPlan:
    """How a request with tools is rendered, constrained and read back."""

    fmt: Gemma3Format  # the checkpoint's chat dialect
    tools: list[Tool]  # put in the prompt
    allowed: list[Tool]  # what a call may name (a named tool_choice: that one)
    parallel: bool  # more than one call allowed
    grammar: str | None  # "required" / named function: the output must be this (EBNF)


def tool_plan(client: EngineClient, req: ChatCompletionRequest) -> ToolPlan | None:
    """None when no call can be made (no tools, or tool_choice "none"); 400s name the field."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice: needs tools", param="tool_choice")
        return None
    try:
        tools = tools_from_openai([t.model_dump(exclude_none=True) for t in req.tools])
    except ValueError as e:
        raise APIError(400, str(e), param="tools") from e
    if choice == "none":
        return None
    allowed = tools
    if isinstance(choice, NamedToolChoice):
        allowed = [t for t in tools if t.name == choice.function.name]
        if not allowed:
            raise APIError(400, f"tool_choice: the function {choice.function.name!r} is not "
                           "among tools", param="tool_choice")
    parallel = req.parallel_tool_calls is not False and not isinstance(choice, NamedToolChoice)
    fmt = chat_format_for(client.tokenizer)
    grammar = None
    if choice not in (None, "auto"):
        try:
            grammar = fmt.call_grammar(allowed, parallel)
        except ValueError as e:
            param = "tool_choice" if str(e).startswith("tool_choice") else "tools"
            raise APIError(400, str(e), param=param) from e
    return ToolPlan(fmt, tools, allowed, parallel, grammar)


def render_prompt(client: EngineClient, req: ChatCompletionRequest,
                  plan: ToolPlan | None) -> Prompt:
    """The token ids the chat endpoint feeds the model (also what /tokenize counts)."""
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    try:
        if plan is None:
            text = client.tokenizer.apply_chat_template(messages, req.add_generation_prompt)
        else:
            text = plan.fmt.render(messages, req.add_generation_prompt, plan.tools)
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from e
    return Prompt(client.tokenizer.encode(text))


def _params(client: EngineClient, req: ChatCompletionRequest, plan: ToolPlan | None,
            max_tokens: int, top_n: int | None):
    stop_ids = client.tokenizer.stop_token_ids
    if plan is None or plan.grammar is None:
        params = serving.sampling_params(client, req, max_tokens, top_n, extra_stop_ids=stop_ids)
    else:
        own, field = serving.structured_outputs(req)
        if own is not None:
            raise APIError(400, f"tool_choice: a required or named tool call cannot be combined "
                           f"with {field}", param="tool_choice")
        params = serving.sampling_params(
            client, req, max_tokens, top_n, extra_stop_ids=stop_ids,
            structured=StructuredOutputsParams(grammar=plan.grammar), structured_param="tools")
    if plan is not None and not plan.fmt.skip_special_tokens:  # FunctionGemma's call tokens
        params = dataclasses.replace(params, skip_special_tokens=False,
                                     stop=(*params.stop, *plan.fmt.stop_strings))
    return params


def _logprobs(client: EngineClient, delta: SampleDelta, top_n: int) -> ChatLogprobs:
    def entry(token_id: int, lp) -> TopLogprob:
        text = serving.token_text(client, token_id, lp)
        return TopLogprob(token=text, logprob=lp.logprob,
                          bytes=serving.token_bytes(client, token_id, text))

    content = []
    for token_id, lps in delta.logprobs:
        chosen = entry(token_id, lps[token_id])
        top = [entry(lp.token_id, lp) for lp in serving.top_entries(lps, top_n)]
        content.append(ChatTokenLogprob(**chosen.model_dump(), top_logprobs=top))
    return ChatLogprobs(content=content)


def _read_reply(plan: ToolPlan, text: str) -> tuple[ParsedReply, list[ToolCall]]:
    parsed = plan.fmt.parse(text, plan.allowed)
    calls = parsed.tool_calls if plan.parallel else parsed.tool_calls[:1]
    return parsed, [ToolCall(id=new_call_id(), function=FunctionCall(
        name=c.name, arguments=c.arguments_json)) for c in calls]


def _finish(reason: str | None, calls: list) -> str | None:
    return "tool_calls" if calls and reason == "stop" else reason


async def create_chat_completion(req: ChatCompletionRequest, client: EngineClient,
                                 metrics: ServerMetrics, model_name: str,
                                 guard: responsible.ResponsibleServing | None = None
                                 ) -> Response:
    arrival = time.perf_counter()
    serving.check_model(req.model, model_name)
    serving.check_supported(req)
    plan = tool_plan(client, req)
    prompt = render_prompt(client, req, plan)
    max_tokens = serving.check_prompt(client, prompt, req.output_limit(), "messages")
    top_n = (req.top_logprobs or 0) if req.logprobs else None
    params = _params(client, req, plan, max_tokens, top_n)
    await serving.check_structured_outputs(client, params)
    user_text = responsible.chat_user_text(req.messages)
    await responsible.screen_prompts(guard, [user_text], "messages", metrics)
    reservation = client.admit(req.n)
    request_id, created = serving.new_id("chatcmpl"), serving.created()
    states = [serving.SampleState() for _ in range(req.n)]
    final: list = [None]  # the last snapshot, for usage

    async def deltas() -> AsyncIterator[tuple[int, SampleDelta]]:
        outputs = responsible.screened_outputs(
            guard, serving.generate_all(client, metrics, [prompt], params, request_id, arrival),
            [user_text], req.n, stream=req.stream, metrics=metrics)
        async with aclosing(outputs) as stream:
            async for _, out in stream:
                final[0] = out
                for sample in out.outputs:
                    delta = states[sample.index].advance(sample)
                    if delta is not None:
                        yield sample.index, delta

    def logprobs(delta: SampleDelta) -> ChatLogprobs | None:
        return None if top_n is None else _logprobs(client, delta, top_n)

    if not req.stream:
        texts: list[list[str]] = [[] for _ in range(req.n)]
        tokens: list[list] = [[] for _ in range(req.n)]
        ends: list[SampleDelta | None] = [None] * req.n
        try:
            async with aclosing(deltas()) as stream:
                async for j, delta in stream:
                    texts[j].append(delta.text)
                    if top_n is not None:
                        tokens[j].extend(logprobs(delta).content)
                    ends[j] = delta
        finally:
            reservation.release()
        choices = []
        for j in range(req.n):
            text, end = "".join(texts[j]), ends[j]
            reason, stop_reason = (end.finish_reason, end.stop_reason) if end else (None, None)
            message = AssistantMessage(content=text)
            if plan is not None:
                parsed, calls = _read_reply(plan, text)
                if calls:
                    message = AssistantMessage(content=parsed.content.strip() or None,
                                               tool_calls=calls)
            choices.append(ChatChoice(
                index=j, message=message, finish_reason=_finish(reason, message.tool_calls),
                logprobs=None if top_n is None else ChatLogprobs(content=tokens[j]),
                stop_reason=stop_reason))
        body = ChatCompletionResponse(id=request_id, created=created, model=model_name,
                                      choices=choices, usage=serving.usage(final))
        return JSONResponse(body.model_dump(mode="json"))

    def chunk(choices: list[ChatStreamChoice], usage=None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=request_id, created=created, model=model_name,
                                   choices=choices, usage=usage)

    texts = [""] * req.n  # with tools: each choice's text so far...
    sent = [0] * req.n  # ...and how much of it went out as content

    def tool_chunks(j: int, delta: SampleDelta) -> list[ChatCompletionChunk]:
        """A delta of a choice that may call a tool: content up to where a call may start;
        at the end, the rest of the content and the calls."""
        texts[j] += delta.text
        text, reason = texts[j], delta.finish_reason
        if reason is None:
            safe = max(sent[j], plan.fmt.hold_from(text))
            piece, sent[j] = text[sent[j]:safe], safe
            if not piece and not delta.logprobs:
                return []
            return [chunk([ChatStreamChoice(index=j, delta=ChatDelta(content=piece or None),
                                            logprobs=logprobs(delta))])]
        parsed, calls = _read_reply(plan, text)
        rest = (parsed.content if calls else text)[sent[j]:]
        out = [chunk([ChatStreamChoice(index=j, delta=ChatDelta(content=rest or None),
                                       logprobs=logprobs(delta))])] if rest or calls else []
        if calls:
            out.append(chunk([ChatStreamChoice(index=j, delta=ChatDelta(tool_calls=[
                DeltaToolCall(index=k, id=c.id, type="function", function=DeltaFunctionCall(
                    name=c.function.name, arguments=c.function.arguments))
                for k, c in enumerate(calls)]))]))
        out.append(chunk([ChatStreamChoice(
            index=j, delta=ChatDelta(), logprobs=None if out else logprobs(delta),
            finish_reason=_finish(reason, calls), stop_reason=delta.stop_reason)]))
        return out

    async def chunks() -> AsyncIterator[ChatCompletionChunk]:
        for j in range(req.n):  # OpenAI opens every choice with the role
            yield chunk([ChatStreamChoice(index=j, delta=ChatDelta(role="assistant", content=""))])
        async with aclosing(deltas()) as stream:
            async for j, delta in stream:
                if plan is not None:
                    for c in tool_chunks(j, delta):
                        yield c
                    continue
                yield chunk([ChatStreamChoice(
                    index=j, delta=ChatDelta(content=delta.text or None),
                    logprobs=logprobs(delta), finish_reason=delta.finish_reason,
                    stop_reason=delta.stop_reason,
                )])
        if req.include_usage_in_stream():
            yield chunk([], usage=serving.usage(final))

    return EventStream(with_done(chunks()), on_close=reservation.release)
