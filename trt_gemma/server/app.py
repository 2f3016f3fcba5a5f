"""The FastAPI app: routes, API-key check, body-size limit, error shapes and the engine's lifetime.

``create_app`` builds everything from arguments: no module-level state, one metrics registry per
app, so tests can run several apps in one process. The engine is started in the lifespan (inside
the server's event loop) and shut down after uvicorn has drained or cancelled in-flight requests.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from trt_gemma.server.chat import create_chat_completion
from trt_gemma.server.completions import create_completion
from trt_gemma.server.engine_client import EngineClient
from trt_gemma.server.errors import error_body, install_error_handlers
from trt_gemma.server.metrics import ServerMetrics
from trt_gemma.server.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from trt_gemma.server.serving import check_model

DEFAULT_MAX_BODY_BYTES = 8 << 20  # a 128k-token id list is ~1 MiB of JSON


def create_app(client: EngineClient, model_name: str, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    metrics = ServerMetrics(client.stats)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await client.start()
        try:
            yield
        finally:
            await client.shutdown()

    app = FastAPI(title="trt-gemma", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.client, app.state.metrics = client, metrics
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        if client.is_alive():
            return JSONResponse({"status": "ok"})
        return JSONResponse(error_body(503, "the engine is not running"), status_code=503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, max_model_len=client.max_model_len)])

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> ModelCard:
        check_model(model_id, model_name)
        return ModelCard(id=model_name, max_model_len=client.max_model_len)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _unless_disconnected(
            request, create_completion(body, client, metrics, model_name))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await _unless_disconnected(
            request, create_chat_completion(body, client, metrics, model_name))

    # Outermost first: the size limit runs before auth reads anything, auth before any route.
    app.add_middleware(APIKeyMiddleware, api_key=api_key)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_body_bytes)
    return app


async def _unless_disconnected(request: Request, handler: Awaitable[Response]) -> Response:
    """Run a handler, cancelling it if the client hangs up first (its engine requests are then
    aborted by their ``finally``). A streaming handler returns at once and is not affected: the
    stream itself is cancelled by Starlette on disconnect."""
    work = asyncio.ensure_future(handler)
    hangup = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({work, hangup}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        raise
    finally:
        hangup.cancel()
    if not work.done():  # the client left
        work.cancel()
        return Response(status_code=499)  # nobody is listening; the status is for the logs
    return work.result()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _json_error(status: int, message: str, code: str | None = None,
                headers: list[tuple[bytes, bytes]] | None = None) -> Callable[[Send], Awaitable]:
    import json

    body = json.dumps(error_body(status, message, code=code)).encode()

    async def send_it(send: Send) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), *(headers or [])]})
        await send({"type": "http.response.body", "body": body})

    return send_it


class APIKeyMiddleware:
    """``Authorization: Bearer KEY`` on /v1/*, compared in constant time (hmac.compare_digest on
    bytes, so a non-ASCII header cannot raise). /health and /metrics stay open for probes."""

    def __init__(self, app: ASGIApp, api_key: str | None):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.expected is None or scope["type"] != "http" or not scope["path"].startswith("/v1"):
            return await self.app(scope, receive, send)
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        await _json_error(401, "invalid or missing API key (Authorization: Bearer <key>)",
                          code="invalid_api_key",
                          headers=[(b"www-authenticate", b"Bearer")])(send)


class BodySizeLimitMiddleware:
    """413 for a body over ``max_bytes``: refused from Content-Length before reading, or cut off
    while reading when the length is not declared (chunked uploads). The latter raises an
    HTTPException from ``receive``, which FastAPI lets through its body parsing to the handlers."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = f"the request body exceeds {self.max_bytes} bytes"
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _json_error(413, too_large)(send)
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise StarletteHTTPException(413, too_large)
            return message

        await self.app(scope, counting_receive, send)
