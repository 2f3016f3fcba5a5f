"""AsyncLLMEngine: the LLMEngine driven by a background thread, with one async stream per request.

The engine thread owns the LLMEngine; other threads only hand it commands (add, abort) through a
queue it drains before every step, so an abort (a client that disconnected, a cancelled task)
frees the request's blocks before the next step is scheduled. Outputs travel back to each
request's asyncio queue on its own event loop. The model's forward releases the GIL in PyTorch
kernels, so the event loop stays responsive while a step runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from trt_gemma.distributed.group import RankFailure
from trt_gemma.outputs import RequestOutput
from trt_gemma.runtime.engine import EngineStats, LLMEngine
from trt_gemma.runtime.sequence import Request
from trt_gemma.sampling_params import SamplingParams

_log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop stopped (shut down, or a step raised); no request can be served."""


def _death_message(error: BaseException | None) -> str:
    if error is None:
        return "the engine stopped"
    if isinstance(error, RankFailure):  # the engine cannot recover: its model is split
        return f"the engine stopped: a tensor-parallel rank failed: {error}"
    return f"the engine stopped: {error!r}"


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: RequestOutput | BaseException) -> None:
        # RuntimeError: the client's event loop is closed, nobody is listening
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, start: bool = True):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # owned by the engine thread
        self._wake = threading.Event()
        self._stopping = False
        self.error: BaseException | None = None  # what killed the loop, if anything
        self._stats = engine.get_stats()
        self._thread = threading.Thread(target=self._loop, name="trt-gemma-engine", daemon=True)
        if start:
            self._thread.start()

    @classmethod
    def from_source(cls, source: str, dtype="auto", device="cpu", **config) -> AsyncLLMEngine:
        return cls(LLMEngine.from_source(source, dtype=dtype, device=device, **config))

    # -- public API ----------------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], params: SamplingParams | None,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as it progresses (text is cumulative); the last is finished.
        Leaving the loop early (break, cancel, disconnect) aborts the request."""
        if not self.is_alive():
            raise EngineDeadError("the engine is not running") from self.error
        request = self.engine.make_request(request_id, prompt, params)  # errors raise here
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._submit(("add", request, stream))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    # Rejected (e.g. a duplicate id) or the engine died: nothing of ours to abort,
                    # and aborting by id would hit the other request that holds this id.
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._submit(("abort", request_id, None))

    def abort(self, request_id: str) -> None:
        """Queue an abort; the engine thread frees the request's blocks before its next step.
        A plain method (callable from any thread, and from ``finally`` blocks of cancelled tasks,
        where an ``await`` would be cancelled again before it ran)."""
        self._submit(("abort", request_id, None))

    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping and self.error is None

    def get_stats(self) -> EngineStats:
        """The snapshot taken after the latest step (safe from any thread)."""
        return self._stats

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stop the loop after the current step; open streams get EngineDeadError."""
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the engine thread ---------------------------------------------------------------------
    def _submit(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    def _drain(self) -> None:
        while True:
            try:
                kind, arg, stream = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                request: Request = arg
                try:
                    self.engine.add_request(request.request_id, request)
                except Exception as e:  # a duplicate id: tell that client only
                    stream.put(e)
                    continue
                self._streams[request.request_id] = stream
            elif self.engine.abort(arg):
                self._streams.pop(arg, None)

    def _loop(self) -> None:
        try:
            device = self.engine.model.device
            if device.type == "cuda" and device.index is not None:
                torch.cuda.set_device(device)  # a new thread starts on device 0, the model may not
            while not self._stopping:
                self._wake.clear()
                self._drain()
                if not self.engine.has_unfinished_requests():
                    self._stats = self.engine.get_stats()  # aborts show up while idle too
                    self._wake.wait()
                    continue
                for out in self.engine.step():
                    stream = self._streams.get(out.request_id)
                    if stream is not None:
                        stream.put(out)
                        if out.finished:
                            del self._streams[out.request_id]
                self._stats = self.engine.get_stats()
        except BaseException as e:  # noqa: BLE001 - a dead loop must tell every waiting client
            self.error = e
        finally:
            self._stopping = True
            # Requests still in the engine (also those whose abort was queued too late) give
            # their KV blocks back: a stopped engine holds nothing.
            for request_id in list(self.engine.requests):
                self.engine.abort(request_id)
            dead = EngineDeadError(_death_message(self.error))
            for stream in self._streams.values():
                stream.put(dead)
            self._streams.clear()
            self._drain_dead(dead)
            self._stop_ranks()

    def _stop_ranks(self) -> None:
        """Under tensor parallelism, stop the other ranks: from this thread, which owns the
        LLMEngine and no longer steps it. Never raises (the loop is ending either way)."""
        try:
            self.engine.shutdown()
        except Exception:  # noqa: BLE001
            _log.exception("stopping the tensor-parallel ranks failed")

    def _drain_dead(self, dead: EngineDeadError) -> None:
        """Requests submitted while stopping get the error too, never a silent hang."""
        while True:
            try:
                kind, _, stream = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                stream.put(dead)
