"""Perplexity over N tensor-parallel ranks (``trt-gemma eval -tp N``).

Scoring is SPMD: every rank loads its shard, tokenizes the same text and runs the same windows
(the model's ``compute_logits`` all-gathers the vocabulary, so each rank must make the same
calls in the same order); rank 0's result is the answer. No engine, no step messages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trt_gemma.distributed.engine_ranks import (
    check_devices,
    rank_device,
    share_cpu_threads,
    source_config,
)
from trt_gemma.distributed.group import TensorParallel
from trt_gemma.distributed.shard import check_shardable
from trt_gemma.distributed.workers import LaunchConfig, run_ranks


@dataclass(frozen=True)
class EvalJob:
    """What every rank scores (plain values: it is pickled to the worker processes)."""

    source: str
    text: str
    dtype: str
    device: str  # "cuda": rank r on cuda:r (an index other than 0 is refused); "cpu"
    verify: bool = True
    max_tokens: int | None = None
    window: int | None = None


def tensor_parallel_perplexity(job: EvalJob, size: int, timeout_s: float | None = None):
    """(PerplexityResult, the model's torch dtype) of rank 0, scored over ``size`` ranks."""
    device = torch.device(job.device)
    check_devices(device, size)
    check_shardable(source_config(job.source), size)  # before any process starts
    threads, _ = share_cpu_threads(device, size)
    extra = {} if timeout_s is None else {"timeout_s": timeout_s}
    return run_ranks(LaunchConfig(size, device.type, threads=threads, **extra), _score, job)


def _score(tp: TensorParallel, job: EvalJob):
    from trt_gemma.eval import perplexity, text_ids
    from trt_gemma.loader import load_model

    device = rank_device(torch.device(job.device), tp.rank)
    model, tokenizer = load_model(job.source, dtype=job.dtype, device=device, verify=job.verify,
                                  tp=tp)
    ids = text_ids(tokenizer, job.text, job.max_tokens)
    return perplexity(model, ids, tokenizer.bos_id, window=job.window), model.dtype
