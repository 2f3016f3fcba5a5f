"""Perplexity: the number that says what a quant mode costs.

``perplexity(model, ids)`` scores ``ids`` (BOS + text) in non-overlapping windows of at most
``window`` tokens, one prefill each. Every window starts with BOS, so each text token is predicted
exactly once from the tokens before it in its window: window 0 is ``ids[:window]``, window k > 0 is
``[BOS] + the next window - 1 text tokens``. With the default window (the model's context) a text of
a few thousand tokens is one window, i.e. a plain causal forward over the whole text; sliding-
window layers see exactly what they would at generation time.

Logits are computed ``logit_rows`` at a time (a 262k vocabulary makes a full [tokens, vocab] fp32
matrix gigabytes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from trt_gemma.errors import RequestError
from trt_gemma.kv_cache import ContiguousKVCache


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float  # nats per predicted token
    num_tokens: int  # tokens scored (BOS included)
    num_predicted: int  # tokens whose probability entered the perplexity
    num_windows: int
    window: int

    def to_dict(self) -> dict:
        return asdict(self)


def eval_windows(ids: Sequence[int], bos_id: int, window: int) -> list[list[int]]:
    """Windows as in the module docstring; ``ids`` must start with BOS."""
    if window < 2:
        raise RequestError(f"the evaluation window must be >= 2 tokens, got {window}")
    ids = list(ids)
    windows = [ids[:window]]
    pos = len(windows[0])
    while pos < len(ids):
        chunk = ids[pos:pos + window - 1]
        windows.append([bos_id, *chunk])
        pos += len(chunk)
    return windows


@torch.inference_mode()
def window_nll(model, ids: list[int], logit_rows: int = 256,
               make_cache: Callable[..., ContiguousKVCache] = ContiguousKVCache,
               ) -> tuple[float, int]:
    """(sum of -log p(ids[t] | ids[:t]) for t >= 1, number of terms) in one forward pass.

    ``make_cache(config, max_len, dtype, device)`` builds the attention backend (benchmarks pass
    one that rounds keys and values through FP8 to measure an FP8 KV cache).
    """
    device = model.device
    cache = make_cache(model.config, len(ids), model.dtype, device)
    hidden = cache.forward(model, torch.tensor(ids, device=device))
    targets = torch.tensor(ids[1:], device=device)
    total = 0.0
    for start in range(0, len(ids) - 1, logit_rows):
        end = min(start + logit_rows, len(ids) - 1)
        logits = model.compute_logits(hidden[start:end])  # fp32
        logp = torch.log_softmax(logits, dim=-1)
        total -= float(logp.gather(1, targets[start:end, None]).sum())
    return total, len(ids) - 1


def perplexity(model, ids: Sequence[int], bos_id: int, *, window: int | None = None,
               progress: Callable[[int], None] | None = None,
               make_cache: Callable[..., ContiguousKVCache] = ContiguousKVCache,
               ) -> PerplexityResult:
    """Perplexity of ``ids`` (BOS + text) under ``model`` (a GemmaModel)."""
    if len(ids) < 2:
        raise RequestError(f"need at least 2 tokens (BOS + text) to score, got {len(ids)}")
    limit = model.config.max_position_embeddings
    window = min(window or limit, limit)
    windows = eval_windows(ids, bos_id, window)
    nll, n = 0.0, 0
    for w in windows:
        s, k = window_nll(model, w, make_cache=make_cache)
        nll, n = nll + s, n + k
        if progress is not None:
            progress(len(w))
    mean = nll / n
    return PerplexityResult(perplexity=math.exp(mean), mean_nll=mean, num_tokens=len(ids),
                            num_predicted=n, num_windows=len(windows), window=window)


def text_ids(tokenizer, text: str, max_tokens: int | None = None) -> list[int]:
    """BOS + the text's tokens, cut to the first ``max_tokens`` (BOS counted)."""
    ids = tokenizer.encode(text, add_bos=False)
    ids = [tokenizer.bos_id, *ids]
    return ids[:max_tokens] if max_tokens else ids
