"""The FastAPI app: routes, API keys, CORS, access log, body-size limit, error shapes and the
engine's lifetime.

``create_app`` builds everything from arguments: no module-level state, one metrics registry per
app, so tests can run several apps in one process. The engine is started in the lifespan (inside
the server's event loop) and shut down after uvicorn has drained or cancelled in-flight requests.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Body, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import trt_gemma
from trt_gemma.server import responsible, tokenization
from trt_gemma.server.chat import create_chat_completion
from trt_gemma.server.completions import create_completion
from trt_gemma.server.engine_client import EngineClient
from trt_gemma.server.errors import error_body, install_error_handlers
from trt_gemma.server.metrics import ServerMetrics
from trt_gemma.server.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from trt_gemma.server.serving import check_model
from trt_gemma.server.tokenization import DetokenizeRequest

DEFAULT_MAX_BODY_BYTES = 8 << 20  # a 128k-token id list is ~1 MiB of JSON
# Probes and scrapers carry no key; everything else (any route added later too) needs one.
OPEN_PATHS = frozenset({"/health", "/version", "/metrics"})
access_logger = logging.getLogger("trt_gemma.server.access")


@dataclass(frozen=True)
class CORSSettings:
    """Which browser origins may call the API (FastAPI's CORSMiddleware). No origins: no CORS
    headers at all, so browsers on other origins are refused, as without CORS support."""

    allowed_origins: tuple[str, ...] = ()  # "*" for any origin
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False  # cookies / Authorization from the browser


def create_app(client: EngineClient, model_name: str,
               api_key: str | Sequence[str] | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, cors: CORSSettings | None = None,
               access_log: bool = False,
               guard: responsible.ResponsibleServing | None = None) -> FastAPI:
    """api_key: one key or several (any is accepted); access_log: one info line per request;
    guard: safety screening and watermark detection (server/responsible.py)."""
    metrics = ServerMetrics(client.stats, model_name)
    if guard is not None and guard.screener is not None:
        guard.screener.on_latency = metrics.safety_screening_time.observe

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await client.start()
        try:
            yield
        finally:
            await client.shutdown()
            if guard is not None and guard.screener is not None:
                guard.screener.close()

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

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": trt_gemma.__version__}

    @app.post("/tokenize")
    async def tokenize(body: Annotated[dict[str, Any], Body()]) -> JSONResponse:
        request = tokenization.tokenize_request(body)
        return JSONResponse(tokenization.tokenize(request, client, model_name))

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> JSONResponse:
        return JSONResponse(tokenization.detokenize(body, client, model_name))

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
            request, create_completion(body, client, metrics, model_name, guard))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await _unless_disconnected(
            request, create_chat_completion(body, client, metrics, model_name, guard))

    responsible.add_routes(app, guard, client, model_name)

    # Added innermost first. Outermost: the access log sees every answer (401, 413, preflight);
    # CORS answers preflights before auth (a browser sends them without credentials) and adds
    # its headers to errors too; the size limit runs before auth reads anything; auth before
    # any route.
    keys = [api_key] if isinstance(api_key, str) else list(api_key or [])
    app.add_middleware(APIKeyMiddleware, api_keys=keys)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_body_bytes)
    if cors is not None and cors.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cors.allowed_origins,
                           allow_methods=cors.allowed_methods,
                           allow_headers=cors.allowed_headers,
                           allow_credentials=cors.allow_credentials)
    if access_log:
        app.add_middleware(AccessLogMiddleware)
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
    """``Authorization: Bearer KEY`` with any of the keys, on every path but OPEN_PATHS.

    Each key is compared in constant time (hmac.compare_digest on bytes, so a non-ASCII header
    cannot raise), and all of them every time, so the time taken does not tell which key came
    closest. OPTIONS passes: a CORS preflight carries no credentials, and routes do nothing on it.
    """

    def __init__(self, app: ASGIApp, api_keys: Sequence[str] = ()):
        self.app = app
        self.expected = [f"Bearer {key}".encode() for key in api_keys if key]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (not self.expected or scope["type"] != "http" or scope["path"] in OPEN_PATHS
                or scope["method"] == "OPTIONS"):
            return await self.app(scope, receive, send)
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        matches = [hmac.compare_digest(given, key) for key in self.expected]
        if any(matches):
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


class AccessLogMiddleware:
    """One info line per request once its answer is complete (a stream: when it ends):
    client, method, path, HTTP version, status and duration. Replaces uvicorn's access log,
    which has no duration."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500  # if the app raises before answering, the outer error handler sends 500

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            client = scope.get("client")
            path = scope.get("path", "")
            if scope.get("query_string"):
                path += "?" + scope["query_string"].decode("latin-1")
            access_logger.info('%s - "%s %s HTTP/%s" %d %.1f ms',
                               f"{client[0]}:{client[1]}" if client else "-", scope["method"],
                               path, scope.get("http_version", "1.1"), status,
                               (time.perf_counter() - start) * 1e3)
