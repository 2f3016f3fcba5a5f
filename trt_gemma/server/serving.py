"""From a validated request to engine requests and back: prompts, limits, params, deltas, usage.

Shared by both endpoints: the per-endpoint modules (completions.py, chat.py) only say how a prompt
is built and how choices, chunks and logprobs are shaped. The engine yields cumulative snapshots
(text and token ids so far, per sample); ``SampleDelta`` turns them into what is new, which is
what a stream sends and what latency metrics count.

Sampling fields a request leaves unset take the checkpoint's generation_config defaults
(``EngineClient.generation_defaults``, vLLM's ``--generation-config auto``), then OpenAI's.
A structured-output constraint may come from one of several fields (``response_format``,
``structured_outputs``, ``guided_json``/``_regex``/``_choice``/``_grammar``); exactly one is
allowed, and it is compiled before the request is admitted, so a schema that does not compile is
a 400 naming the field it came from.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from trt_gemma.errors import ConfigError
from trt_gemma.outputs import CompletionOutput, Logprob, RequestOutput
from trt_gemma.sampling_params import SamplingParams, StructuredOutputsParams
from trt_gemma.server.engine_client import EngineClient
from trt_gemma.server.errors import APIError
from trt_gemma.server.metrics import RequestTimer, ServerMetrics
from trt_gemma.server.protocol import ChatCompletionRequest, CompletionRequest, Usage

# Below this a temperature only divides logits into overflow: treat it as greedy (vLLM does too).
GREEDY_TEMPERATURE = 1e-5
# Where no request field and no generation_config says otherwise (OpenAI's and vLLM's defaults).
PLAIN_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
                  "repetition_penalty": 1.0}
# SamplingParams.extra keys the server sets for itself
CONSTRAINT_PARAM = "constraint_param"  # the request field a structured-output constraint came from
REPORTED_STOP_IDS = "reported_stop_ids"  # stop token ids reported as stop_reason (vLLM's rule)
_KEEP = object()  # sampling_params(structured=...) not given: take the request's own constraint


@dataclass
class Prompt:
    ids: list[int]
    text: str | None = None  # what the client sent as text (echo), None for token ids


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def check_prompt(client: EngineClient, prompt: Prompt, max_tokens: int | None,
                 prompt_param: str) -> int:
    """The max_tokens to use for this prompt, or a 400 naming what does not fit the context."""
    limit = client.max_model_len
    n = len(prompt.ids)
    if n == 0:
        raise APIError(400, "the prompt is empty", param=prompt_param)
    if min(prompt.ids) < 0 or max(prompt.ids) >= client.vocab_size:
        raise APIError(400, f"prompt token ids must be in [0, {client.vocab_size})",
                       param=prompt_param)
    if n >= limit:
        raise APIError(
            400, f"this model's maximum context length is {limit} tokens, but the prompt has "
            f"{n} tokens (and at least one token must be generated)",
            param=prompt_param, code="context_length_exceeded",
        )
    if max_tokens is None:
        return limit - n
    if n + max_tokens > limit:
        raise APIError(
            400, f"this model's maximum context length is {limit} tokens; the prompt has {n} "
            f"tokens and max_tokens asks for {max_tokens} more ({n + max_tokens} in total)",
            param="max_tokens", code="context_length_exceeded",
        )
    return max_tokens


def structured_outputs(req: CompletionRequest | ChatCompletionRequest
                       ) -> tuple[StructuredOutputsParams | None, str | None]:
    """The request's structured-output constraint and the field it came from (None, None: none).

    More than one constraining field is a 400 naming the second: which one should win is the
    client's decision, not ours.
    """
    found: list[tuple[str, dict]] = []
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append(("response_format", {"json_object": True}))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise APIError(400, "response_format: type 'json_schema' needs json_schema.schema",
                           param="response_format")
        options = {} if fmt.json_schema.strict is not False else {"strict": False}
        found.append(("response_format", {"json": fmt.json_schema.schema_, **options}))
    so = req.structured_outputs
    if so is not None:
        given = {k: v for k, v in (("json", so.json_), ("regex", so.regex), ("choice", so.choice),
                                   ("grammar", so.grammar)) if v is not None}
        if so.json_object:
            given["json_object"] = True
        if len(given) != 1:
            raise APIError(400, "structured_outputs takes exactly one of json, regex, choice, "
                           f"grammar, json_object; got {sorted(given) or 'none'}",
                           param="structured_outputs")
        if so.disable_any_whitespace:  # only set when asked: the default needs no option
            given["disable_any_whitespace"] = True
        found.append(("structured_outputs", given))
    for field, key in (("guided_json", "json"), ("guided_regex", "regex"),
                       ("guided_choice", "choice"), ("guided_grammar", "grammar")):
        value = getattr(req, field)
        if value is not None:
            found.append((field, {key: value}))
    if not found:
        return None, None
    if len(found) > 1:
        names = " and ".join(f for f, _ in found)
        raise APIError(400, f"only one structured output constraint per request; got {names}",
                       param=found[1][0])
    field, kwargs = found[0]
    if isinstance(kwargs.get("json"), str):  # a schema sent as JSON text
        try:
            kwargs["json"] = json.loads(kwargs["json"])
        except json.JSONDecodeError as e:
            raise APIError(400, f"{field}: the schema is not valid JSON ({e})",
                           param=field) from None
    try:
        return StructuredOutputsParams(**kwargs), field
    except ConfigError as e:
        raise APIError(400, f"{field}: {e}", param=field) from e


def reported_stop_ids(client: EngineClient, req: CompletionRequest | ChatCompletionRequest
                      ) -> frozenset[int]:
    """Stop ids whose hit is reported as ``stop_reason``: the request's own, unless they are the
    model's end-of-sequence ids (vLLM reports None for EOS, which wins over stop_token_ids)."""
    asked = frozenset(req.stop_token_ids or ())
    return asked if req.ignore_eos else asked - frozenset(client.tokenizer.stop_token_ids)


