"""Run an ASGI app in-process for one HTTP request that arrived somewhere else.

A Ray Serve replica receives requests as Python objects through a DeploymentHandle, not over a
socket. To answer them with exactly the behaviour of ``trt-gemma serve`` (the same routes, API
keys, OpenAI error bodies, SSE streaming, metrics), the replica hands each one to our own FastAPI
app through the ASGI interface and yields what the app sends, as plain data the handle can carry.

The response's start (status and headers) travels together with its first body chunk, so a
non-streaming answer, which the app sends as one chunk, is one message: a replica that dies can
never leave a client holding a 200 with half a JSON body. The app's lifespan (engine start and
shutdown) is driven by ``Lifespan``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message


@dataclass
class ForwardedRequest:
    """One HTTP request, as the ingress received it (picklable; no sockets)."""

    method: str
    path: str
    query_string: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # lower-case names
    body: bytes = b""
    # The text a prefix-aware router matches on (Ray's PrefixCacheAffinityRouter reads an
    # argument's ``prompt`` attribute): the request's prompt or messages, else its path.
    prompt: str | list = ""


@dataclass
class ResponseStart:
    """The first message of a response: status, headers and the first body chunk."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    more_body: bool  # further chunks (bytes) follow

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


async def call_app(app: ASGIApp, request: ForwardedRequest,
                   extra_headers: list[tuple[bytes, bytes]] = ()
                   ) -> AsyncIterator[ResponseStart | bytes]:
    """Yield a ResponseStart, then the remaining body chunks as bytes.

    Leaving the iteration early (the caller was cancelled, its client disconnected) tells the
    app the client disconnected and cancels it, so its engine requests are aborted.
    """
    outbox: asyncio.Queue[Message | None] = asyncio.Queue()
    disconnected = asyncio.Event()
    body_sent = False

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()  # the app polls for a disconnect while it works
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await outbox.put(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
        "method": request.method, "scheme": "http", "path": request.path,
        "raw_path": request.path.encode(), "root_path": "", "query_string": request.query_string,
        "headers": list(request.headers), "client": None, "server": None,
    }

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            await outbox.put(None)  # end of response (or the app raised)

    task = asyncio.ensure_future(run())
    try:
        start = await outbox.get()
        if start is None:
            task.result()  # re-raises what the app raised before answering
            raise RuntimeError("the app ended without a response")
        status, headers = start["status"], [*start.get("headers", []), *extra_headers]
        first = await outbox.get()
        more = first is not None and first.get("more_body", False)
        yield ResponseStart(status, headers, first.get("body", b"") if first else b"", more)
        while more:
            message = await outbox.get()
            if message is None:
                break
            more = message.get("more_body", False)
            if message.get("body"):
                yield message["body"]
    finally:
        disconnected.set()
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


class Lifespan:
    """Drive an ASGI app's lifespan (startup, then shutdown) as a server would."""

    def __init__(self, app: ASGIApp):
        self._app = app
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._outbox: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Future | None = None

    async def _receive(self) -> Message:
        return await self._inbox.get()

    async def _send(self, message: Message) -> None:
        await self._outbox.put(message)

    async def startup(self) -> None:
        """Raises RuntimeError with the app's message if its startup failed."""
        self._task = asyncio.ensure_future(
            self._app({"type": "lifespan", "asgi": {"version": "3.0"}}, self._receive,
                      self._send))
        await self._inbox.put({"type": "lifespan.startup"})
        reply = await self._next_reply()
        if reply["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"app startup failed: {reply.get('message', reply['type'])}")

    async def shutdown(self) -> None:
        if self._task is None or self._task.done():
            return
        await self._inbox.put({"type": "lifespan.shutdown"})
        await self._next_reply()
        with contextlib.suppress(Exception):
            await self._task

    async def _next_reply(self) -> Message:
        reply = asyncio.ensure_future(self._outbox.get())
        await asyncio.wait({reply, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if reply.done():
            return reply.result()
        reply.cancel()
        error = self._task.exception()
        return {"type": "lifespan.failed", "message": repr(error) if error else "app exited"}
