"""Shared by the runtime tests: tiny models, a character tokenizer, and engine drivers."""

from __future__ import annotations

import torch
from hf_tiny import save_tiny_checkpoint

from trt_gemma.checkpoint import open_checkpoint
from trt_gemma.model import GemmaModel
from trt_gemma.runtime import EngineConfig, LLMEngine
from trt_gemma.sampling_params import SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)


def tiny_models(directory, variant):
    """(transformers model, our GemmaModel) with the same random weights."""
    hf = save_tiny_checkpoint(variant, directory)
    checkpoint = open_checkpoint(directory)
    return hf, GemmaModel.from_state_dict(checkpoint.config, checkpoint.state_dict())


def random_prompts(lengths, vocab=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def make_engine(model, tokenizer=None, **config):
    config.setdefault("kv_cache_memory", 8 << 20)
    return LLMEngine(model, tokenizer, EngineConfig(**config))


def drain(engine, schedule=None, limit=2000):
    """Step until done; `schedule` maps a step number to [(id, prompt, params)] to add then.
    Returns {request id: final RequestOutput}, and checks every block is back in the pool."""
    schedule = dict(schedule or {})
    finished, step = {}, 0
    while engine.has_unfinished_requests() or schedule:
        for rid, prompt, params in schedule.pop(step, []):
            engine.add_request(rid, prompt, params)
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        step += 1
        assert step < limit
    assert engine.block_manager.all_free(), "blocks leaked"
    assert not engine.scheduler.running and not engine.scheduler.waiting
    return finished


def generate_alone(model, prompt, params, **config):
    engine = make_engine(model, **config)
    engine.add_request("alone", prompt, params)
    return drain(engine)["alone"]


def greedy(max_tokens, **kw):
    return SamplingParams(max_tokens=max_tokens, **{**GREEDY, **kw})


class CharTokenizer:
    """Token t >= 3 spells one or two letters; 0 pad, 1 eos, 2 bos (special). Enough for stop
    strings that span tokens, without a real vocabulary."""

    eos_id, bos_id = 1, 2
    stop_token_ids = frozenset({1})
    special_ids = frozenset({0, 1, 2})

    def piece(self, t: int) -> str:
        if t in self.special_ids:
            return f"<{t}>"
        return chr(97 + (t // 2) % 26) * (1 + t % 2)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [52 + 2 * ((ord(c) - 97) % 26) for c in text]  # one single-letter piece each
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(self.piece(t) for t in ids
                       if not (skip_special_tokens and t in self.special_ids))

    def detokenizer(self, skip_special_tokens: bool = True):
        tok = self

        class _Detok:
            def add(self, t):
                return tok.decode([t], skip_special_tokens)

            def flush(self):
                return ""

        return _Detok()
