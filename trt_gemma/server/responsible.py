"""Responsible generation in the server: safety screening of prompts and responses, and the
SynthID-Text detection endpoint.

Screening (``--safety-model``):
- prompts: each prompt (chat: the last user message) is classified before the request is admitted;
  a flagged one is answered 400 with code ``content_filter`` and never reaches the engine.
- responses, non-streaming: each choice is classified once it ends (with its prompt); a flagged
  choice has its text withheld (empty, no logprobs) and ``finish_reason: "content_filter"``.
- responses, streaming: text is released only after it passed screening. Every
  ``stream_screen_tokens`` new tokens (and at the end) the choice's whole response so far is
  classified; if it passes, everything up to there is sent; if it is flagged, the stream sends no
  more text for that choice, only a last chunk with ``finish_reason: "content_filter"`` (text
  already sent had passed an earlier check and stays with the client). So a client sees text in
  bursts of that many tokens, each one screening forward behind generation.
Once every choice of the request has ended or been flagged, the engine requests still running are
aborted. Usage counts the tokens delivered, not those withheld.

Detection (``--watermark-config``): ``POST /v1/watermark/detect`` with ``text`` (a string or a list)
or ``token_ids`` (a list, or a list of lists) scores each with the server's watermark config
(trt_gemma.responsible.detect), tokenized by the served model's tokenizer without BOS.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from trt_gemma.outputs import CompletionOutput, RequestOutput
from trt_gemma.responsible.commands import SCREEN_MODES
from trt_gemma.responsible.detect import detect
from trt_gemma.responsible.safety import Screener
from trt_gemma.responsible.synthid import Watermarker
from trt_gemma.server.errors import APIError

CONTENT_FILTER = "content_filter"


@dataclass
class ResponsibleServing:
    """What the server does beyond generating: screening (a Screener) and watermark detection."""

    watermarker: Watermarker | None = None  # enables /v1/watermark/detect
    screener: Screener | None = None  # enables screening
    screen: str = "both"  # prompts | responses | both
    stream_screen_tokens: int = 32  # streaming: new tokens between two screenings of a response

    def __post_init__(self):
        if self.screen not in SCREEN_MODES:
            raise ValueError(f"--screen must be one of {', '.join(SCREEN_MODES)}")
        if self.stream_screen_tokens < 1:
            raise ValueError("--safety-stream-tokens must be >= 1")

    @property
    def screens_prompts(self) -> bool:
        return self.screener is not None and self.screen in ("prompts", "both")

    @property
    def screens_responses(self) -> bool:
        return self.screener is not None and self.screen in ("responses", "both")


def chat_user_text(messages) -> str:
    """The text a chat request's prompt screening reads: its last user message (text parts)."""
    for message in reversed(messages):
        if message.role == "user":
            return _content_text(message.content)
    return "\n".join(_content_text(m.content) for m in messages)


def _content_text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(str(part.get("text", "")) for part in content if isinstance(part, dict))


async def screen_prompts(guard: ResponsibleServing | None, texts: Sequence[str],
                         param: str, metrics=None) -> None:
    """400 content_filter if any prompt is flagged (nothing was admitted yet)."""
    if guard is None or not guard.screens_prompts:
        return
    verdicts = await guard.screener.screen_prompts(list(texts))
    flagged = [i for i, v in enumerate(verdicts) if v.flagged]
    if metrics is not None and flagged:
        metrics.safety_flagged.labels("prompt").inc(len(flagged))
    if flagged:
        which = "the prompt" if len(texts) == 1 else f"prompt {flagged[0]}"
        raise APIError(400, f"{which} was flagged by the server's content filter",
                       param=param, code=CONTENT_FILTER)


def _held(index: int) -> CompletionOutput:
    return CompletionOutput(index=index, text="", token_ids=[])


