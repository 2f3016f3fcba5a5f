"""The fake's controls (no counterpart in TensorRT-LLM): the call record, the token rule, and
the background "executor" thread that produces one token per active request per tick, as
TensorRT-LLM's in-flight batching executor returns one streaming response per iteration.

Tests set ``MODEL`` (a function of the prompt ids and the tokens generated so far) and
``FAIL_AT`` (the generated-token count at which a request gets an executor error), and read
``CALLS``: ``(name, arguments)`` in call order.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

CALLS: list[tuple[str, dict]] = []
TICK_S = 0.002  # one decoding iteration


def echo(prompt_ids: list[int], generated: list[int]) -> int:
    """The default rule: repeat the prompt after its first token (BOS), cyclically."""
    body = prompt_ids[1:] or prompt_ids
    return body[len(generated) % len(body)]


MODEL: Callable[[list[int], list[int]], int] = echo
FAIL_AT: int | None = None


def record(name: str, arguments: dict) -> None:
    CALLS.append((name, dict(arguments)))


def calls(name: str) -> list[dict]:
    return [args for n, args in CALLS if n == name]


def reset() -> None:
    global MODEL, FAIL_AT
    CALLS.clear()
    MODEL, FAIL_AT = echo, None


class Executor:
    """Active requests stepped by one thread; a request's responses go to its result."""

    def __init__(self):
        self._active: list = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fake-trtllm-executor",
                                        daemon=True)
        self._thread.start()

    def submit(self, request) -> None:
        with self._lock:
            self._active.append(request)

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def is_shutdown(self) -> bool:
        return self._stop.is_set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                active = list(self._active)
            for request in active:
                if request.step():
                    with self._lock:
                        self._active.remove(request)
            time.sleep(TICK_S)
