"""The offline API: ``LLM(source).generate(prompts, SamplingParams(...))``, shaped like vLLM's."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import torch

from trt_gemma.errors import RequestError
from trt_gemma.kv_cache import ContiguousKVCache
from trt_gemma.loader import load_model
from trt_gemma.outputs import CompletionOutput, RequestOutput
from trt_gemma.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """A model loaded for generation. ``source``: bundled name, .gguf, HF dir or engine dir."""

    def __init__(self, source: str, dtype: str | torch.dtype = "auto", device: str = "cpu",
                 verify: bool = True):
        self.model, self.tokenizer = load_model(source, dtype=dtype, device=device, verify=verify)
        self.config = self.model.config
        self.device = torch.device(device)
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
        results = []
        for prompt, p in zip(prompts, params, strict=True):
            ids = self._prompt_ids(prompt)
            outputs = [self._complete(ids, p, index=i) for i in range(p.n)]
            results.append(RequestOutput(
                request_id=str(next(self._ids)), prompt=prompt if isinstance(prompt, str) else None,
                prompt_token_ids=ids, outputs=outputs, finished=True,
            ))
        return results

    def stream(self, prompt: Prompt, params: SamplingParams) -> Iterator[str]:
        """Text pieces of one completion as they are generated (for terminals)."""
        ids = self._prompt_ids(prompt)
        out = CompletionOutput(index=0, text="", token_ids=[])
        yield from self._decode_loop(ids, params, out, seed_offset=0)

    # --------------------------------------------------------------------------------------
    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise RequestError("the prompt is empty")
        limit = self.config.max_position_embeddings
        if len(ids) >= limit:
            raise RequestError(
                f"the prompt has {len(ids)} tokens; the model's context is {limit} tokens"
            )
        return ids

    def _complete(self, ids: list[int], params: SamplingParams, index: int) -> CompletionOutput:
        out = CompletionOutput(index=index, text="", token_ids=[])
        for _ in self._decode_loop(ids, params, out, seed_offset=index):
            pass
        return out

    def _decode_loop(self, ids: list[int], params: SamplingParams, out: CompletionOutput,
                     seed_offset: int) -> Iterator[str]:
        from trt_gemma.tokenizer import IncrementalDetokenizer

        cfg = self.config
        max_len = min(cfg.max_position_embeddings, len(ids) + params.max_tokens)
        cache = ContiguousKVCache(cfg, max_len, self.model.dtype, self.device)
        generator = None
        if params.seed is not None:
            generator = torch.Generator().manual_seed(params.seed + seed_offset)
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= set(self.tokenizer.stop_token_ids)
        detok = IncrementalDetokenizer(self.tokenizer)
        next_input = torch.tensor(ids, device=self.device)
        emitted = 0  # characters of out.text already yielded
        while True:
            hidden = cache.forward(self.model, next_input)
            logits = self.model.compute_logits(hidden[-1:])[0]
            token = _sample(logits, params, generator, ids + out.token_ids)
            out.token_ids.append(token)
            n = len(out.token_ids)
            if token in stop_ids and n > params.min_tokens:
                # Like vLLM: the stop token stays in token_ids but never in the text.
                out.finish_reason, out.stop_reason = "stop", token
                break
            out.text += detok.add(token)
            stop = _find_stop(out.text, params.stop) if n > params.min_tokens else None
            if stop is not None:
                out.text = out.text[:stop[0]]
                out.finish_reason, out.stop_reason = "stop", stop[1]
                break
            if n >= params.max_tokens or cache.length + 1 >= max_len:
                out.text += detok.flush()
                out.finish_reason = "length"
                break
            # Hold back a tail that could still grow into a stop string.
            safe = len(out.text) - _held_back(out.text, params.stop)
            if safe > emitted:
                yield out.text[emitted:safe]
                emitted = safe
            next_input = torch.tensor([token], device=self.device)
        if len(out.text) > emitted:
            yield out.text[emitted:]


def _find_stop(text: str, stops: tuple[str, ...]) -> tuple[int, str] | None:
    hits = [(text.find(s), s) for s in stops if s in text]
    return min(hits) if hits else None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def _sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None,
            seen: list[int]) -> int:
    """One token from [vocab] float32 logits (the batched sampler lives in runtime/)."""
    if p.repetition_penalty != 1.0 and seen:
        idx = torch.tensor(sorted(set(seen)), device=logits.device)
        vals = logits[idx]
        logits[idx] = torch.where(vals > 0, vals / p.repetition_penalty,
                                  vals * p.repetition_penalty)
    if p.greedy:
        return int(torch.argmax(logits))
    logits = logits / p.temperature
    if p.top_k:
        kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        drop = sorted_probs.cumsum(0) - sorted_probs > p.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return int(torch.multinomial(probs, 1, generator=generator))
