"""Replicas of the trt-gemma server on Ray Serve, behind one OpenAI-compatible ingress.

    HTTP ─► Ray's proxy ─► OpenAIIngress (1 replica, forwards bytes)
                               │ DeploymentHandle, streaming; router: prefix-aware or pow-2
                               ▼
                           ModelReplica × N (each: our engine + our FastAPI app, unchanged)

Each model replica runs exactly what ``trt-gemma serve`` runs (``EngineClient.from_source`` and
``create_app``), and answers every forwarded request through that app in-process
(``asgi_bridge.call_app``): routes, API keys, errors, SSE and /metrics are the server's own.
Every answer carries ``x-trt-gemma-replica`` (the replica's id). The ingress adds only what a
single server cannot do: when a replica dies, the requests it held get an OpenAI-style 503
(before any byte was sent) or an error event closing their SSE stream (after), and Ray starts
a replacement (its controller health-checks every replica through ``check_health``, which asks
the engine whether its loop is alive).

Run it with ``trt-gemma serve SOURCE --replicas N`` or with Ray's own CLI::

    serve run trt_gemma.deploy.ray_serve:build_app source=gemma3-270m replicas=2
"""


import asyncio
import importlib
import json
import logging
import os

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from trt_gemma.deploy.asgi_bridge import ForwardedRequest, Lifespan, ResponseStart, call_app
from trt_gemma.deploy.settings import (
    INGRESS_OPTIONS,
    PREFIX_ROUTER_PATHS,
    ReplicaSettings,
    ScaleSettings,
    model_deployment_options,
)
from trt_gemma.errors import ConfigError
from trt_gemma.server.errors import error_body
from trt_gemma.server.sse import DONE, event

logger = logging.getLogger("trt_gemma.deploy")
REPLICA_HEADER = "x-trt-gemma-replica"
APP_NAME = "trt-gemma"


class ModelReplica:
    """One engine and its HTTP app; Ray calls ``handle`` for every forwarded request."""

    async def __init__(self, settings: ReplicaSettings):
        import torch

        from trt_gemma.server.app import create_app
        from trt_gemma.server.commands import default_model_name
        from trt_gemma.server.engine_client import EngineClient

        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
        engine_config = {"max_num_seqs": 256 if device == "cuda" else 32,
                         **settings.engine_config}
        if settings.tensor_parallel_size > 1:  # this replica is rank 0 and starts the others
            engine_config["tensor_parallel_size"] = settings.tensor_parallel_size
        # Loading takes seconds to minutes: off the event loop, so Ray's calls are answered.
        self.client = await asyncio.to_thread(
            EngineClient.from_source, settings.source, dtype=settings.dtype, device=device,
            verify=settings.verify, max_queue=settings.max_queue,
            generation_config=settings.generation_config, **engine_config)
        name = settings.served_model_name or default_model_name(settings.source)
        self.app = create_app(self.client, name, api_key=settings.api_keys,
                              max_body_bytes=settings.max_body_bytes, cors=settings.cors,
                              access_log=settings.access_log)
        self._lifespan = Lifespan(self.app)
        await self._lifespan.startup()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._id_header = [(REPLICA_HEADER.encode(), self.replica_id.encode())]
        logger.info("replica %s serving %s as %r on %s (pid %d)", self.replica_id,
                    settings.source, name, device, os.getpid())

    async def handle(self, request: ForwardedRequest):
        async for part in call_app(self.app, request, self._id_header):
            yield part

    def check_health(self) -> None:
        """Ray's controller calls this periodically; raising makes it replace the replica."""
        failure = self.client.failure()  # e.g. one of its tensor-parallel ranks exited
        if failure is not None:
            raise RuntimeError(f"the engine died: {failure}")
        if not self.client.is_alive():
            raise RuntimeError("the engine loop is not running")

    async def __del__(self):  # Ray calls it on graceful shutdown: drain the engine
        lifespan = getattr(self, "_lifespan", None)  # None: __init__ failed before it
        if lifespan is not None:
            await lifespan.shutdown()


async def _rest(stream, first: bytes, is_sse: bool):
    """The body after its first chunk; a replica lost mid-stream ends an SSE stream with an
    OpenAI error event and [DONE], as our server does for errors after the 200."""
    try:
        if first:
            yield first
        async for chunk in stream:
            yield chunk
    except Exception as e:
        api = _replica_error_body(e)
        logger.warning("replica lost mid-response: %s", e)
        if is_sse:
            yield event(api).encode() + DONE.encode()
    finally:
        stream.cancel()  # a no-op once finished; otherwise the replica aborts the request


def _error(status: int, message: str, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code=code), status_code=status)


def _replica_error_body(error: Exception) -> dict:
    if isinstance(error, BackPressureError):
        return error_body(503, "all replicas are at capacity; retry later",
                          code="server_overloaded")
    if isinstance(error, ray.exceptions.RayActorError):
        return error_body(503, "the model replica serving this request died; retry",
                          code="replica_failed")
    logger.error("forwarding to a replica failed: %r", error)
    return error_body(503, f"no model replica could answer ({type(error).__name__}); retry",
                      code="replica_unavailable")


def _replica_error(error: Exception) -> JSONResponse:
    body = _replica_error_body(error)
    return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})


