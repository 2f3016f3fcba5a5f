"""The offline API: ``LLM(source).generate(prompts, SamplingParams(...))``, shaped like vLLM's.

All prompts go to one ``runtime.LLMEngine`` at once: it batches them (continuous batching, chunked
prefill, shared prompt prefixes), so a list of prompts runs much faster than one at a time.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import torch

from trt_gemma.errors import RequestError
from trt_gemma.loader import load_model
from trt_gemma.outputs import RequestOutput
from trt_gemma.runtime import EngineConfig, LLMEngine
from trt_gemma.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """A model loaded for generation. ``source``: bundled name, .gguf, HF dir or engine dir.
    Extra keyword arguments are ``runtime.EngineConfig`` fields (``max_num_seqs``,
    ``kv_cache_memory``, ``enable_prefix_caching``...)."""

    def __init__(self, source: str, dtype: str | torch.dtype = "auto", device: str = "cpu",
                 verify: bool = True, **engine_config):
        self.model, self.tokenizer = load_model(source, dtype=dtype, device=device, verify=verify)
        self.config = self.model.config
        self.device = torch.device(device)
        self.engine = LLMEngine(self.model, self.tokenizer, EngineConfig(**engine_config))
        self._ids = itertools.count()

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. A list of params pairs with the prompts."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise RequestError(f"got {len(params)} sampling params for {len(prompts)} prompts")
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

    def stream(self, prompt: Prompt, params: SamplingParams) -> Iterator[str]:
        """Text pieces of one completion as they are generated (for terminals)."""
        request_id = str(next(self._ids))
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