async def screened_outputs(guard: ResponsibleServing | None,
                           outputs: AsyncIterator[tuple[int, RequestOutput]],
                           user_prompts: Sequence[str], num_samples: int, *, stream: bool,
                           metrics=None) -> AsyncIterator[tuple[int, RequestOutput]]:
    """``serving.generate_all``'s snapshots with response screening applied (see the module
    docstring); passes them through untouched when responses are not screened."""
    if guard is None or not guard.screens_responses:
        async with aclosing(outputs) as source:
            async for item in source:
                yield item
        return
    every = guard.stream_screen_tokens if stream else None
    released: dict[tuple[int, int], CompletionOutput] = {}  # last snapshot that passed
    frozen: dict[tuple[int, int], CompletionOutput] = {}  # flagged: what the client keeps
    done: set[tuple[int, int]] = set()
    expected = len(user_prompts) * num_samples
    async with aclosing(outputs) as source:
        async for i, out in source:
            due = []
            for c in out.outputs:
                key = (i, c.index)
                if key in frozen:
                    continue
                shown = len(released[key].token_ids) if key in released else 0
                if c.finished or (every is not None and len(c.token_ids) - shown >= every):
                    due.append(c)
            passing = [c for c in due if not c.text.strip()]  # nothing to classify
            to_check = [c for c in due if c.text.strip()]
            if to_check:
                verdicts = await guard.screener.screen_responses(
                    [(user_prompts[i], c.text) for c in to_check])
                for c, verdict in zip(to_check, verdicts, strict=True):
                    if not verdict.flagged:
                        passing.append(c)
                        continue
                    key = (i, c.index)
                    kept = released.get(key, _held(c.index))
                    frozen[key] = dataclasses.replace(kept, finish_reason=CONTENT_FILTER,
                                                      stop_reason=None)
                    done.add(key)
                    if metrics is not None:
                        metrics.safety_flagged.labels("response").inc()
            for c in passing:  # a copy: a fake or future engine may reuse its lists
                released[(i, c.index)] = dataclasses.replace(c, token_ids=list(c.token_ids))
                if c.finished:
                    done.add((i, c.index))
            shown = [frozen.get((i, c.index)) or released.get((i, c.index)) or _held(c.index)
                     for c in out.outputs]
            yield i, dataclasses.replace(out, outputs=shown)
            if len(done) == expected:
                return  # leaving aborts whatever the engine still runs for flagged choices


# ---- /v1/watermark/detect ------------------------------------------------------------------------


class WatermarkDetectRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str | None = None
    text: str | list[str] | None = None
    token_ids: list[int] | list[list[int]] | None = None
    # tokens from the first of these on are not scored (the reference's EOS mask); default: the
    # model's end-of-sequence ids
    eos_token_ids: list[int] | None = Field(None, max_length=64)


class WatermarkScore(BaseModel):
    index: int
    score: float | None  # weighted mean g-value; None when nothing could be scored
    mean_score: float | None
    num_scored_tokens: int
    z_score: float
    p_value: float


class WatermarkDetectResponse(BaseModel):
    object: Literal["watermark.detection"] = "watermark.detection"
    ngram_len: int
    depth: int
    data: list[WatermarkScore]


def _sequences(body: WatermarkDetectRequest, tokenizer, vocab_size: int) -> list[list[int]]:
    if (body.text is None) == (body.token_ids is None):
        raise APIError(400, "give exactly one of text and token_ids", param="text")
    if body.text is not None:
        texts = [body.text] if isinstance(body.text, str) else body.text
        if not texts:
            raise APIError(400, "text: the list is empty", param="text")
        return [tokenizer.encode(t, add_bos=False) for t in texts]
    ids = body.token_ids
    if not ids:
        raise APIError(400, "token_ids: the list is empty", param="token_ids")
    sequences = [ids] if isinstance(ids[0], int) else ids
    if any(not 0 <= t < vocab_size for s in sequences for t in s):
        raise APIError(400, f"token_ids must be in [0, {vocab_size})", param="token_ids")
    return sequences


