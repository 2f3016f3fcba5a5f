"""LLMEngine: requests in, outputs out, one ``step()`` at a time.

``step()`` = (propose drafts) → schedule → run the model → postprocess (advance, fork n > 1
samples, sample or verify drafts, append, stop checks, free finished sequences). Speculative
decoding lives in the same step: drafts are verified in the step's one target forward
(runtime/speculative/). Not thread-safe: one thread drives it (see async_engine);
``make_request`` and ``check_structured_outputs`` are safe from any thread.
"""

from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass

import torch

from trt_gemma import ops
from trt_gemma.errors import ConfigError, RequestError
from trt_gemma.guided import GrammarCompiler, GrammarState, tokenizer_info
from trt_gemma.kernels.reference import FP8_DTYPE
from trt_gemma.model import GemmaModel
from trt_gemma.outputs import CompletionOutput, Logprob, RequestOutput
from trt_gemma.responsible.synthid import WatermarkConfig, WatermarkState
from trt_gemma.runtime import greedy_head
from trt_gemma.runtime.block_manager import BlockManager, plan_groups
from trt_gemma.runtime.config import EngineConfig
from trt_gemma.runtime.detokenizer import TextState
from trt_gemma.runtime.memory import kv_cache_budget
from trt_gemma.runtime.model_runner import ModelRunner
from trt_gemma.runtime.sampler import Sampler, TokenLogprobs
from trt_gemma.runtime.scheduler import Scheduler
from trt_gemma.runtime.sequence import Request, Sequence, SequenceStatus
from trt_gemma.runtime.speculative import (
    DraftProposer,
    NgramProposer,
    Speculator,
    accept_greedy,
    verify,
)
from trt_gemma.sampling_params import SamplingParams, StructuredOutputsParams

