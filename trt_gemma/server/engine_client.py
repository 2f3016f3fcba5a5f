"""EngineClient: what the HTTP layer needs from the runtime, and admission control in front of it.

The server talks to ``runtime.AsyncLLMEngine`` only through this adapter: generate (with an abort
when the consumer goes away before the request finishes), abort, liveness, stats, the tokenizer,
the context limit, the checkpoint's sampling defaults and the structured-output check. Tests
substitute a fake engine with the same small surface.

Admission: the engine runs at most ``max_num_seqs`` sequences and queues the rest; the server lets
at most ``max_queue`` more sequences wait behind those. A request that would exceed
``max_num_seqs + max_queue`` sequences in flight is refused with 503 at once, so the queue (and the
latency of everything in it) is bounded however fast clients arrive. The count is the server's own
(admitted, not yet ended), so a burst is judged without racing the engine thread's view.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing

from trt_gemma.outputs import RequestOutput
from trt_gemma.errors import ConfigError
from trt_gemma.sampling_params import SamplingParams, StructuredOutputsParams
from trt_gemma.server.errors import APIError

logger = logging.getLogger("trt_gemma.server")


class Reservation:
    """Room for ``cost`` sequences, held from admission until the response ends (idempotent)."""

    def __init__(self, client: EngineClient, cost: int):
        self._client, self.cost, self._held = client, cost, True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._client.num_in_flight -= self.cost


class EngineClient:
    def __init__(self, engine, tokenizer, max_model_len: int, vocab_size: int, max_num_seqs: int,
                 max_queue: int, generation_defaults: dict | None = None):
        # AsyncLLMEngine, trtllm_runtime.TrtllmEngine, or a test double with the same surface
        self.engine = engine
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len  # prompt + output tokens of one sequence
        self.vocab_size = vocab_size
        self.max_num_seqs = max_num_seqs
        self.max_queue = max_queue
        # SamplingParams field -> value for fields a request leaves unset (generation_config)
        self.generation_defaults = dict(generation_defaults or {})
        self.num_in_flight = 0  # sequences admitted and not yet ended
        self.draining = False  # set at shutdown: refuse new work, report unhealthy
        self._failure: BaseException | None = None  # what killed the engine, once seen

    @classmethod
    def from_source(cls, source: str, *, dtype: str = "auto", device: str = "cpu",
                    verify: bool = True, max_queue: int = 256, generation_config: str = "auto",
                    **engine_config) -> EngineClient:
        """Load a model and start the engine thread (it idles until requests arrive). A
        TensorRT-LLM engine (export or engine directory) is served by TensorRT-LLM instead.

        ``generation_config``: "auto" fills unset sampling fields from the checkpoint's
        generation_config.json; "vllm" ignores it (OpenAI's defaults), as vLLM's flag does."""
        from trt_gemma.engine_dir import generation_defaults
        from trt_gemma.loader import load_model
        from trt_gemma.runtime import AsyncLLMEngine, EngineConfig, LLMEngine

        if generation_config not in ("auto", "vllm"):
            raise ConfigError(f"--generation-config must be auto or vllm, got "
                              f"{generation_config!r}")
        from trt_gemma.trtllm_runtime import find_trtllm_source

        found = find_trtllm_source(source)
        if found is not None:  # a TensorRT engine: TensorRT-LLM runs it (dtype, device: its own)
            from trt_gemma.trtllm_runtime.engine import TrtllmEngine

            engine = TrtllmEngine.from_source(source, found=found, **engine_config)
            defaults = engine.generation_defaults if generation_config == "auto" else {}
            return cls(engine, engine.tokenizer, engine.max_model_len, engine.vocab_size,
                       engine.max_num_seqs, max_queue, defaults)
        # before the load: a bad file fails at once
        defaults = generation_defaults(source) if generation_config == "auto" else {}
        config = EngineConfig(**engine_config)
        if config.tensor_parallel_size > 1:  # this process is rank 0; it starts the others
            llm_engine = LLMEngine.from_source(source, dtype=dtype, device=device, verify=verify,
                                               **engine_config)
        else:
            model, tokenizer = load_model(source, dtype=dtype, device=device, verify=verify)
            llm_engine = LLMEngine(model, tokenizer, config)
        # The engine thread owns the LLMEngine from here on; it stops the ranks when it ends.
        engine = AsyncLLMEngine(llm_engine)
        return cls(engine, llm_engine.tokenizer, llm_engine.max_model_len,
                   llm_engine.model.config.vocab_size, config.max_num_seqs, max_queue, defaults)

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        await _maybe_await(getattr(self.engine, "start", lambda: None)())

    async def shutdown(self) -> None:
        self.draining = True
        await _maybe_await(self.engine.shutdown())

    def is_alive(self) -> bool:
        return not self.draining and bool(self.engine.is_alive())

    def failure(self) -> BaseException | None:
        """What killed the engine (a step raised, e.g. a tensor-parallel rank died), or None
        while it runs or after an orderly shutdown. Such an engine never recovers. A rank
        process that exited is noticed here too while the engine idles (no collective runs
        then to fail); once seen, it is kept (stopping the engine forgets its ranks)."""
        if self._failure is None:
            error = getattr(self.engine, "error", None)
            self._failure = error if error is not None else _exited_rank(
                getattr(self.engine, "engine", None))
        return self._failure

    def stats(self):
        """The engine's EngineStats, or None if it cannot answer (not started, or dead).

        AsyncLLMEngine snapshots its stats after each step, so after the last requests were
        aborted (no step follows) the snapshot still shows them running. When the engine holds
        no request, its thread is idle and the LLMEngine's own numbers can be read directly.
        """
        try:
            stats = self.engine.get_stats()
            inner = getattr(self.engine, "engine", None)
            if inner is not None and not inner.has_unfinished_requests():
                stats = inner.get_stats()
            return stats
        except Exception:  # a scrape must never fail because the engine did
            logger.exception("reading engine stats failed")
            return None

    # -- requests -------------------------------------------------------------------------------
    def admit(self, cost: int) -> Reservation:
        """Reserve room for ``cost`` sequences or raise 503 (server busy) / 503 (shutting down)."""
        if self.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        limit = self.max_num_seqs + self.max_queue
        if cost > limit:  # could never be admitted: the request's fault, not the load's
            raise APIError(400, f"the request asks for {cost} sequences (prompts x n); this "
                           f"server admits at most {limit} at a time", param="prompt")
        if self.num_in_flight + cost > limit:
            waiting = max(0, self.num_in_flight - self.max_num_seqs)
            raise APIError(
                503, f"the server is at capacity ({self.num_in_flight} sequences in flight, "
                f"{waiting} waiting, --max-queue {self.max_queue}); retry later",
                code="server_overloaded", headers={"Retry-After": "1"},
            )
        self.num_in_flight += cost
        return Reservation(self, cost)

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """The engine's snapshots of one request; aborted there if we stop before it finishes
        (the consumer was cancelled, e.g. its client disconnected, or raised)."""
        finished = False
        try:
            async with aclosing(self.engine.generate(prompt_ids, params, request_id)) as outputs:
                async for output in outputs:
                    finished = output.finished
                    yield output
        finally:
            if not finished:
                self.abort(request_id)

    async def check_structured_outputs(self, params: StructuredOutputsParams) -> None:
        """Compile a constraint (or find it in the engine's cache) in a worker thread: raises
        ConfigError (GrammarError) naming the problem when it does not compile."""
        check = getattr(self.engine, "check_structured_outputs", None)
        if check is None:  # AsyncLLMEngine: the LLMEngine it drives holds the grammar cache
            check = getattr(getattr(self.engine, "engine", None), "check_structured_outputs", None)
        if check is None:
            raise ConfigError("structured output is not available in this engine")
        await asyncio.to_thread(check, params)

    def abort(self, request_id: str) -> None:
        """Synchronous on purpose: it runs in ``finally`` blocks of cancelled tasks, where a
        further ``await`` would be cancelled again before it could do anything."""
        try:
            self.engine.abort(request_id)
        except Exception:
            logger.exception("aborting request %s failed", request_id)


def _exited_rank(llm_engine) -> BaseException | None:
    """RankFailure for a tensor-parallel worker process that has exited while its engine still
    counts on it (``LLMEngine.shutdown`` clears ``ranks`` before stopping them)."""
    ranks = getattr(llm_engine, "ranks", None)
    if ranks is None or ranks.stopped:
        return None
    for rank, process in enumerate(ranks.pool.processes, start=1):
        if process.exitcode is not None:
            from trt_gemma.distributed.group import RankFailure

            return RankFailure(f"tensor-parallel rank {rank} (pid {process.pid}) exited with "
                               f"code {process.exitcode}")
    return None


async def _maybe_await(value):
    return await value if inspect.isawaitable(value) else value
