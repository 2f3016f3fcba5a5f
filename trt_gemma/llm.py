"""The offline API: ``LLM(source).generate(prompts, SamplingParams(...))``, shaped like vLLM's.

All prompts go to one ``runtime.LLMEngine`` at once: it batches them (continuous batching, chunked
prefill, shared prompt prefixes), so a list of prompts runs much faster than one at a time.

As in vLLM: ``LLM(model=...)`` names the source, ``device="auto"`` is CUDA when there is one,
``LLM.chat`` renders conversations with the checkpoint's chat format, and a call without
SamplingParams samples with the checkpoint's generation_config defaults
(``get_default_sampling_params``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence

import torch

from trt_gemma.engine_dir import generation_defaults
from trt_gemma.errors import ConfigError, RequestError
from trt_gemma.loader import load_model
from trt_gemma.outputs import RequestOutput
from trt_gemma.runtime import EngineConfig, LLMEngine
from trt_gemma.sampling_params import SamplingParams

Prompt = str | list[int]
Message = dict  # {"role": ..., "content": ...} (OpenAI's shape; tool_calls / tool_call_id too)


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto': the current CUDA device when there is one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class LLM:
    """A model loaded for generation. ``source`` (or ``model=``, vLLM's name for it): bundled
    name, .gguf, HF dir or engine dir; a TensorRT-LLM export or engine directory runs on
    TensorRT-LLM (``trt_gemma/trtllm_runtime/``; ``device`` and ``verify`` do not apply).
    ``device``: "auto" (CUDA when available), "cuda", "cpu".
    Extra keyword arguments are ``runtime.EngineConfig`` fields (``max_num_seqs``,
    ``kv_cache_memory``, ``enable_prefix_caching``, ``tensor_parallel_size``...)."""

    def __init__(self, source: str | None = None, dtype: str | torch.dtype = "auto",
                 device: str | torch.device = "auto", verify: bool = True, *,
                 model: str | None = None, **engine_config):
        if source is not None and model is not None and str(source) != str(model):
            raise ConfigError(f"LLM: source {source!r} and model {model!r} name two models; "
                              "pass one")
        source = source if source is not None else model
        if source is None:
            raise ConfigError("LLM: name the model to load (LLM('gemma3-270m') or "
                              "LLM(model=...))")
        self._ids = itertools.count()
        self.trtllm = _trtllm_engine(source, dtype, engine_config)
        if self.trtllm is not None:  # a TensorRT engine: TensorRT-LLM picks its GPU
            self.device, self.model, self.config, self.engine = None, None, None, None
            self.tokenizer = self.trtllm.tokenizer
            self.generation_defaults = dict(self.trtllm.generation_defaults)
            return
        self.device = resolve_device(device)
        # read before the weights: a malformed generation_config.json fails at once
        self.generation_defaults = generation_defaults(source)
        config = EngineConfig(**engine_config)
        if config.tensor_parallel_size > 1:  # this process is rank 0; it starts the others
            self.engine = LLMEngine.from_source(source, dtype, self.device, verify,
                                                **engine_config)
            self.model, self.tokenizer = self.engine.model, self.engine.tokenizer
        else:
            self.model, self.tokenizer = load_model(source, dtype=dtype, device=self.device,
                                                    verify=verify)
            self.engine = LLMEngine(self.model, self.tokenizer, config)
        self.config = self.model.config  # under tensor parallelism: rank 0's share of the heads

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks now (else at exit); the LLM is unusable after."""
        if self.engine is not None:
            self.engine.shutdown()

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the checkpoint's generation_config defaults (temperature, top_p,
        top_k, min_p, repetition_penalty) where it has them; what ``generate(prompts)`` uses."""
        return SamplingParams(**self.generation_defaults)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. A list of params pairs with the prompts."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or self.get_default_sampling_params()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise RequestError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        if self.trtllm is not None:
            first = next(self._ids)
            for _ in range(len(prompts) - 1):
                next(self._ids)
            return self.trtllm.generate_all(list(prompts), list(params), first_id=first)
        # Validate every request before any runs: a bad prompt fails the call, not half of it.
        requests = [self.engine.make_request(str(next(self._ids)), prompt, p)
                    for prompt, p in zip(prompts, params, strict=True)]
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(requests), desc="Generating", unit="req")
        try:
            for request in requests:
                self.engine.add_request(request.request_id, request)
            while len(results) < len(requests):
                for out in self.engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            for request in requests:  # after an error or interrupt: leave nothing queued
                if request.request_id not in results:
                    self.engine.abort(request.request_id)
        return [results[r.request_id] for r in requests]

    def chat(self, messages: Sequence[Message] | Sequence[Sequence[Message]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = False, add_generation_prompt: bool = True,
             tools: Sequence[dict] | None = None) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of messages) or several (a list of such
        lists), rendered with the checkpoint's chat format; one RequestOutput per conversation.
        Generation ends at the end of the model's turn. ``tools``: OpenAI-style tool
        definitions, rendered into the prompt (parsing calls out of the reply is the caller's)."""
        if self.tokenizer is None:
            raise RequestError("LLM.chat needs a tokenizer with a chat format")
        if not messages:
            raise RequestError("LLM.chat: no messages")
        first = messages[0]
        conversations = [messages] if isinstance(first, Mapping) else list(messages)
        prompts = []
        for i, conversation in enumerate(conversations):
            extra = {"tools": tools} if tools else {}
            try:
                prompts.append(self.tokenizer.apply_chat_template(
                    list(conversation), add_generation_prompt, **extra))
            except ValueError as e:
                where = f"conversation {i}: " if len(conversations) > 1 else ""
                raise RequestError(f"LLM.chat: {where}{e}") from e
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def stream(self, prompt: Prompt, params: SamplingParams) -> Iterator[str]:
        """Text pieces of one completion as they are generated (for terminals)."""
        request_id = str(next(self._ids))
        if self.trtllm is not None:
            yield from self.trtllm.stream_text(prompt, params, request_id)
            return
        self.engine.add_request(request_id, prompt, params)
        emitted, finished = 0, False
        try:
            while not finished:
                for out in self.engine.step():
                    if out.request_id != request_id:
                        continue
                    text = out.outputs[0].text
                    if len(text) > emitted:
                        yield text[emitted:]
                        emitted = len(text)
                    finished = out.finished
        finally:
            if not finished:
                self.engine.abort(request_id)


def _trtllm_engine(source, dtype, engine_config: dict):
    """A TrtllmEngine when ``source`` is a TensorRT-LLM export or engine directory, else None."""
    from trt_gemma.trtllm_runtime import find_trtllm_source

    found = find_trtllm_source(source)
    if found is None:
        return None
    if str(dtype) != "auto":
        raise ConfigError(f"LLM: dtype {dtype!r}: a TensorRT engine's dtype is fixed when "
                          "trtllm-build runs; pass dtype='auto'")
    from trt_gemma.trtllm_runtime.engine import TrtllmEngine

    return TrtllmEngine.from_source(source, found=found, **engine_config)
