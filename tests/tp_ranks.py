"""What each tensor-parallel rank runs in tests/test_tensor_parallel.py.

Module-level functions (spawned workers import them by name), kept apart from the test module so a
worker imports only this, not pytest's test module. Every rank runs the same function.
"""

from __future__ import annotations

import os
import time

import torch

from trt_gemma.distributed.group import RankFailure, TensorParallel
from trt_gemma.distributed.loading import weight_bytes
from trt_gemma.kv_cache import ContiguousKVCache
from trt_gemma.loader import load_model


def logits_of_chunks(tp: TensorParallel, source: str,
                     chunks: list[list[int]]) -> tuple[torch.Tensor, list[int], list[int]]:
    """Prefill the first chunk, then decode the rest (each a forward on the contiguous KV
    cache); returns every token's logits [tokens, vocab], each rank's weight bytes and every
    token's ``greedy_tokens``."""
    model, _ = load_model(source, dtype="float32", tp=tp, verify=False)
    cache = ContiguousKVCache(model.config, max_len=64, dtype=torch.float32)
    logits, greedy = [], []
    for ids in chunks:
        hidden = cache.forward(model, torch.tensor(ids))
        logits.append(model.compute_logits(hidden))
        greedy += model.greedy_tokens(hidden)
    mine = torch.tensor([weight_bytes(model)], dtype=torch.int64)
    per_rank = tp.all_gather(mine).tolist() if tp.size > 1 else mine.tolist()
    return torch.cat(logits), per_rank, greedy


def run_cases(tp: TensorParallel, cases: list[tuple[str, list[list[int]]]]) -> list:
    """``logits_of_chunks`` of every (source, chunks): one process group serves them all."""
    torch.set_num_threads(1)
    return [logits_of_chunks(tp, source, chunks) for source, chunks in cases]


def die_during_forward(tp: TensorParallel, source: str, how: str):
    """Rank 0 runs a forward; the last rank dies (``how`` = "exit") or hangs ("hang") instead of
    joining its first all-reduce, so rank 0 is inside that collective when its peer goes.
    Rank 0 returns (the RankFailure it got, seconds from the forward's start to the error)."""
    torch.set_num_threads(1)
    model, _ = load_model(source, dtype="float32", tp=tp, verify=False)
    tp.barrier()  # everyone loaded: the failure happens mid-forward, not during loading
    if tp.rank == tp.size - 1:
        time.sleep(0.5)
        if how == "exit":
            os._exit(3)
        time.sleep(3600)
    cache = ContiguousKVCache(model.config, max_len=16, dtype=torch.float32)
    start = time.perf_counter()
    try:
        cache.forward(model, torch.tensor([2, 5, 7]))
    except RankFailure as e:
        return e, time.perf_counter() - start
    return None, time.perf_counter() - start


def greedy_tokens(tp: TensorParallel, source: str, prompts: list[str], steps: int) -> list:
    """Greedy continuations of each prompt (contiguous KV cache, one sequence at a time)."""
    torch.set_num_threads(1)
    model, tokenizer = load_model(source, dtype="float32", tp=tp, verify=False)
    out = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt)
        cache = ContiguousKVCache(model.config, max_len=len(ids) + steps, dtype=torch.float32)
        hidden = cache.forward(model, torch.tensor(ids))
        tokens = []
        for _ in range(steps):
            tokens.append(model.greedy_tokens(hidden[-1:])[0])
            hidden = cache.forward(model, torch.tensor(tokens[-1:]))
        out.append(tokens)
    return out
