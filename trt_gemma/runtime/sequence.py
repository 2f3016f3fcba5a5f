"""Sequence and Request: the state of one generation as the runtime sees it.

A request holds ``n`` sequences (its samples). A sequence is one growing list of tokens, prompt then
output, of which the first ``num_computed_tokens`` have their keys/values in the KV cache. Prefill,
chunked prefill, decode and recompute after preemption are the same operation: compute the tokens
``num_computed_tokens .. num_tokens - 1``; once all are computed, the last one's logits give the
next token.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from dataclasses import dataclass, field

import torch

from trt_gemma.outputs import RequestMetrics
from trt_gemma.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # no KV blocks (new, or preempted to be recomputed)
    RUNNING = "running"  # holds KV blocks; scheduled each step until finished
    FINISHED = "finished"


class Sequence:
    """One sample of a request. Mutated only by the scheduler/engine thread."""

    def __init__(self, seq_id: int, request_id: str, index: int, prompt_token_ids: list[int],
                 params: SamplingParams, arrival: int, num_groups: int,
                 generator: torch.Generator | None = None):
        self.seq_id = seq_id
        self.request_id = request_id
        self.index = index  # which of the request's n samples
        self.token_ids = list(prompt_token_ids)  # prompt + output
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.arrival = arrival  # request arrival order: FCFS and "newest" for preemption
        self.generator = generator  # per-sequence RNG of seeded requests (batch-invariant)
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at first admission
        self.block_tables: list[list[int]] = [[] for _ in range(num_groups)]  # -1: freed (window)
        self.block_hashes: list[bytes] = []  # chained hashes of the full blocks of token_ids
        self.num_hashed_blocks = 0  # full computed blocks already offered to the prefix cache
        self.num_dropped_blocks = [0] * num_groups  # leading blocks freed (out of every window)
        self.num_forks_pending = 0  # samples still to fork from this one when its prompt is done
        self.num_preemptions = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.logprobs: list[dict] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob: float | None = 0.0 if params.logprobs is not None else None
        self.text = None  # runtime.detokenizer.TextState when the engine has a tokenizer
        # guided.GrammarState of a constrained request: where its output is in the grammar
        self.grammar = None
        # responsible.synthid.WatermarkState of a watermarked sequence: its last ngram_len - 1
        # output tokens and past context hashes. It reads only the output tokens (the prompt never
        # seeds it, as in transformers' processor), so preemption + recompute leaves it valid.
        self.watermark = None
        # Speculative decoding: this step's draft tokens (never in token_ids until verified), the
        # draft distribution each was drawn from ([len(spec_tokens), vocab]; None: point
        # masses, as n-gram proposals are), the adaptive K, and acceptance counts.
        self.spec_tokens: list[int] = []
        self.spec_probs: torch.Tensor | None = None
        self.spec_k = 0  # 0: not proposed for yet (the engine's K)
        self.num_block_rollbacks = 0  # times trailing blocks were given back (step_inputs)
        self.num_draft_tokens = 0  # drafts verified
        self.num_accepted_tokens = 0  # of which accepted (and emitted)
        self.num_verifications = 0  # target forwards that checked drafts of this sequence

    # -- derived ---------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def clear_drafts(self) -> None:
        self.spec_tokens = []
        self.spec_probs = None

    def fork(self, seq_id: int, index: int, generator: torch.Generator | None) -> Sequence:
        """A sibling with the same tokens and progress (the block manager shares its blocks)."""
        child = Sequence(seq_id, self.request_id, index, [], self.params, self.arrival,
                         len(self.block_tables), generator)
        child.token_ids = list(self.token_ids)
        child.num_prompt_tokens = self.num_prompt_tokens
        child.num_computed_tokens = self.num_computed_tokens
        child.num_cached_tokens = self.num_cached_tokens
        child.block_hashes = list(self.block_hashes)
        child.grammar = self.grammar.fork() if self.grammar is not None else None
        child.watermark = self.watermark.fork() if self.watermark is not None else None
        child.status = self.status
        return child

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id}#{self.index}, {self.status.value}, "
                f"tokens={self.num_tokens}, computed={self.num_computed_tokens})")


@dataclass
class Request:
    """What add_request created: the prompt, its params and its sequences (one per sample)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int
    seqs: list[Sequence] = field(default_factory=list)
    # Stage times; arrival is when the request was made (validated), before it is queued.
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.monotonic()))

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs) and not any(
            s.num_forks_pending for s in self.seqs
        )

    def record_tokens(self, first_scheduled_time: float | None) -> RequestMetrics:
        """Stamp the times of an output that carries new tokens, and return a copy: outputs
        cross threads while the request keeps changing. ``first_scheduled_time`` is the
        scheduler's stamp, taken over with the first output."""
        m, now = self.metrics, time.monotonic()
        if m.first_scheduled_time is None:
            m.first_scheduled_time = first_scheduled_time
        if m.first_token_time is None:
            m.first_token_time = now
        m.last_token_time = now
        if m.finished_time is None and self.finished:
            m.finished_time = now
        return dataclasses.replace(m)