def add_routes(app: FastAPI, guard: ResponsibleServing | None, client, model_name: str) -> None:
    """Register /v1/watermark/detect when the server has a watermark config."""
    if guard is None or guard.watermarker is None:
        return
    watermarker = guard.watermarker

    @app.post("/v1/watermark/detect")
    async def watermark_detect(body: WatermarkDetectRequest) -> JSONResponse:
        if body.model is not None and body.model != model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves "
                           f"{model_name!r}", param="model", code="model_not_found")
        sequences = _sequences(body, client.tokenizer, client.vocab_size)
        eos = (body.eos_token_ids if body.eos_token_ids is not None
               else sorted(client.tokenizer.stop_token_ids))

        def score_all() -> list[WatermarkScore]:
            scores = []
            for k, ids in enumerate(sequences):
                r = detect(watermarker, ids, eos_token_ids=eos)
                scored = r.num_scored_tokens > 0
                scores.append(WatermarkScore(
                    index=k, score=r.score if scored else None,
                    mean_score=r.mean_score if scored else None,
                    num_scored_tokens=r.num_scored_tokens, z_score=r.z_score,
                    p_value=r.p_value))
            return scores

        data = await asyncio.to_thread(score_all)
        config = watermarker.config
        body_out = WatermarkDetectResponse(ngram_len=config.ngram_len, depth=config.depth,
                                           data=data)
        return JSONResponse(body_out.model_dump(mode="json"))


# ---- from `trt-gemma serve` flags ------------------------------------------------------------


def uses_responsible(args) -> bool:
    return args.watermark_config is not None or args.safety_model is not None


def engine_watermark_option(args) -> dict:
    """Engine config entries for --watermark-config: {"watermark": WatermarkConfig} when the
    runtime's EngineConfig takes one; else only detection is served, and the log says so."""
    if args.watermark_config is None:
        return {}
    import logging

    from trt_gemma.responsible.synthid import WatermarkConfig
    from trt_gemma.runtime.config import EngineConfig

    config = WatermarkConfig.from_json(args.watermark_config)
    if "watermark" in {f.name for f in dataclasses.fields(EngineConfig)}:
        return {"watermark": config}
    logging.getLogger("trt_gemma.server").warning(
        "--watermark-config: this engine's sampler does not watermark yet; only "
        "/v1/watermark/detect is served")
    return {}


def build_guard(args, client) -> ResponsibleServing | None:
    """The ResponsibleServing for serve's flags, once the served model is loaded."""
    from trt_gemma.errors import ConfigError

    if not uses_responsible(args):
        return None
    watermarker = screener = None
    if args.watermark_config is not None:
        from trt_gemma.responsible.synthid import WatermarkConfig

        watermarker = Watermarker(WatermarkConfig.from_json(args.watermark_config))
    if args.safety_model is not None:
        from trt_gemma.responsible.safety import SafetyClassifier, SafetyPolicy

        policy = SafetyPolicy.from_file(args.safety_policy) if args.safety_policy else None
        if args.safety_model == "self":
            model = getattr(getattr(client.engine, "engine", None), "model", None)
            if model is None:
                raise ConfigError("--safety-model self needs the native engine (this one has no "
                                  "model in the process); give a classifier source instead")
            tokenizer = client.tokenizer
        else:
            from trt_gemma.loader import load_model

            device = args.device or "cpu"
            model, tokenizer = load_model(args.safety_model, dtype=args.dtype, device=device,
                                          verify=not args.no_verify)
        screener = Screener(SafetyClassifier(model, tokenizer), policy, args.safety_threshold)
    elif args.safety_policy is not None:
        raise ConfigError("--safety-policy needs --safety-model")
    try:
        return ResponsibleServing(watermarker, screener, args.screen, args.safety_stream_tokens)
    except ValueError as e:
        raise ConfigError(str(e)) from None