def sampling_params(client: EngineClient, req: CompletionRequest | ChatCompletionRequest,
                    max_tokens: int, logprobs: int | None,
                    extra_stop_ids: frozenset[int] = frozenset(),
                    structured=_KEEP, structured_param: str | None = None) -> SamplingParams:
    """The engine's SamplingParams for a request. ``structured``: a constraint that replaces the
    request's own (tool calling builds one), with ``structured_param`` the field to blame."""
    if req.n > client.max_num_seqs:
        raise APIError(400, f"n ({req.n}) exceeds the server's --max-num-seqs "
                       f"({client.max_num_seqs})", param="n")
    stop_ids = req.stop_token_ids or []
    if any(not 0 <= t < client.vocab_size for t in stop_ids):
        raise APIError(400, f"stop_token_ids must be in [0, {client.vocab_size})",
                       param="stop_token_ids")
    if structured is _KEEP:
        structured, structured_param = structured_outputs(req)
    defaults = {**PLAIN_DEFAULTS, **getattr(client, "generation_defaults", {})}

    def pick(name: str):
        value = getattr(req, name)
        return defaults[name] if value is None else value

    temperature, top_k = pick("temperature"), pick("top_k")
    extra = {REPORTED_STOP_IDS: reported_stop_ids(client, req)}
    if structured is not None:
        extra[CONSTRAINT_PARAM] = structured_param
    try:
        return SamplingParams(
            n=req.n,
            temperature=0.0 if temperature < GREEDY_TEMPERATURE else temperature,
            top_p=pick("top_p"),
            top_k=0 if top_k >= client.vocab_size else top_k,
            min_p=pick("min_p"),
            repetition_penalty=pick("repetition_penalty"),
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            seed=req.seed,
            max_tokens=max_tokens,
            min_tokens=req.min_tokens,
            stop=req.stop_strings(),
            stop_token_ids=tuple(sorted(set(stop_ids) | extra_stop_ids)),
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=req.skip_special_tokens,
            structured_outputs=structured,
            extra=extra,
        )
    except ConfigError as e:  # "SamplingParams.min_tokens must be ..." -> param min_tokens
        param = str(e).split()[0].removeprefix("SamplingParams.")
        raise APIError(400, str(e), param=param) from e


async def check_structured_outputs(client: EngineClient, params: SamplingParams) -> None:
    """Compile the request's constraint (or find it in the engine's cache) off the event loop;
    one that does not compile is a 400 naming the field it came from. Call it before answering:
    once a stream has started, an error can only be an event in it."""
    if params.structured_outputs is None:
        return
    param = params.extra.get(CONSTRAINT_PARAM)
    try:
        await client.check_structured_outputs(params.structured_outputs)
    except ConfigError as e:  # trt_gemma.guided.GrammarError names the problem
        message = str(e)
        if param and not message.startswith(param):
            message = f"{param}: {message}"
        raise APIError(400, message, param=param) from e


def check_supported(req: CompletionRequest | ChatCompletionRequest) -> None:
    refused = req.unsupported()
    if refused is not None:
        raise APIError(400, refused[1], param=refused[0])


@dataclass
class SampleDelta:
    """What one snapshot added to one sample."""

    text: str
    token_ids: list[int]
    logprobs: list[tuple[int, dict[int, Logprob]]]  # (token id, its entry) of new tokens
    finish_reason: str | None  # set once, on the snapshot that finished the sample
    # with finish_reason "stop": the stop string or the request's stop token id that ended it,
    # None for end of sequence (vLLM's stop_reason)
    stop_reason: int | str | None = None


