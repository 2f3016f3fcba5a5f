"""TrtllmEngine: a TensorRT-LLM engine behind the surface our server and LLM use.

It has AsyncLLMEngine's shape (``generate(prompt, params, request_id)`` async-iterating our
``RequestOutput`` snapshots, ``abort``, ``is_alive``, ``get_stats``, ``shutdown``,
``check_structured_outputs``) and drives TensorRT-LLM's LLM API (``LLM.generate_async(...,
streaming=True)``; in-flight batching and the paged KV cache are TensorRT-LLM's). TensorRT-LLM
is imported only here, when an engine is loaded.

We send token ids and do the text side ourselves, so behaviour matches the native engine: our
tokenizer's incremental detokenization, stop strings cut from the text (and the request aborted
in TensorRT-LLM once one is found), finish and stop reasons. TensorRT-LLM's tokenizer is skipped.

API used (TensorRT-LLM 1.0 / 1.1 LLM API; tests/fake_tensorrt_llm records the exact names):
``tensorrt_llm._tensorrt_engine.LLM`` (the TensorRT-engine LLM; in 0.x releases plain
``tensorrt_llm.LLM``), ``tensorrt_llm.llmapi.KvCacheConfig``, ``tensorrt_llm.SamplingParams``;
the ``RequestOutput`` of ``generate_async``: async iteration, ``outputs[i].token_ids``
(cumulative), ``finish_reason`` / ``stop_reason``, ``finished``, ``abort()``; ``LLM.shutdown()``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from trt_gemma.errors import ConfigError, RequestError
from trt_gemma.outputs import CompletionOutput, RequestMetrics, RequestOutput
from trt_gemma.runtime.detokenizer import TextState
from trt_gemma.runtime.engine import EngineStats
from trt_gemma.sampling_params import SamplingParams, StructuredOutputsParams
from trt_gemma.trtllm_runtime.detect import TrtllmSource, find_trtllm_source
from trt_gemma.trtllm_runtime.params import EndTokens, check_supported, trtllm_sampling_kwargs

logger = logging.getLogger("trt_gemma.trtllm")

INSTALL_HINT = "pip install tensorrt_llm --extra-index-url https://pypi.nvidia.com"
# EngineConfig fields that only mean something to the native engine
NATIVE_ONLY = ("block_size", "num_kv_blocks", "enforce_eager", "cuda_graph_batch_sizes", "seed",
               "greedy_head_max_rows", "cpu_single_thread_below", "cpu_int8_decode_max_rows",
               "logprobs_mode", "tensor_parallel_timeout_s")


def import_tensorrt_llm(source: str | Path) -> SimpleNamespace:
    """The three TensorRT-LLM names we use, or a one-line ConfigError naming the source."""
    try:
        import tensorrt_llm
        from tensorrt_llm.llmapi import KvCacheConfig
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] == "tensorrt_llm":
            raise ConfigError(f"{source} is a TensorRT-LLM engine; serving it needs TensorRT-LLM, "
                              f"which is not installed ({INSTALL_HINT})") from None
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{source} is a TensorRT-LLM engine, but importing tensorrt_llm "
                          f"failed: {message}") from None
    try:  # 1.0+: tensorrt_llm.LLM is the PyTorch backend; TensorRT engines have their own class
        from tensorrt_llm._tensorrt_engine import LLM
    except ImportError:
        LLM = tensorrt_llm.LLM  # 0.x: the TensorRT engine LLM  # noqa: N806
    return SimpleNamespace(LLM=LLM, KvCacheConfig=KvCacheConfig,
                           SamplingParams=tensorrt_llm.SamplingParams)


def load_tokenizer(directory: Path):
    from trt_gemma.tokenizer import GemmaTokenizer

    if (directory / GemmaTokenizer.META_FILE).is_file():
        return GemmaTokenizer.load(directory)
    return GemmaTokenizer.from_hf_dir(directory)


@dataclass(frozen=True)
class RuntimeOptions:
    """What we pass to TensorRT-LLM's LLM(...) and KvCacheConfig(...), from our EngineConfig
    fields and the engine's run-time settings."""

    llm: dict[str, Any]
    kv_cache: dict[str, Any]
    max_model_len: int
    max_num_seqs: int
    asked_num_seqs: int  # before the engine's max_batch_size capped it


