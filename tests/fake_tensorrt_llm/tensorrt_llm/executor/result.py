"""Fake of tensorrt_llm/executor/result.py: ``CompletionOutput`` and ``GenerationResult``.

Real behaviour reproduced (file: tensorrt_llm/executor/result.py, 1.0 / 1.1):

- ``CompletionOutput(index, text="", token_ids=[], cumulative_logprob=None, logprobs=[],
  finish_reason=None, stop_reason=None)``: ``token_ids`` is cumulative (each response's new ids
  are ``extend``-ed onto it); ``token_ids_diff`` is ``token_ids[_last_token_ids_len:]``;
  ``finish_reason`` in ``'stop' | 'length' | 'timeout' | 'cancelled'``.
- ``GenerationResultBase._handle_sequence``: END_ID -> ``'stop'`` with ``stop_reason`` None (the
  C++ executor does not return the end id among the tokens: NVIDIA/TensorRT-LLM issue #2190,
  "expected behavior"); STOP_WORDS -> ``'stop'``, ``stop_reason`` the matched stop token id, and
  the stop ids cut from ``token_ids`` unless ``include_stop_str_in_output``; LENGTH ->
  ``'length'``; CANCELLED -> ``'cancelled'``.
- ``GenerationResult``: ``request_id``, ``prompt_token_ids``, ``outputs``, ``finished``;
  ``abort()`` calls ``executor.abort_request(request_id)`` (the request then ends with a final
  cancelled response); ``__aiter__`` / ``__anext__`` handle one response per step and return
  ``self`` until the final one; ``result()`` / ``aresult()`` wait for the end. An executor error
  is raised from the step that receives it (real: ``RequestError`` via the background error
  handler).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
from dataclasses import dataclass, field

from tensorrt_llm import _fake


class RequestError(RuntimeError):
    """Real: tensorrt_llm/executor/utils.py ``RequestError``."""


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    _last_token_ids_len: int = 0

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def token_ids_diff(self) -> list[int]:
        return self.token_ids[self._last_token_ids_len:]


@dataclass
class _Response:
    new_tokens: list[list[int]]  # per sequence index
    finish_reasons: list[str | None]
    stop_reasons: list[int | None]
    is_final: bool
    error: str | None = None


class GenerationResult:
    def __init__(self, request_id: int, prompt_token_ids: list[int], sampling_params,
                 streaming: bool, executor, max_seq_len: int):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self._streaming = streaming
        self._executor = executor
        self._done = False
        self._aborted = False
        self._cancel = False
        self._outputs = [CompletionOutput(i) for i in range(sampling_params.best_of)]
        # the executor side: tokens generated per sequence, whether it ended
        self._generated = [[] for _ in self._outputs]
        self._ended = [False for _ in self._outputs]
        self._max_seq_len = max_seq_len
        try:
            self._loop = asyncio.get_running_loop()
            self._aqueue: asyncio.Queue | None = asyncio.Queue()
        except RuntimeError:
            self._loop, self._aqueue = None, None
        self._queue: queue.Queue = queue.Queue()
        self._reasons: list[tuple[str | None, int | None]] = [(None, None)] * len(self._outputs)
        self._pending = _Response([[] for _ in self._outputs], [None] * len(self._outputs),
                                  [None] * len(self._outputs), False)

    # -- public API -------------------------------------------------------------------------
    @property
    def outputs(self) -> list[CompletionOutput]:
        return self._outputs[:self.sampling_params.n]

    @property
    def finished(self) -> bool:
        return self._done

    def abort(self) -> None:
        _fake.record("RequestOutput.abort", {"request_id": self.request_id})
        self._executor.abort_request(self.request_id)
        self._aborted = True

    def aborted(self) -> bool:
        return self._aborted

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._done:
            raise StopAsyncIteration
        assert self._aqueue is not None, "created outside an event loop"
        self._handle(await self._aqueue.get())
        return self

    def result(self, timeout: float | None = None):
        while not self._done:
            self._handle(self._queue.get(timeout=timeout))
        return self

    # -- the client side of a response --------------------------------------------------------
    def _handle(self, response: _Response) -> None:
        if response.error is not None:
            self._done = True
            raise RequestError(response.error)
        self._done = response.is_final
        sp = self.sampling_params
        for i, out in enumerate(self._outputs):
            out._last_token_ids_len = len(out.token_ids)
            out.token_ids.extend(response.new_tokens[i])
            if response.finish_reasons[i] is not None:  # the C++ side's per-sequence reason
                self._reasons[i] = (response.finish_reasons[i], response.stop_reasons[i])
            reason, stop_reason = self._reasons[i]
            if reason == "cancelled":
                out.finish_reason = "cancelled"
            elif reason is not None and self._done:  # real: reasons are applied when done
                out.finish_reason = reason
                if reason == "stop" and stop_reason is not None:
                    out.stop_reason = stop_reason
                    if not sp.include_stop_str_in_output:
                        out.token_ids = out.token_ids[:-1]

    # -- the executor side (called by the fake executor thread) --------------------------------
    def _deliver(self, response: _Response) -> None:
        if self._loop is not None:
            # the client's loop may be closed (asyncio.run ended): nobody is listening
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._aqueue.put_nowait, response)
        else:
            self._queue.put(response)

    def step(self) -> bool:
        """One decoding iteration; returns True when the request is over."""
        sp = self.sampling_params
        n = len(self._outputs)
        if self._cancel:
            self._deliver(_Response([[] for _ in range(n)], ["cancelled"] * n, [None] * n, True))
            return True
        response = _Response([[] for _ in range(n)], [None] * n, [None] * n, False)
        stop_ids = set(sp.stop_token_ids or ())
        for i in range(n):
            if self._ended[i]:
                continue
            generated = self._generated[i]
            if _fake.FAIL_AT is not None and len(generated) >= _fake.FAIL_AT:
                self._deliver(_Response([], [], [], True, error="fake executor error: CUDA "
                                        "out of memory"))
                return True
            token = _fake.MODEL(self.prompt_token_ids, generated)
            if token == sp.end_id and not sp.ignore_eos:
                response.finish_reasons[i] = "stop"  # END_ID: not returned
                self._ended[i] = True
                continue
            generated.append(token)
            response.new_tokens[i].append(token)
            if token in stop_ids:
                response.finish_reasons[i], response.stop_reasons[i] = "stop", token
                self._ended[i] = True
            elif (len(generated) >= sp.max_tokens
                  or len(self.prompt_token_ids) + len(generated) >= self._max_seq_len):
                response.finish_reasons[i] = "length"
                self._ended[i] = True
        response.is_final = all(self._ended)
        if self._streaming:
            self._deliver(response)
        else:  # one response at the end, carrying every token
            pending = self._pending
            for i in range(n):
                pending.new_tokens[i].extend(response.new_tokens[i])
                pending.finish_reasons[i] = response.finish_reasons[i] or pending.finish_reasons[i]
                pending.stop_reasons[i] = response.stop_reasons[i] or pending.stop_reasons[i]
            if response.is_final:
                pending.is_final = True
                self._deliver(pending)
        return response.is_final
