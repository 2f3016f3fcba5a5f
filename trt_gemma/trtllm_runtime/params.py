"""Our SamplingParams -> the keyword arguments of TensorRT-LLM's ``SamplingParams``.

Pure (no TensorRT-LLM import), so the mapping is testable anywhere. Field names are those of
``tensorrt_llm/sampling_params.py`` (``SamplingParams``, a kw-only dataclass). What the backend
cannot do is refused with a ConfigError naming the field (the server answers 400):

- ``logprobs``: TensorRT-LLM computes them from generation logits, which an engine only returns
  when built and started with ``gather_generation_logits``; we start it without.
- ``structured_outputs``: TensorRT-LLM's guided decoding needs its own tokenizer (xgrammar's
  vocabulary), and this backend skips TensorRT-LLM's tokenizer (we send ids, we detokenize).
- ``n > 1`` with greedy decoding: TensorRT-LLM's LLM API refuses ``best_of > 1`` when greedy.

Stop strings are not passed: they are found in our own detokenized text, exactly as the native
engine does (a token-level match in TensorRT-LLM would miss strings that split differently).
Stop token ids are passed so generation ends on the GPU, and kept in the output
(``include_stop_str_in_output``) because our engine reports them among the generated tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trt_gemma.errors import ConfigError
from trt_gemma.sampling_params import SamplingParams


@dataclass(frozen=True)
class EndTokens:
    """The engine's end/pad ids: ``end_id`` ends generation inside TensorRT-LLM (and, as its
    executor does, is not returned among the tokens); the other stop ids go as
    ``stop_token_ids``."""

    end_id: int
    pad_id: int
    stop_token_ids: frozenset[int]  # every id that ends a turn (end_id included)


def unsupported(params: SamplingParams) -> str | None:
    """Why this backend cannot serve ``params`` (a ConfigError message), or None."""
    if params.logprobs is not None:
        return ("SamplingParams.logprobs is not supported by the TensorRT-LLM backend (its "
                "engines return no generation logits unless built to), got "
                f"{params.logprobs!r}")
    if params.structured_outputs is not None:
        return ("SamplingParams.structured_outputs: structured output is not supported by the "
                "TensorRT-LLM backend")
    if params.n > 1 and params.greedy:
        return (f"SamplingParams.n {params.n} with temperature 0 is not supported by the "
                "TensorRT-LLM backend (its greedy decoding returns one sequence); sample with a "
                "temperature > 0")
    return None


def check_supported(params: SamplingParams) -> None:
    reason = unsupported(params)
    if reason is not None:
        raise ConfigError(reason)


def trtllm_sampling_kwargs(params: SamplingParams, ends: EndTokens,
                           max_tokens: int) -> dict[str, Any]:
    """Keyword arguments for ``tensorrt_llm.SamplingParams`` (``max_tokens``: already clamped
    to what the context holds after the prompt; TensorRT-LLM refuses more)."""
    check_supported(params)
    stop_ids = set(params.stop_token_ids)
    if not params.ignore_eos:
        stop_ids |= ends.stop_token_ids
    stop_ids.discard(ends.end_id)  # end_id ends generation by itself
    kwargs: dict[str, Any] = {
        "end_id": ends.end_id,
        "pad_id": ends.pad_id,
        "max_tokens": max_tokens,
        "n": params.n,
        "stop_token_ids": sorted(stop_ids) or None,
        "include_stop_str_in_output": True,
        "ignore_eos": params.ignore_eos,
        "detokenize": False,  # we detokenize (incrementally, with our stop strings)
        "skip_special_tokens": params.skip_special_tokens,
    }
    if params.greedy:
        kwargs["top_k"] = 1  # TensorRT-LLM's greedy: top_k 1 (its temperature must be > 0)
    else:
        kwargs["temperature"] = params.temperature
        kwargs["top_p"] = params.top_p  # always given: top_k 0 with top_p 0 would be greedy
        if params.top_k > 0:
            kwargs["top_k"] = params.top_k
        if params.min_p > 0.0:
            kwargs["min_p"] = params.min_p
    if params.seed is not None:
        kwargs["seed"] = params.seed
    if params.min_tokens > 0:
        kwargs["min_tokens"] = params.min_tokens
    for name, neutral in (("repetition_penalty", 1.0), ("presence_penalty", 0.0),
                          ("frequency_penalty", 0.0)):
        value = getattr(params, name)
        if value != neutral:
            kwargs[name] = value
    return kwargs