def runtime_options(found: TrtllmSource, **engine_config) -> RuntimeOptions:
    """Map EngineConfig fields onto TensorRT-LLM's arguments; refuse what has no meaning there.
    Limits fixed by trtllm-build (batch, tokens per step, sequence length) cap ours."""
    native = sorted(k for k in engine_config if k in NATIVE_ONLY)
    unknown = sorted(k for k in engine_config if k not in NATIVE_ONLY and k not in (
        "max_num_seqs", "max_num_batched_tokens", "max_model_len", "kv_cache_memory",
        "gpu_memory_utilization", "enable_prefix_caching", "kv_cache_dtype",
        "tensor_parallel_size"))
    if native or unknown:
        names = ", ".join(native + unknown)
        raise ConfigError(f"{names}: not a setting of the TensorRT-LLM backend (native engine "
                          "only, or unknown)")
    kv_dtype = engine_config.get("kv_cache_dtype", "auto")
    if kv_dtype != "auto":
        raise ConfigError(f"kv_cache_dtype {kv_dtype!r}: a TensorRT engine's KV-cache dtype is "
                          "fixed when trtllm-build runs (--kv-cache-dtype at `trt-gemma build`)")
    max_len = engine_config.get("max_model_len") or found.max_seq_len
    if max_len > found.max_seq_len:
        raise ConfigError(f"max_model_len {max_len} exceeds the engine's max_seq_len "
                          f"{found.max_seq_len} (fixed when trtllm-build ran)")
    seqs = engine_config.get("max_num_seqs") or found.max_batch_size
    asked_seqs, seqs = seqs, min(seqs, found.max_batch_size)
    mapping = found.pretrained_config.get("mapping") or {}
    built_tp = int(mapping.get("tp_size", 1))
    asked_tp = engine_config.get("tensor_parallel_size")
    if asked_tp is not None and int(asked_tp) != built_tp:
        # the split is in the engine's weights: TensorRT-LLM cannot run it over other ranks
        raise ConfigError(f"tensor_parallel_size {asked_tp}: this TensorRT-LLM engine was built "
                          f"for {built_tp} rank(s) (trt-gemma build --tp-size); pass {built_tp} "
                          "or leave it unset")
    llm: dict[str, Any] = {
        "model": str(found.engine_dir),
        "skip_tokenizer_init": True,  # we send ids and detokenize ourselves
        "tensor_parallel_size": built_tp,
        "pipeline_parallel_size": int(mapping.get("pp_size", 1)),
        "max_batch_size": seqs,
        "max_seq_len": max_len,
    }
    tokens = engine_config.get("max_num_batched_tokens")
    if tokens is not None:
        llm["max_num_tokens"] = min(tokens, found.max_num_tokens or tokens)
    windows = found.max_attention_window
    if windows is not None:  # "the whole sequence" is as long as this run allows
        windows = [min(w, max_len) for w in windows]
    kv: dict[str, Any] = {
        # TensorRT-LLM's Gemma switches only the rope base per layer; the sliding window is
        # this run-time list (one entry per layer, repeated cyclically)
        "max_attention_window": windows,
        "sink_token_length": found.sink_token_length,
        "enable_block_reuse": bool(engine_config.get("enable_prefix_caching", True)),
    }
    if engine_config.get("kv_cache_memory") is not None:
        kv["max_tokens"] = max(1, engine_config["kv_cache_memory"] // found.kv_bytes_per_token())
    if engine_config.get("gpu_memory_utilization") is not None:
        kv["free_gpu_memory_fraction"] = engine_config["gpu_memory_utilization"]
    return RuntimeOptions(llm, kv, max_len, seqs, asked_seqs)


@dataclass
class _Counters:
    """Totals since start, as the native engine counts them (see ``get_stats``)."""

    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_finished_requests: int = 0


@dataclass
class _Sample:
    """One of a request's n sequences, as our engine would see it."""

    text: TextState
    token_ids: list[int] = field(default_factory=list)
    seen: int = 0  # TensorRT-LLM tokens consumed (its token_ids are cumulative)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class TrtllmEngine:
    def __init__(self, llm, api: SimpleNamespace, tokenizer, found: TrtllmSource,
                 options: RuntimeOptions):
        self._llm = llm  # not named "engine": EngineClient reads .engine as the native LLMEngine
        self._api = api
        self.tokenizer = tokenizer
        self.source = found
        self.max_model_len = options.max_model_len
        self.max_num_seqs = options.max_num_seqs
        self.vocab_size = found.vocab_size
        self.generation_defaults = dict(found.generation_defaults)
        eos = frozenset(tokenizer.stop_token_ids)
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        self.ends = EndTokens(end_id=tokenizer.eos_id, pad_id=pad, stop_token_ids=eos)
        self._requests: dict[str, Any] = {}  # request id -> TensorRT-LLM RequestOutput
        self._aborted: set[str] = set()
        self._alive = True
        self._stats = _Counters()

    @classmethod
    def from_source(cls, source: str | Path, *, tokenizer: str | Path | None = None,
                    found: TrtllmSource | None = None, **engine_config) -> TrtllmEngine:
        """Start TensorRT-LLM on the engine ``source`` names (see detect.py for the layouts)."""
        found = found or find_trtllm_source(source, tokenizer)
        if found is None:
            raise ConfigError(f"{source}: not a TensorRT-LLM engine directory")
        options = runtime_options(found, **engine_config)  # bad options fail before the import
        api = import_tensorrt_llm(source)
        tok = load_tokenizer(found.tokenizer_dir)
        kv = api.KvCacheConfig(**options.kv_cache)
        if options.asked_num_seqs > options.max_num_seqs:  # logged once the import worked
            logger.info("max_num_seqs %d capped at the engine's max_batch_size %d",
                        options.asked_num_seqs, options.max_num_seqs)
        logger.info("starting TensorRT-LLM on %s (attention windows %s, sink tokens %d)",
                    found.engine_dir, found.max_attention_window, found.sink_token_length)
        llm = api.LLM(kv_cache_config=kv, **options.llm)
        return cls(llm, api, tok, found, options)

    # -- the AsyncLLMEngine surface ------------------------------------------------------------
    def is_alive(self) -> bool:
        return self._alive

    def get_stats(self) -> EngineStats:
        """What /metrics reads. TensorRT-LLM keeps its scheduler and KV cache to itself: waiting
        sequences, KV usage, preemptions and prefix-cache numbers are reported as 0, not
        guessed; running is the requests we have in flight there."""
        return EngineStats(
            num_running=len(self._requests), num_waiting=0, kv_cache_usage=0.0,
            num_preemptions=0, prefix_cache_queried_tokens=0, prefix_cache_hit_tokens=0,
            num_prompt_tokens=self._stats.num_prompt_tokens,
            num_generation_tokens=self._stats.num_generation_tokens,
            num_finished_requests=self._stats.num_finished_requests, num_kv_blocks=())

    def shutdown(self, timeout: float | None = None) -> None:
        del timeout  # TensorRT-LLM's shutdown waits for its workers itself
        if self._alive:
            self._alive = False
            self._llm.shutdown()

    def check_structured_outputs(self, params: StructuredOutputsParams) -> None:
        raise ConfigError("structured output is not supported by the TensorRT-LLM backend "
                          f"({params.kind} constraint refused)")

    def abort(self, request_id: str) -> None:
        """Ask TensorRT-LLM to cancel the request (it ends with a final 'cancelled' response)."""
        result = self._requests.get(request_id)
        if result is not None and request_id not in self._aborted:
            self._aborted.add(request_id)
            result.abort()

    async def generate(self, prompt: str | list[int], params: SamplingParams | None,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Snapshots of one request (text cumulative, as the native engine's); the last is
        finished. Leaving early (break, cancel, disconnect) aborts it in TensorRT-LLM."""
        from trt_gemma.runtime.async_engine import EngineDeadError

        if not self._alive:
            raise EngineDeadError("the TensorRT-LLM engine is shut down")
        params = params if params is not None else SamplingParams()
        ids = self._prompt_ids(prompt, request_id)
        check_supported(params)
        if request_id in self._requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        max_tokens = min(params.max_tokens, self.max_model_len - len(ids))
        sampling = self._api.SamplingParams(**trtllm_sampling_kwargs(params, self.ends,
                                                                     max_tokens))
        metrics = RequestMetrics(arrival_time=time.monotonic())
        result = self._llm.generate_async(ids, sampling_params=sampling, streaming=True)
        self._requests[request_id] = result
        self._stats.num_prompt_tokens += len(ids)
        samples = [_Sample(TextState(self.tokenizer, params.stop, params.skip_special_tokens))
                   for _ in range(params.n)]
        finished = False
        try:
            async for update in result:
                progressed = False
                for out in update.outputs:
                    progressed |= self._advance(samples[out.index], out, params, max_tokens)
                finished = all(s.finish_reason is not None for s in samples)
                if not progressed and not finished:
                    continue
                now = time.monotonic()
                metrics.first_token_time = metrics.first_token_time or now
                metrics.last_token_time = now
                if finished:
                    metrics.finished_time = now
                    if any(s.finish_reason != "abort" for s in samples):
                        self._stats.num_finished_requests += 1
                    if not update.finished:  # a stop string: TensorRT-LLM would go on
                        self.abort(request_id)
                yield self._snapshot(request_id, prompt, ids, samples, finished, metrics)
                if finished:
                    return
            # TensorRT-LLM ended without a final state for some sample (cannot happen with
            # its documented finish reasons): end it as aborted rather than hang the client
            for s in samples:
                if s.finish_reason is None:
                    s.finish_reason = "abort"
            finished = True
            yield self._snapshot(request_id, prompt, ids, samples, True, metrics)
        finally:
            if not finished:
                self.abort(request_id)
            self._requests.pop(request_id, None)
            self._aborted.discard(request_id)

    # -- internals -----------------------------------------------------------------------------
    def _prompt_ids(self, prompt: str | list[int], request_id: str) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in
                                                                               prompt]
        if not ids:
            raise RequestError(f"request {request_id}: the prompt is empty")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise RequestError(f"request {request_id}: prompt token ids must be in "
                               f"[0, {self.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise RequestError(
                f"request {request_id}: the prompt has {len(ids)} tokens, but the context holds "
                f"{self.max_model_len} (prompt + at least one generated token)")
        return ids

    def _advance(self, sample: _Sample, out, params: SamplingParams, max_tokens: int) -> bool:
        """Feed one sample the tokens TensorRT-LLM added since the last update; apply our stop
        rules (the native engine's, in its order). Returns whether anything changed."""
        if sample.finish_reason is not None:
            return False
        new = list(out.token_ids[sample.seen:])
        sample.seen = len(out.token_ids)
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else
                                              set(self.ends.stop_token_ids))
        for token in new:
            sample.token_ids.append(token)
            self._stats.num_generation_tokens += 1
            n = len(sample.token_ids)
            if token in stops:
                sample.finish_reason, sample.stop_reason = "stop", token
            elif stop := sample.text.add(token, n > params.min_tokens):
                sample.finish_reason, sample.stop_reason = "stop", stop
            elif n >= max_tokens:
                sample.finish_reason = "length"
            if sample.finish_reason is not None:
                break
        if sample.finish_reason is None and out.finish_reason is not None:
            self._end(sample, out.finish_reason, out.stop_reason)
        ended = sample.finish_reason not in (None, "abort")
        if ended and not isinstance(sample.stop_reason, str) and (stop := sample.text.finish()):
            sample.finish_reason, sample.stop_reason = "stop", stop  # held-back text released
        return bool(new) or sample.finish_reason is not None

    def _end(self, sample: _Sample, reason: str, stop_reason: int | str | None) -> None:
        """TensorRT-LLM ended the sequence for a reason our token checks did not see."""
        if reason == "stop":
            if stop_reason is None:
                # its end_id: the executor ends on it without returning it; our engine counts
                # the end token among the generated ones, so it is added back here
                sample.token_ids.append(self.ends.end_id)
                self._stats.num_generation_tokens += 1
                stop_reason = self.ends.end_id
            sample.finish_reason, sample.stop_reason = "stop", stop_reason
        elif reason == "length":
            sample.finish_reason = "length"
        else:  # "cancelled" (our abort), "timeout"
            sample.finish_reason = "abort"

    def _snapshot(self, request_id: str, prompt, ids: list[int], samples: list[_Sample],
                  finished: bool, metrics: RequestMetrics) -> RequestOutput:
        outputs = [CompletionOutput(index=i, text=s.text.visible_text, token_ids=list(s.token_ids),
                                    finish_reason=s.finish_reason, stop_reason=s.stop_reason)
                   for i, s in enumerate(samples)]
        return RequestOutput(request_id, prompt if isinstance(prompt, str) else None, ids,
                             outputs, finished=finished, metrics=replace(metrics))

    # -- synchronous use (LLM) -----------------------------------------------------------------
    def generate_all(self, prompts: list[str | list[int]], params: list[SamplingParams],
                     first_id: int = 0) -> list[RequestOutput]:
        """Every prompt at once (TensorRT-LLM batches them in flight); the finished outputs."""
        for p in params:  # a bad request fails the call before any runs
            check_supported(p)

        async def one(i: int, prompt, p: SamplingParams) -> RequestOutput:
            outputs = [out async for out in self.generate(prompt, p, f"llm-{first_id + i}")]
            return outputs[-1]

        async def run_all() -> list[RequestOutput]:
            return await asyncio.gather(*(one(i, prompt, p) for i, (prompt, p)
                                          in enumerate(zip(prompts, params, strict=True))))

        return asyncio.run(run_all())

    def stream_text(self, prompt: str | list[int], params: SamplingParams,
                    request_id: str) -> Iterator[str]:
        """Text pieces of one completion as they are generated, on a private event loop."""
        loop = asyncio.new_event_loop()
        outputs = self.generate(prompt, params, request_id)
        emitted = 0
        try:
            while True:
                try:
                    out = loop.run_until_complete(outputs.__anext__())
                except StopAsyncIteration:
                    return
                text = out.outputs[0].text
                if len(text) > emitted:
                    yield text[emitted:]
                    emitted = len(text)
        finally:
            loop.run_until_complete(outputs.aclose())  # aborts it if unfinished
            loop.close()
