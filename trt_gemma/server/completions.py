"""POST /v1/completions: one engine request per prompt, ``n`` choices each, streamed or whole.

Choice ``i * n + j`` is sample j of prompt i, as OpenAI numbers them. Logprobs use the legacy
completions shape (tokens, token_logprobs, top_logprobs, text_offset); ``echo`` prepends the
prompt's text to each choice (its first chunk when streaming). A finished choice carries vLLM's
``stop_reason`` (the stop string or requested stop token id that ended it, else null).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi.responses import JSONResponse, Response

from trt_gemma.server import responsible, serving
from trt_gemma.server.engine_client import EngineClient
from trt_gemma.server.errors import APIError
from trt_gemma.server.metrics import ServerMetrics
from trt_gemma.server.protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from trt_gemma.server.serving import Prompt, SampleDelta, SampleState
from trt_gemma.server.sse import EventStream, with_done


def _prompts(client: EngineClient, prompt, add_special_tokens: bool = True) -> list[Prompt]:
    def encode(text: str) -> list[int]:  # add_special_tokens=False: no <bos> (vLLM's field)
        return client.tokenizer.encode(text, add_bos=None if add_special_tokens else False)

    if isinstance(prompt, str):
        return [Prompt(encode(prompt), prompt)]
    if not prompt:
        raise APIError(400, "prompt: the list is empty", param="prompt")
    if isinstance(prompt[0], int):
        return [Prompt(list(prompt))]
    if isinstance(prompt[0], str):
        return [Prompt(encode(p), p) for p in prompt]
    return [Prompt(list(ids)) for ids in prompt]


def _logprobs(client: EngineClient, delta: SampleDelta, state: SampleState,
              top_n: int) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for token_id, entry in delta.logprobs:
        chosen = entry.get(token_id)
        text = serving.token_text(client, token_id, chosen)
        out.tokens.append(text)
        out.token_logprobs.append(chosen.logprob if chosen is not None else None)
        out.top_logprobs.append({serving.token_text(client, lp.token_id, lp): lp.logprob
                                 for lp in serving.top_entries(entry, top_n)})
        out.text_offset.append(state.text_offset)
        state.text_offset += len(text)
    return out


def _choice(client: EngineClient, req: CompletionRequest, i: int, j: int, delta: SampleDelta,
            state: SampleState) -> CompletionChoice:
    return CompletionChoice(
        index=i * req.n + j, text=delta.text, finish_reason=delta.finish_reason,
        stop_reason=delta.stop_reason,
        logprobs=None if req.logprobs is None else _logprobs(client, delta, state, req.logprobs),
    )


def _merge(parts: list[CompletionChoice]) -> CompletionChoice:
    """The whole choice from its streamed parts (the non-streaming answer)."""
    logprobs = None
    if parts[0].logprobs is not None:
        logprobs = CompletionLogprobs()
        for part in parts:
            for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                getattr(logprobs, name).extend(getattr(part.logprobs, name))
    return CompletionChoice(index=parts[0].index, text="".join(p.text for p in parts),
                            logprobs=logprobs, finish_reason=parts[-1].finish_reason,
                            stop_reason=parts[-1].stop_reason)


async def create_completion(req: CompletionRequest, client: EngineClient,
                            metrics: ServerMetrics, model_name: str,
                            guard: responsible.ResponsibleServing | None = None) -> Response:
    arrival = time.perf_counter()
    serving.check_model(req.model, model_name)
    serving.check_supported(req)
    prompts = _prompts(client, req.prompt, req.add_special_tokens)
    limits = [serving.check_prompt(client, p, req.max_tokens, "prompt") for p in prompts]
    # One SamplingParams for all prompts: max_tokens=None means "to the end of the context",
    # which is the tightest of the prompts' limits.
    params = serving.sampling_params(client, req, min(limits), req.logprobs)
    await serving.check_structured_outputs(client, params)
    user_texts = [p.text if p.text is not None else client.tokenizer.decode(p.ids)
                  for p in prompts]
    await responsible.screen_prompts(guard, user_texts, "prompt", metrics)
    reservation = client.admit(len(prompts) * req.n)
    request_id, created = serving.new_id("cmpl"), serving.created()
    states = {(i, j): SampleState() for i in range(len(prompts)) for j in range(req.n)}
    finals: list = [None] * len(prompts)  # each prompt's last snapshot, for usage

    async def choices() -> AsyncIterator[CompletionChoice]:
        """Every choice's echo, then its parts as the engine produces them."""
        for (i, j) in states if req.echo else ():
            p = prompts[i]
            text = p.text if p.text is not None else client.tokenizer.decode(p.ids)
            yield CompletionChoice(index=i * req.n + j, text=text)
        outputs = responsible.screened_outputs(
            guard, serving.generate_all(client, metrics, prompts, params, request_id, arrival),
            user_texts, req.n, stream=req.stream, metrics=metrics)
        async with aclosing(outputs) as stream:
            async for i, out in stream:
                finals[i] = out
                for sample in out.outputs:
                    state = states[(i, sample.index)]
                    delta = state.advance(sample)
                    if delta is not None:
                        yield _choice(client, req, i, sample.index, delta, state)

    if not req.stream:
        parts: dict[int, list[CompletionChoice]] = {i * req.n + j: [] for (i, j) in states}
        try:
            async with aclosing(choices()) as stream:
                async for part in stream:
                    parts[part.index].append(part)
        finally:
            reservation.release()
        body = CompletionResponse(
            id=request_id, created=created, model=model_name,
            choices=[_merge(p) for _, p in sorted(parts.items()) if p], usage=serving.usage(finals),
        )
        return JSONResponse(body.model_dump(mode="json"))

    async def chunks() -> AsyncIterator[CompletionChunk]:
        async with aclosing(choices()) as stream:
            async for part in stream:
                yield CompletionChunk(id=request_id, created=created, model=model_name,
                                      choices=[part])
        if req.include_usage_in_stream():
            yield CompletionChunk(id=request_id, created=created, model=model_name, choices=[],
                                  usage=serving.usage(finals))

    return EventStream(with_done(chunks()), on_close=reservation.release)