@dataclass
class SampleState:
    """What was already reported of one sample (one choice)."""

    text_len: int = 0
    num_tokens: int = 0
    finished: bool = False
    text_offset: int = 0  # completions logprobs: characters before the next token

    def advance(self, out: CompletionOutput) -> SampleDelta | None:
        if self.finished:
            return None
        text = out.text[self.text_len:]
        new_ids = out.token_ids[self.num_tokens:]
        finish = out.finish_reason
        # A stop token ends the sample but is not part of the answer: no text, no logprob. (A
        # stop string leaves a str stop_reason; a token leaves its id, or None where it is EOS.)
        scored = len(out.token_ids)
        if finish == "stop" and not isinstance(out.stop_reason, str):
            scored -= 1
        entries = []
        if out.logprobs is not None:
            ids = out.token_ids[self.num_tokens:scored]
            entries = list(zip(ids, out.logprobs[self.num_tokens:scored]))
        if not text and not new_ids and finish is None:
            return None
        self.text_len, self.num_tokens = len(out.text), len(out.token_ids)
        self.finished = finish is not None
        return SampleDelta(text, new_ids, entries, finish,
                           out.stop_reason if finish is not None else None)


def token_text(client: EngineClient, token_id: int, entry: Logprob | None) -> str:
    if entry is not None and entry.decoded is not None:
        return entry.decoded
    return client.tokenizer.decode([token_id], skip_special_tokens=False)


def token_bytes(client: EngineClient, token_id: int, text: str) -> list[int]:
    """UTF-8 bytes of a token; a byte-fallback token (<0xE2>) is its one byte, not U+FFFD."""
    if token_id in getattr(client.tokenizer, "byte_ids", ()):
        piece = client.tokenizer.backend.id_to_token(token_id) or ""
        if piece.startswith("<0x") and piece.endswith(">"):
            return [int(piece[3:-1], 16)]
    return list(text.encode("utf-8"))


def top_entries(entry: dict[int, Logprob], n: int) -> list[Logprob]:
    return sorted(entry.values(), key=lambda lp: lp.logprob, reverse=True)[:n]


def usage(outputs: list[RequestOutput | None]) -> Usage:
    prompt = sum(len(o.prompt_token_ids) for o in outputs if o is not None)
    completion = sum(len(c.token_ids) for o in outputs if o is not None for c in o.outputs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=prompt + completion)


async def generate_all(client: EngineClient, metrics: ServerMetrics, prompts: list[Prompt],
                       params: SamplingParams, request_id: str,
                       arrival: float) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, snapshot) of every prompt's engine request, merged in arrival order.

    One task per prompt feeds a queue. Leaving early (client gone, error) aborts every engine
    request still running, synchronously, in ``finally``: a cancelled consumer cannot await.
    """
    reported = params.extra.get(REPORTED_STOP_IDS, frozenset())
    queue: asyncio.Queue = asyncio.Queue()
    unfinished = {f"{request_id}-{i}" for i in range(len(prompts))}
    timers = [RequestTimer(metrics, arrival) for _ in prompts]

    async def feed(index: int, engine_id: str, prompt: Prompt) -> None:
        try:
            async for output in client.generate(prompt.ids, params, engine_id):
                await queue.put((index, output, None))
        except BaseException as e:  # noqa: BLE001 - surfaced to the consumer below
            await queue.put((index, None, e))
            if isinstance(e, asyncio.CancelledError):
                raise

    tasks = [asyncio.create_task(feed(i, f"{request_id}-{i}", p)) for i, p in enumerate(prompts)]
    seen = [[0] * params.n for _ in prompts]  # tokens per sample, for the latency metrics
    try:
        while unfinished:
            index, output, error = await queue.get()
            if error is not None:
                raise error
            now = time.perf_counter()
            num_new = 0  # per sample; the samples of one request advance in lockstep
            for c in output.outputs:
                num_new = max(num_new, len(c.token_ids) - seen[index][c.index])
                seen[index][c.index] = len(c.token_ids)
            timers[index].tokens(now, num_new)
            output.outputs = [_vllm_stop_reason(c, reported) for c in output.outputs]
            if output.finished:
                unfinished.discard(f"{request_id}-{index}")
                timers[index].finished(now, [c.finish_reason for c in output.outputs])
                metrics.observe_stages(output.metrics)  # queue, prefill, decode times
            yield index, output
    finally:
        for engine_id in unfinished:
            client.abort(engine_id)
            metrics.requests.labels("abort").inc()
        for task in tasks:
            task.cancel()


def _vllm_stop_reason(out: CompletionOutput, reported: frozenset[int]) -> CompletionOutput:
    """The engine reports every stop token; the API reports only the request's own stop ids."""
    if isinstance(out.stop_reason, int) and out.stop_reason not in reported:
        return dataclasses.replace(out, stop_reason=None)
    return out


def check_model(name: str | None, served: str) -> None:
    if name is not None and name != served:
        raise APIError(404, f"the model {name!r} does not exist; this server serves {served!r}",
                       param="model", code="model_not_found")


def created() -> int:
    return int(time.time())