_log = logging.getLogger(__name__)
FP8_MIN_CC = (8, 9)  # e4m3 conversions in Triton and FP8 tensor cores: Ada, Hopper


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for /metrics; counters are totals since the engine started."""

    num_running: int  # sequences holding KV blocks
    num_waiting: int  # sequences queued (new or preempted)
    kv_cache_usage: float  # 0..1, share of KV blocks in use
    num_preemptions: int
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int
    num_prompt_tokens: int  # prompt tokens of accepted requests
    num_generation_tokens: int  # tokens sampled
    num_finished_requests: int
    num_kv_blocks: tuple[int, ...]  # blocks per KV group (full attention first)
    # Speculative decoding (vLLM's counters): verifications, drafts proposed, drafts accepted,
    # and accepted drafts by position (1st, 2nd, ... draft of a verification)
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_position: tuple[int, ...] = ()


def choose_kv_dtype(model: GemmaModel, kv_cache_dtype: str) -> torch.dtype:
    """The KV cache's dtype for ``EngineConfig.kv_cache_dtype`` on the model's device.

    CPU keeps K/V in fp32 whatever the model's dtype: the reference attention math is fp32 there,
    and bf16 values are exact in fp32, so reads skip a conversion per layer and step. The Triton
    path (CUDA, or interpreted on CPU) stores the model's dtype, as GPUs do. FP8 needs the
    engine's per-layer scales, and on CUDA compute capability 8.9+ (Triton cannot compile e4m3
    conversions for Ampere): elsewhere one warning and the model's dtype, never a compile error.
    """
    dev = model.device
    cpu = dev.type == "cpu"
    kv_dtype = torch.float32 if cpu and not ops.use_triton(model.embed) else model.dtype
    fp8 = kv_cache_dtype == "fp8" or (
        kv_cache_dtype == "auto" and not cpu and model.kv_scales is not None)
    if not fp8:
        return kv_dtype
    if model.kv_scales is None:
        raise ConfigError("EngineConfig.kv_cache_dtype 'fp8' needs per-layer KV scales: "
                          "build the engine with --kv-cache-dtype fp8")
    if dev.type == "cuda":
        cc = torch.cuda.get_device_capability(dev)
        if cc < FP8_MIN_CC:
            _log.warning("FP8 KV cache: this GPU (compute capability %d.%d) has no FP8 "
                         "conversions (needs 8.9+); using a %s KV cache", *cc,
                         str(kv_dtype).removeprefix("torch."))
            return kv_dtype
    return FP8_DTYPE


@dataclass(frozen=True)
class RankMemory:
    """What one tensor-parallel rank holds (the only rank, without tensor parallelism)."""

    rank: int
    weight_bytes: int  # its shard of the weights
    kv_cache_bytes: int  # its heads' share of the paged KV cache


def build_runner(model: GemmaModel, config: EngineConfig) -> tuple[BlockManager, int,
                                                                     ModelRunner]:
    """The paged KV cache's plan, its block manager, the longest sequence it admits, and the
    model runner over it. Under tensor parallelism every rank builds the same plan: the byte
    budget is the smallest rank's (each GPU's free memory differs), and ``mc.kv_size`` is a
    rank's heads, so rank 0's block tables are valid on every rank."""
    mc = model.config
    max_len = config.max_model_len or mc.max_position_embeddings
    if max_len > mc.max_position_embeddings:
        raise ConfigError(f"EngineConfig.max_model_len {max_len} exceeds the model's "
                          f"context of {mc.max_position_embeddings} tokens")
    kv_dtype = choose_kv_dtype(model, config.kv_cache_dtype)
    per_layer = 2 * config.block_size * mc.kv_size * kv_dtype.itemsize
    budget = kv_cache_budget(model, config)
    if model.tp.size > 1:
        budget = min(b for b, in model.tp.gather_ints([budget]))
    groups = plan_groups(mc, per_layer, budget, config.block_size, config.max_num_seqs,
                         config.max_num_batched_tokens, config.num_kv_blocks)
    block_manager = BlockManager(groups, config.block_size, config.enable_prefix_caching)
    # Every admitted sequence must be able to finish alone, whatever else runs.
    max_model_len = min(max_len, block_manager.max_tokens_per_seq())
    runner = ModelRunner(model, block_manager, kv_dtype, config.enforce_eager,
                         config.cuda_graph_batch_sizes, max_model_len,
                         config.cpu_single_thread_below, config.cpu_int8_decode_max_rows,
                         config.max_num_seqs, config.max_num_batched_tokens)
    return block_manager, max_model_len, runner


def report_rank_memory(runner: ModelRunner) -> list[RankMemory]:
    """Every rank's weight and KV-cache bytes, measured on each rank and gathered (a
    collective: every rank calls it after ``build_runner``)."""
    from trt_gemma.distributed.loading import weight_bytes

    mine = [weight_bytes(runner.model), runner.kv_cache.nbytes()]
    return [RankMemory(r, w, kv) for r, (w, kv) in enumerate(runner.model.tp.gather_ints(mine))]


# Where the token of a row (or the tokens of a speculating sequence's rows) came from:
# (sequence, emitted tokens, their logprobs, drafts accepted)
Sampled = tuple[Sequence, list[int], list[TokenLogprobs | None], int]


class LLMEngine:
    def __init__(self, model: GemmaModel, tokenizer=None, config: EngineConfig | None = None,
                 draft: GemmaModel | None = None, ranks=None):
        """``draft``: an already loaded draft model for speculative_method "draft" (else
        ``config.draft_model`` is loaded). ``ranks``: under tensor parallelism, the worker
        processes of ranks 1..N-1 (``distributed.engine_ranks.EngineRanks``), stopped by
        ``shutdown``; ``model`` is then rank 0's shard."""
        self.config = config = config or EngineConfig()
        self.model = model
        self.tokenizer = tokenizer
        mc = model.config
        if config.tensor_parallel_size != model.tp.size:
            raise ConfigError(f"EngineConfig.tensor_parallel_size {config.tensor_parallel_size}: "
                              f"the model was loaded for {model.tp.size} ranks "
                              "(LLMEngine.from_source loads it for the config)")
        self.ranks = ranks
        self.block_manager, self.max_model_len, self.runner = build_runner(model, config)
        self.scheduler = Scheduler(config, self.block_manager)
        self.rank_memory = report_rank_memory(self.runner)
        self.greedy_head, self.greedy_head_max_rows = None, config.greedy_head_max_rows or 0
        auto = config.greedy_head_max_rows is None  # CPU and a big vocabulary: where it wins
        cpu = model.device.type == "cpu"
        wanted = cpu and mc.vocab_size >= 32768 if auto else self.greedy_head_max_rows > 0
        # not under tensor parallelism: the int8 screen would read one rank's vocabulary shard
        if wanted and model.tp.size == 1 and greedy_head.available(model.lm_head):
            self.greedy_head = greedy_head.greedy_head_for(model, tokenizer)
            if auto:
                self.greedy_head_max_rows = self.greedy_head.worthwhile_rows()
        eos = tokenizer.stop_token_ids if tokenizer is not None else frozenset({mc.eos_token_id})
        self.sampler = Sampler(eos, model.device, config.seed, config.logprobs_mode)
        self.speculator = self._make_speculator(draft)
        self._draft_seq_ids: set[int] = set()  # sequences the proposer may hold state of
        self._grammars: GrammarCompiler | None = None  # built on the first constraint
        self._grammars_lock = threading.Lock()
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._arrivals = itertools.count()
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.num_finished_requests = 0

    def _make_speculator(self, draft: GemmaModel | None) -> Speculator | None:
        c = self.config
        if c.speculative_method is None:
            return None
        if c.speculative_method == "ngram":
            return Speculator(c, NgramProposer(c.ngram_min, c.ngram_max), self.max_model_len)
        if draft is None:
            if c.draft_model is None:
                raise ConfigError("EngineConfig.draft_model is needed by speculative_method "
                                  "'draft'")
            from trt_gemma.loader import load_model

            draft, _ = load_model(c.draft_model, device=self.model.device)
        vocab, draft_vocab = self.model.config.vocab_size, draft.config.vocab_size
        if draft_vocab != vocab:
            raise ConfigError(f"EngineConfig.draft_model {c.draft_model or 'draft'}: vocabulary "
                              f"of {draft_vocab} tokens, the target's has {vocab}")
        full = [g.num_blocks for g in self.block_manager.groups if g.sliding_window is None]
        proposer = DraftProposer(draft, choose_kv_dtype(draft, "model"), c,
                                 max(full or [g.num_blocks for g in self.block_manager.groups]),
                                 self.max_model_len, self.sampler)
        return Speculator(c, proposer, self.max_model_len)

    @classmethod
    def from_source(cls, source: str, dtype="auto", device="cpu", verify: bool = True,
                    **config) -> LLMEngine:
        """Load a bundled name, .gguf, HF dir or engine dir and serve it. With
        ``tensor_parallel_size=N`` > 1: N ranks, this process rank 0 and N - 1 worker processes
        started here, each loading only its shard (``distributed/engine_ranks.py``)."""
        engine_config = EngineConfig(**config)
        if engine_config.tensor_parallel_size > 1:
            from trt_gemma.distributed.engine_ranks import start_engine

            return start_engine(source, dtype, device, verify, engine_config)
        from trt_gemma.loader import load_model

        model, tokenizer = load_model(source, dtype=dtype, device=device, verify=verify)
        return cls(model, tokenizer, engine_config)

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks (nothing to do with one rank). Call it from the
        thread that steps the engine, once it no longer steps."""
        if self.ranks is not None:
            ranks, self.ranks = self.ranks, None
            ranks.stop(self.runner.sync)

    # -- requests ------------------------------------------------------------------------------
    def make_request(self, request_id: str, prompt: str | list[int],
                     params: SamplingParams | None = None) -> Request:
        """Validate and tokenize (no engine state touched: safe from any thread)."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise RequestError(f"params must be a SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("a text prompt needs a tokenizer; pass token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        vocab = self.model.config.vocab_size
        if not ids:
            raise RequestError(f"request {request_id}: the prompt is empty")
        if min(ids) < 0 or max(ids) >= vocab:
            raise RequestError(f"request {request_id}: prompt token ids must be in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise RequestError(
                f"request {request_id}: the prompt has {len(ids)} tokens, but the context holds "
                f"{self.max_model_len} (prompt + at least one generated token)"
            )
        if params.stop and self.tokenizer is None:
            raise RequestError("SamplingParams.stop needs a tokenizer (use stop_token_ids)")
        if params.n > self.config.max_num_seqs:
            raise RequestError(f"SamplingParams.n ({params.n}) exceeds max_num_seqs "
                               f"({self.config.max_num_seqs})")
        if params.structured_outputs is not None:
            self.check_structured_outputs(params.structured_outputs)  # compiled and cached now
        return Request(request_id, prompt if isinstance(prompt, str) else None, ids, params, 0)

    def add_request(self, request_id: str, prompt: str | list[int] | Request,
                    params: SamplingParams | None = None) -> None:
        req = prompt if isinstance(prompt, Request) else self.make_request(request_id, prompt,
                                                                           params)
        if req.request_id in self.requests:
            raise RequestError(f"request id {req.request_id!r} is already in use")
        constraint = req.params.structured_outputs
        compiled = self._compile(constraint) if constraint is not None else None
        req.arrival = next(self._arrivals)
        seq = Sequence(next(self._seq_ids), req.request_id, 0, req.prompt_token_ids, req.params,
                       req.arrival, len(self.block_manager.groups), self._generator(req.params, 0))
        self._attach_text(seq)
        if compiled is not None:
            seq.grammar = GrammarState.start(compiled)  # forks give each sample its own
        watermark = self.watermark_config(req.params)
        if watermark is not None:
            seq.watermark = WatermarkState(watermark)  # forks give each sample its own
        seq.num_forks_pending = req.params.n - 1
        req.seqs.append(seq)
        self.requests[req.request_id] = req
        self.num_prompt_tokens += len(req.prompt_token_ids)
        self.scheduler.add(seq)

    def watermark_config(self, params: SamplingParams) -> WatermarkConfig | None:
        """The watermark a request's sequences get: its own, none (False), else the engine's."""
        if params.watermark is False:
            return None
        return params.watermark or self.config.watermark

    def check_structured_outputs(self, params: StructuredOutputsParams) -> None:
        """Compile the constraint (or find it in the cache); GrammarError names what does not
        compile. Thread-safe: the server calls it off the event loop before submitting."""
        self._compile(params)

    def _compile(self, params: StructuredOutputsParams):
        if self.tokenizer is None:
            raise RequestError("SamplingParams.structured_outputs needs the model's tokenizer")
        with self._grammars_lock:
            if self._grammars is None:
                info = tokenizer_info(self.tokenizer, self.model.config.vocab_size)
                self._grammars = GrammarCompiler(info)
        return self._grammars.compile(params)

    def abort(self, request_id: str) -> bool:
        """Drop a request now; its blocks are free before the next step. False if unknown."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        for seq in req.seqs:
            seq.num_forks_pending = 0
            if not seq.is_finished:
                seq.finish_reason = "abort"
        self.scheduler.finish([s for s in req.seqs if not s.is_finished])
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=bm.usage(), num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queried_tokens=bm.prefix_queried_tokens,
            prefix_cache_hit_tokens=bm.prefix_hit_tokens,
            num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens,
            num_finished_requests=self.num_finished_requests,
            num_kv_blocks=tuple(g.num_blocks for g in bm.groups),
            **self._spec_stats(),
        )

    def _spec_stats(self) -> dict:
        sp = self.speculator
        if sp is None:
            return {}
        return dict(spec_num_drafts=sp.num_drafts, spec_num_draft_tokens=sp.num_draft_tokens,
                    spec_num_accepted_tokens=sp.num_accepted_tokens,
                    spec_accepted_per_position=tuple(sp.accepted_per_position))

    # -- the loop ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One batch: schedule, run, sample. Returns outputs of requests that progressed."""
        if self.ranks is not None and self.ranks.out_of_step:  # else: a wait of the full timeout
            from trt_gemma.distributed.group import RankFailure

            raise RankFailure("tensor-parallel ranks are out of step: an earlier step raised on "
                              "rank 0 half-way; shut this engine down and start a new one")
        if self.speculator is not None:
            self._release_drafts()
            self.speculator.propose(self.scheduler.running)
        out = self.scheduler.schedule()
        if out.is_empty:
            if self.scheduler.has_unfinished():
                raise RuntimeError("the scheduler found nothing to run for queued sequences")
            return []
        batch = self.runner.prepare(out)
        # Decided before the forward: under tensor parallelism the other ranks are told which of
        # the two (both end in a collective). Forks share their parent's params and state.
        greedy = all(self.sampler.is_plain_greedy(s) for s in batch.sample_seqs)
        with self.runner.threads_for(out.num_tokens):
            try:
                hidden = self.runner.run(batch, greedy)  # [rows to sample, hidden]
                self.scheduler.advance(out)
                seqs, rows = self._fork(batch.sample_seqs)
                sampled = self._sample(hidden, seqs, rows, greedy)
            except BaseException:
                if self.ranks is not None:  # the others may wait inside this step's collectives
                    self.ranks.out_of_step = True
                raise
        finished: list[Sequence] = []
        touched: dict[str, Request] = {}
        for seq, tokens, logprobs, accepted in sampled:
            emitted = 0
            for token, lp in zip(tokens, logprobs, strict=True):
                self._append(seq, token, lp)
                emitted += 1
                if seq.finish_reason is not None:
                    break  # nothing past a stop or max_tokens
            if seq.spec_tokens:  # count what was verified, give back the rejected drafts' slots
                self.speculator.record(seq, len(seq.spec_tokens), min(accepted, emitted))
                seq.clear_drafts()
                self.scheduler.settle(seq, emitted)
            if seq.finish_reason is not None:
                finished.append(seq)
            touched[seq.request_id] = self.requests[seq.request_id]
        self.scheduler.finish(finished)
        outputs = []
        for req in touched.values():
            outputs.append(self._output(req))
            if req.finished:
                del self.requests[req.request_id]
                self.num_finished_requests += 1
        return outputs

    def _sample(self, hidden: torch.Tensor, seqs: list[Sequence], rows: list[int],
                greedy: bool) -> list[Sampled]:
        """hidden [rows, hidden]: one row per sequence, 1 + K consecutive rows for a sequence
        that verifies K drafts; seqs[i] samples from row rows[i] (forks share their parent's
        row). ``greedy``: every sequence is plain greedy."""
        groups, first = [], 0  # (sequence, its first row, its rows)
        while first < len(seqs):
            n = 1 + len(seqs[first].spec_tokens)
            groups.append((seqs[first], first, n))
            first += n
        if not seqs:  # a step of prefill chunks that end mid-prompt (the other ranks skip too)
            return []
        forked = len(rows) != hidden.shape[0]
        if greedy:
            if self.greedy_head is not None and hidden.shape[0] <= self.greedy_head_max_rows:
                tokens = self.greedy_head(hidden)
            else:
                tokens = self.runner.greedy_tokens(hidden)
            if forked:
                tokens = [tokens[r] for r in rows]
            out = []
            for seq, f, n in groups:
                emitted = accept_greedy(seq.spec_tokens, tokens[f:f + n])
                out.append((seq, emitted, [None] * len(emitted), len(emitted) - 1))
            return out
        logits = self.runner.compute_logits(hidden)
        if forked:
            logits = logits[torch.tensor(rows, device=logits.device)]
        if all(n == 1 for _, _, n in groups):
            s = self.sampler(logits, seqs)
            return [(seq, [t], [lp], 0)
                    for seq, t, lp in zip(seqs, s.token_ids, s.logprobs, strict=True)]
        plain = [g for g in groups if g[2] == 1]
        spec = [g for g in groups if g[2] > 1]
        results: dict[int, Sampled] = {}
        if plain:
            idx = torch.tensor([f for _, f, _ in plain], device=logits.device)
            s = self.sampler(logits[idx], [seq for seq, _, _ in plain])
            for (seq, f, _), t, lp in zip(plain, s.token_ids, s.logprobs, strict=True):
                results[f] = (seq, [t], [lp], 0)
        idx = torch.tensor([r for _, f, n in spec for r in range(f, f + n)],
                           device=logits.device)
        checked = verify(self.sampler, logits[idx], [seq for seq, _, _ in spec])
        for (seq, f, _), v in zip(spec, checked, strict=True):
            results[f] = (seq, v.tokens, v.logprobs, v.num_accepted)
        return [results[f] for _, f, _ in groups]

    def _release_drafts(self) -> None:
        """Proposers forget sequences that left the engine (finished, aborted)."""
        live = {s.seq_id for s in self.scheduler.running}
        live.update(s.seq_id for s in self.scheduler.waiting)
        gone = self._draft_seq_ids - live
        if gone:
            self.speculator.release(gone)
        self._draft_seq_ids = live

    def _generator(self, params: SamplingParams, index: int) -> torch.Generator | None:
        if params.seed is None:
            return None
        return torch.Generator(self.model.device).manual_seed(params.seed + index)

    def _attach_text(self, seq: Sequence) -> None:
        if self.tokenizer is not None:
            p = seq.params
            seq.text = TextState(self.tokenizer, p.stop, p.skip_special_tokens)

    def _fork(self, sample_seqs: list[Sequence]) -> tuple[list[Sequence], list[int]]:
        """Samples 1..n-1 start when sample 0's prompt is computed, sharing its blocks and
        drawing their first token from the same logits row."""
        seqs, rows = list(sample_seqs), list(range(len(sample_seqs)))
        for row, parent in enumerate(sample_seqs):
            if not parent.num_forks_pending:
                continue
            req = self.requests[parent.request_id]
            for index in range(1, parent.num_forks_pending + 1):
                child = parent.fork(next(self._seq_ids), index,
                                    self._generator(parent.params, index))
                self._attach_text(child)
                self.scheduler.fork(parent, child)
                req.seqs.append(child)
                seqs.append(child)
                rows.append(row)
            parent.num_forks_pending = 0
        return seqs, rows

    def _append(self, seq: Sequence, token: int, lp: TokenLogprobs | None) -> None:
        seq.token_ids.append(token)
        self.num_generation_tokens += 1
        p = seq.params
        if lp is not None:
            seq.logprobs.append(self._logprob_entry(token, lp))
            seq.cumulative_logprob += lp[0]
        if seq.grammar is not None:
            seq.grammar.accept(token)  # GrammarViolation if the mask let a forbidden token by
        if seq.watermark is not None:
            seq.watermark.advance(token)  # the context the next token is watermarked after
        n = seq.num_output_tokens
        if token in self.sampler.stop_token_ids(seq):  # masked until min_tokens by the sampler
            seq.finish_reason, seq.stop_reason = "stop", token
        elif seq.grammar is not None and seq.grammar.is_terminated:
            # The grammar is complete and took its stop token: it wins over min_tokens and
            # ignore_eos (nothing may follow).
            seq.finish_reason, seq.stop_reason = "stop", token
        elif seq.text is not None and (stop := seq.text.add(token, n > p.min_tokens)):
            seq.finish_reason, seq.stop_reason = "stop", stop
        elif n >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"
        ended = seq.finish_reason is not None and not isinstance(seq.stop_reason, str)
        if ended and seq.text is not None and (stop := seq.text.finish()):
            seq.finish_reason, seq.stop_reason = "stop", stop  # held-back text released

    def _logprob_entry(self, token: int, lp: TokenLogprobs) -> dict[int, Logprob]:
        def decoded(t: int) -> str | None:
            if self.tokenizer is None:
                return None
            return self.tokenizer.decode([t], skip_special_tokens=False)

        entry = {t: Logprob(t, v, rank, decoded(t)) for rank, (t, v) in enumerate(lp[2], 1)}
        entry[token] = Logprob(token, lp[0], lp[1], decoded(token))
        return entry

    def _output(self, req: Request) -> RequestOutput:
        outs = []
        for seq in sorted(req.seqs, key=lambda s: s.index):
            outs.append(CompletionOutput(
                index=seq.index,
                text=seq.text.visible_text if seq.text is not None else "",
                token_ids=seq.output_token_ids,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
                cumulative_logprob=seq.cumulative_logprob,
                logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
            ))
        first_scheduled = self.scheduler.first_scheduled_times.pop(req.request_id, None)
        if self.speculator is not None:
            m = req.metrics
            m.spec_num_drafts = sum(s.num_verifications for s in req.seqs)
            m.spec_num_draft_tokens = sum(s.num_draft_tokens for s in req.seqs)
            m.spec_num_accepted_tokens = sum(s.num_accepted_tokens for s in req.seqs)
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs,
                             finished=req.finished, num_cached_tokens=req.seqs[0].num_cached_tokens,
                             metrics=req.record_tokens(first_scheduled))


__all__ = ["LLMEngine", "EngineConfig", "EngineStats", "SequenceStatus"]
