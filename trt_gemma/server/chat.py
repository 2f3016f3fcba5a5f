"""POST /v1/chat/completions: Gemma's chat template, one engine request, ``n`` choices.

The tokenizer renders the messages (a leading system message folded into the first user turn, as
Gemma expects) and refuses empty lists, unknown roles and broken alternation with a ValueError,
answered as 400 on ``messages``. Generation stops on the checkpoint's stop tokens, which include
``<end_of_turn>``; they are added to the request's stop ids so that holds even with ignore_eos.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi.responses import JSONResponse, Response

from trt_gemma.server import serving
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
    TopLogprob,
)
from trt_gemma.server.serving import Prompt, SampleDelta
from trt_gemma.server.sse import EventStream, with_done


def _prompt(client: EngineClient, req: ChatCompletionRequest) -> Prompt:
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    try:
        text = client.tokenizer.apply_chat_template(messages, req.add_generation_prompt)
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from e
    return Prompt(client.tokenizer.encode(text))


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


async def create_chat_completion(req: ChatCompletionRequest, client: EngineClient,
                                 metrics: ServerMetrics, model_name: str) -> Response:
    arrival = time.perf_counter()
    serving.check_model(req.model, model_name)
    serving.check_supported(req)
    prompt = _prompt(client, req)
    max_tokens = serving.check_prompt(client, prompt, req.output_limit(), "messages")
    top_n = (req.top_logprobs or 0) if req.logprobs else None
    params = serving.sampling_params(client, req, max_tokens, top_n,
                                     extra_stop_ids=client.tokenizer.stop_token_ids)
    reservation = client.admit(req.n)
    request_id, created = serving.new_id("chatcmpl"), serving.created()
    states = [serving.SampleState() for _ in range(req.n)]
    final: list = [None]  # the last snapshot, for usage

    async def deltas() -> AsyncIterator[tuple[int, SampleDelta]]:
        outputs = serving.generate_all(client, metrics, [prompt], params, request_id, arrival)
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
        reasons: list[str | None] = [None] * req.n
        try:
            async with aclosing(deltas()) as stream:
                async for j, delta in stream:
                    texts[j].append(delta.text)
                    if top_n is not None:
                        tokens[j].extend(logprobs(delta).content)
                    reasons[j] = delta.finish_reason
        finally:
            reservation.release()
        choices = [
            ChatChoice(index=j, message=AssistantMessage(content="".join(texts[j])),
                       logprobs=None if top_n is None else ChatLogprobs(content=tokens[j]),
                       finish_reason=reasons[j])
            for j in range(req.n)
        ]
        body = ChatCompletionResponse(id=request_id, created=created, model=model_name,
                                      choices=choices, usage=serving.usage(final))
        return JSONResponse(body.model_dump(mode="json"))

    def chunk(choices: list[ChatStreamChoice], usage=None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=request_id, created=created, model=model_name,
                                   choices=choices, usage=usage)

    async def chunks() -> AsyncIterator[ChatCompletionChunk]:
        for j in range(req.n):  # OpenAI opens every choice with the role
            yield chunk([ChatStreamChoice(index=j, delta=ChatDelta(role="assistant", content=""))])
        async with aclosing(deltas()) as stream:
            async for j, delta in stream:
                yield chunk([ChatStreamChoice(
                    index=j, delta=ChatDelta(content=delta.text or None),
                    logprobs=logprobs(delta), finish_reason=delta.finish_reason,
                )])
        if req.include_usage_in_stream():
            yield chunk([], usage=serving.usage(final))

    return EventStream(with_done(chunks()), on_close=reservation.release)
