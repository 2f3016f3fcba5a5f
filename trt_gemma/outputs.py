"""What generation returns, shaped like vLLM's ``RequestOutput`` / ``CompletionOutput``."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """Log-probability of one token under the model's raw distribution (log_softmax of its
    logits, before penalties, temperature and any grammar mask: vLLM's default), or with
    ``EngineConfig.logprobs_mode="processed_logprobs"`` after those, before top-k / top-p."""

    token_id: int
    logprob: float
    rank: int | None = None  # 1 = most likely
    decoded: str | None = None


@dataclass
class CompletionOutput:
    index: int  # which of the request's n samples
    text: str  # generated text (stop strings removed)
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    cumulative_logprob: float | None = None
    # per generated token: {token_id: Logprob} holding the sampled token and the top-N
    logprobs: list[dict[int, Logprob]] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """When a request reached each stage, on the ``time.monotonic()`` clock (vLLM's fields).

    Set by the runtime: arrival when the request is made, first scheduled when the scheduler
    first admits it, token times when the engine hands out an output that carries new tokens,
    finished when the last sample ends. None until the stage is reached.
    """

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    # Speculative decoding, over the request's samples: verifications (target forwards that
    # checked drafts), drafts proposed, drafts accepted. Zero without speculation.
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0

    @property
    def spec_acceptance_rate(self) -> float | None:
        """Share of the draft tokens accepted (None: nothing was proposed)."""
        if not self.spec_num_draft_tokens:
            return None
        return self.spec_num_accepted_tokens / self.spec_num_draft_tokens

    @property
    def spec_mean_accepted_length(self) -> float | None:
        """Tokens emitted per verifying forward: 1 + accepted drafts per verification (vLLM's
        mean acceptance length)."""
        if not self.spec_num_drafts:
            return None
        return 1.0 + self.spec_num_accepted_tokens / self.spec_num_drafts

    @property
    def queue_time(self) -> float | None:
        """Arrival to first scheduled: waiting for a free slot or KV blocks."""
        return _between(self.arrival_time, self.first_scheduled_time)

    @property
    def prefill_time(self) -> float | None:
        """First scheduled to first token: the prompt's forward (all chunks, any recompute)."""
        return _between(self.first_scheduled_time, self.first_token_time)

    @property
    def decode_time(self) -> float | None:
        """First token to finished: generating the rest."""
        return _between(self.first_token_time, self.finished_time)


def _between(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else end - start


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    metrics: RequestMetrics | None = None  # stage times, a snapshot taken with this output