def routing_text(method: str, path: str, body: bytes) -> str:
    """What the prefix-aware router matches replicas on: the prompt of a completion, the
    messages' text of a chat, else the route (never empty: Ray's router divides by its
    length)."""
    fallback = f"{method} {path}"
    if method != "POST" or not body:
        return fallback
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return fallback
    if not isinstance(data, dict):
        return fallback
    parts: list[str] = []
    prompt = data.get("prompt")
    if isinstance(prompt, str):
        parts.append(prompt)
    elif isinstance(prompt, list):
        parts += [p for p in prompt if isinstance(p, str)]
    for message in data.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts += [c.get("text", "") for c in content
                      if isinstance(c, dict) and isinstance(c.get("text"), str)]
    return "".join(parts) or fallback


# Defined after the helpers it calls: serve.ingress serializes the FastAPI app (with its
# routes' functions and the globals they use) when the class is decorated.
ingress_app = FastAPI(title="trt-gemma (Ray Serve)", docs_url=None, redoc_url=None,
                      openapi_url=None)
FORWARDED_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]


@serve.deployment(name="OpenAIIngress", **INGRESS_OPTIONS)
@serve.ingress(ingress_app)
class OpenAIIngress:
    """Forwards each HTTP request to a model replica and streams its answer back."""

    def __init__(self, model: DeploymentHandle, max_body_bytes: int = 8 << 20):
        self.model = model.options(method_name="handle", stream=True)
        self.max_body_bytes = max_body_bytes

    @ingress_app.api_route("/{path:path}", methods=FORWARDED_METHODS)
    async def forward(self, path: str, request: Request) -> Response:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return _error(413, f"the request body exceeds {self.max_body_bytes} bytes")
        body = await request.body()
        if len(body) > self.max_body_bytes:
            return _error(413, f"the request body exceeds {self.max_body_bytes} bytes")
        forwarded = ForwardedRequest(
            method=request.method, path=request.url.path,
            query_string=request.scope.get("query_string", b""),
            headers=[(k, v) for k, v in request.scope["headers"] if k != b"host"], body=body,
            prompt=routing_text(request.method, request.url.path, body))
        stream = self.model.remote(forwarded)
        try:
            start: ResponseStart = await stream.__anext__()
        except StopAsyncIteration:
            return _error(500, "the replica sent no response")
        except Exception as e:  # the replica died, or Ray could not reach one
            stream.cancel()
            return _replica_error(e)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in start.headers}
        if not start.more_body:
            return Response(start.body, status_code=start.status, headers=headers)
        is_sse = (start.header(b"content-type") or b"").startswith(b"text/event-stream")
        return StreamingResponse(_rest(stream, start.body, is_sse), status_code=start.status,
                                 headers=headers)


def router_config(router: str) -> RequestRouterConfig | None:
    """Ray's prefix-aware router where this Ray has it; None (power of two choices, Ray's
    default) when asked for pow2 or when it is missing."""
    if router == "pow2":
        return None
    for path in PREFIX_ROUTER_PATHS:
        module, _, name = path.rpartition(".")
        try:
            router_class = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        return RequestRouterConfig(request_router_class=router_class)
    logger.warning("this Ray has no PrefixCacheAffinityRouter: routing by power of two choices")
    return None


def build_application(replica: ReplicaSettings, scale: ScaleSettings):
    """The Serve application: the ingress bound to N model replicas."""
    options = model_deployment_options(scale, replica)
    routing = router_config(scale.router)
    if routing is not None:
        options["request_router_config"] = routing
    model = serve.deployment(ModelReplica, name="ModelReplica").options(**options)
    return OpenAIIngress.bind(model.bind(replica), replica.max_body_bytes)


def build_app(args: dict):
    """``serve run trt_gemma.deploy.ray_serve:build_app key=value ...``: source (required),
    replicas, max_replicas, target_ongoing_requests, cpus_per_replica, gpus (true/false),
    router (prefix|pow2), tensor_parallel_size, dtype, device, served_model_name, max_num_seqs,
    max_model_len, kv_cache_gib, max_queue, api_key (comma list)."""
    args = dict(args)
    if "source" not in args:
        raise ConfigError("build_app needs source=NAME_OR_PATH")
    engine_config = {}
    for key in ("max_num_seqs", "max_model_len"):
        if key in args:
            engine_config[key] = int(args.pop(key))
    if "kv_cache_gib" in args:
        engine_config["kv_cache_memory"] = int(float(args.pop("kv_cache_gib")) * (1 << 30))
    device = args.pop("device", None)
    gpus = str(args.pop("gpus", device == "cuda")).lower() in ("1", "true", "yes")
    replica = ReplicaSettings(
        source=args.pop("source"), served_model_name=args.pop("served_model_name", None),
        dtype=args.pop("dtype", "auto"), device=device,
        tensor_parallel_size=int(args.pop("tensor_parallel_size", 1)),
        engine_config=engine_config, max_queue=int(args.pop("max_queue", 128)),
        api_keys=tuple(k for k in args.pop("api_key", "").split(",") if k),
        torch_threads=int(float(args.get("cpus_per_replica", 1))) or None)
    max_replicas = args.pop("max_replicas", None)
    scale = ScaleSettings(
        replicas=int(args.pop("replicas", 1)),
        max_replicas=int(max_replicas) if max_replicas is not None else None,
        target_ongoing_requests=float(args.pop("target_ongoing_requests", 16)),
        cpus_per_replica=float(args.pop("cpus_per_replica", 1)), gpus=gpus,
        router=args.pop("router", "prefix"))
    if args:
        raise ConfigError(f"build_app: unknown arguments {', '.join(sorted(args))}")
    return build_application(replica, scale)
