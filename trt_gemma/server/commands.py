"""``trt-gemma serve``: load a model, start the engine and serve the OpenAI API with uvicorn.

The model is loaded before the port opens, so /health answering at all means "ready". SIGTERM (or
Ctrl-C) stops accepting connections, lets in-flight requests finish for --shutdown-timeout
seconds, cancels (and so aborts in the engine) whatever is still running, then stops the engine.
An engine that dies (a step raised; with ``-tp N`` typically a rank process that failed) stops
the server too: exit code 1 and one ``trt-gemma: error:`` line, so a supervisor restarts it.
Every log line (ours, uvicorn's, the access log's) has a timestamp: uvicorn's own logging config
is replaced by the root logger's format.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from trt_gemma.errors import ConfigError

logger = logging.getLogger("trt_gemma.server")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
API_KEY_ENV = "TRT_GEMMA_API_KEY"


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve the OpenAI API (completions, chat) over HTTP")
    p.add_argument("source", help="bundled name (gemma3-270m), .gguf file, HF dir or engine dir")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default loopback; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on all but /health, /version and "
                        "/metrics; repeat for several keys, any one is accepted (default: env "
                        f"{API_KEY_ENV}, a comma-separated list)")
    p.add_argument("--allowed-origins", default=None, metavar="LIST",
                   help="CORS: browser origins allowed to call the API, as a JSON list or a comma "
                        "list ('*' for any; default: none, no CORS headers)")
    p.add_argument("--allowed-methods", default="*", metavar="LIST",
                   help="CORS: allowed methods, JSON or comma list (default *)")
    p.add_argument("--allowed-headers", default="*", metavar="LIST",
                   help="CORS: allowed request headers, JSON or comma list (default *)")
    p.add_argument("--allow-credentials", action="store_true",
                   help="CORS: let browsers send credentials (cookies, Authorization)")
    p.add_argument("--ssl-keyfile", default=None, help="TLS: the server's private key (PEM)")
    p.add_argument("--ssl-certfile", default=None, help="TLS: the server's certificate (PEM)")
    p.add_argument("--ssl-ca-certs", default=None,
                   help="TLS: CA certificates to verify client certificates with")
    p.add_argument("--ssl-cert-reqs", type=int, default=0,
                   help="TLS: client certificates: 0 none, 1 optional, 2 required (Python's "
                        "ssl.CERT_* values; default 0)")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients send (default: the source's name)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--device", default=None, help="cuda if available, else cpu")
    p.add_argument("--no-verify", action="store_true", help="skip engine checksum verification")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + output tokens per sequence (default: the model's context)")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="sequences batched per step (default: 32 on CPU, 256 on CUDA)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="new tokens per step (default 2048, at least --max-num-seqs)")
    p.add_argument("--kv-cache-gib", type=float, default=None,
                   help="KV-cache size in GiB (default: 1 on CPU, the free memory on CUDA)")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--kv-cache-dtype", default="auto",
                   help="auto: FP8 on CUDA for engines built with --kv-cache-dtype fp8, else the "
                        "model's dtype; fp8: always (CPU: reference attention); model: never FP8")
    p.add_argument("--generation-config", choices=("auto", "vllm"), default="auto",
                   help="auto: sampling fields a request leaves unset come from the checkpoint's "
                        "generation_config.json; vllm: OpenAI's defaults whatever it says")
    p.add_argument("--max-queue", type=int, default=128,
                   help="sequences allowed to wait beyond --max-num-seqs; more get 503")
    p.add_argument("--max-body-bytes", type=int, default=8 << 20, help="larger bodies get 413")
    p.add_argument("--shutdown-timeout", type=int, default=30,
                   help="seconds in-flight requests may take to finish after SIGTERM")
    p.add_argument("--log-level", default="info", help="debug | info | warning | error")
    p.add_argument("--disable-log-requests", "--disable-access-log", action="store_true",
                   help="no access log line per request (method, path, status, duration)")
    from trt_gemma.responsible.commands import add_serve_arguments

    add_serve_arguments(p)
    from trt_gemma.runtime.speculative.flags import add_speculative_arguments

    add_speculative_arguments(p)
    from trt_gemma.distributed.flags import add_tensor_parallel_argument

    add_tensor_parallel_argument(p)  # with replicas: the ranks (GPUs) of each replica
    scale = p.add_argument_group("scale-out (Ray Serve; pip install -e '.[ray]')")
    scale.add_argument("--replicas", type=int, default=1, metavar="N",
                       help="more than 1: N engine replicas on Ray Serve behind one endpoint "
                            "(the autoscaling minimum with --max-replicas)")
    scale.add_argument("--ray", action="store_true",
                       help="serve through Ray Serve even with one replica")
    scale.add_argument("--max-replicas", type=int, default=None, metavar="N",
                       help="let Ray autoscale between --replicas and N on ongoing requests")
    scale.add_argument("--target-ongoing-requests", type=float, default=16.0,
                       help="autoscaling target of in-flight requests per replica (default 16)")
    scale.add_argument("--cpus-per-replica", type=float, default=1.0,
                       help="Ray CPUs reserved per replica, also its torch threads on CPU")
    scale.add_argument("--router", choices=("prefix", "pow2"), default="prefix",
                       help="prefix: Ray's prefix-cache affinity router; pow2: power of two "
                            "choices (Ray's default)")
    scale.add_argument("--ray-address", default=None,
                       help="a running Ray cluster (default: start a local one)")
    p.set_defaults(func=cmd_serve)


def _check(args: argparse.Namespace) -> None:
    checks = [
        ("--port", 0 <= args.port <= 65535, "must be in [0, 65535]"),
        ("--max-queue", args.max_queue >= 0, "must be >= 0"),
        ("--max-body-bytes", args.max_body_bytes >= 1024, "must be >= 1024"),
        ("--shutdown-timeout", args.shutdown_timeout >= 0, "must be >= 0"),
        ("--kv-cache-gib", args.kv_cache_gib is None or args.kv_cache_gib > 0, "must be > 0"),
        ("--ssl-cert-reqs", args.ssl_cert_reqs in (0, 1, 2), "must be 0, 1 or 2"),
        ("--log-level", args.log_level.lower() in ("debug", "info", "warning", "error",
                                                   "critical"),
         "must be debug, info, warning, error or critical"),
    ]
    for name, ok, why in checks:
        if not ok:
            raise ConfigError(f"{name} {why}, got {getattr(args, name[2:].replace('-', '_'))!r}")
    if (args.ssl_keyfile is None) != (args.ssl_certfile is None):
        raise ConfigError("--ssl-keyfile and --ssl-certfile go together (TLS needs both)")
    for flag in ("--ssl-keyfile", "--ssl-certfile", "--ssl-ca-certs"):
        path = getattr(args, flag[2:].replace("-", "_"))
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{flag} {path}: no such file")


def parse_list(flag: str, value: str | None) -> tuple[str, ...]:
    """A JSON list of strings (vLLM's form) or a comma-separated list; None is empty."""
    if value is None:
        return ()
    if value.lstrip().startswith(("[", "{")):
        try:
            items = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{flag}: not a JSON list ({e.msg}): {value!r}") from None
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ConfigError(f"{flag}: expected a JSON list of strings, got {value!r}")
        return tuple(items)
    return tuple(item.strip() for item in value.split(",") if item.strip())


def api_keys(args: argparse.Namespace) -> list[str]:
    """--api-key (repeatable), else the comma-separated keys of $TRT_GEMMA_API_KEY."""
    given = args.api_key or os.environ.get(API_KEY_ENV, "").split(",")
    return list(dict.fromkeys(k.strip() for k in given if k.strip()))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_model_name(source: str) -> str:
    path = Path(source)
    if not path.exists():
        return source  # a bundled name
    return path.stem if path.is_file() else path.resolve().name


def cmd_serve(args: argparse.Namespace) -> int:
    _check(args)
    import torch
    import uvicorn

    from trt_gemma.server.app import CORSSettings, create_app
    from trt_gemma.server.engine_client import EngineClient

    keys = api_keys(args)
    cors = CORSSettings(parse_list("--allowed-origins", args.allowed_origins),
                        parse_list("--allowed-methods", args.allowed_methods),
                        parse_list("--allowed-headers", args.allowed_headers),
                        args.allow_credentials)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    engine_config = {"enable_prefix_caching": not args.no_prefix_caching,
                     "kv_cache_dtype": args.kv_cache_dtype,
                     "max_num_seqs": args.max_num_seqs or (256 if device == "cuda" else 32)}
    if args.max_model_len is not None:
        engine_config["max_model_len"] = args.max_model_len
    if args.max_num_batched_tokens is not None:
        engine_config["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.kv_cache_gib is not None:
        engine_config["kv_cache_memory"] = int(args.kv_cache_gib * (1 << 30))
    from trt_gemma.runtime.speculative.flags import speculative_options

    engine_config.update(speculative_options(args))
    if not _is_loopback(args.host) and not keys:
        logger.warning("binding %s without --api-key: anyone who can reach it can use it",
                       args.host)
    from trt_gemma.distributed.flags import tensor_parallel_options

    engine_config.update(tensor_parallel_options(args))
    from trt_gemma.server import responsible

    if args.replicas > 1 or args.ray or args.max_replicas is not None:
        if responsible.uses_responsible(args):
            raise ConfigError("--watermark-config and --safety-model are not available with Ray "
                              "replicas yet")
        from trt_gemma.deploy.launch import serve_replicas

        return serve_replicas(args, engine_config, keys, cors)
    engine_config.update(responsible.engine_watermark_option(args))
    client = EngineClient.from_source(args.source, dtype=args.dtype, device=device,
                                      verify=not args.no_verify, max_queue=args.max_queue,
                                      generation_config=args.generation_config,
                                      **engine_config)
    name = args.served_model_name or default_model_name(args.source)
    app = create_app(client, name, api_key=keys, max_body_bytes=args.max_body_bytes, cors=cors,
                     access_log=not args.disable_log_requests,
                     guard=responsible.build_guard(args, client))
    scheme = "https" if args.ssl_certfile else "http"
    logger.info("serving %s as %r on %s://%s:%d (max_model_len %d, max_num_seqs %d, "
                "tensor_parallel_size %d, %d API keys, CORS origins %s)", args.source, name,
                scheme, args.host, args.port, client.max_model_len, client.max_num_seqs,
                args.tensor_parallel_size, len(keys), ",".join(cors.allowed_origins) or "none")
    # log_config=None: uvicorn's loggers propagate to the root handler above (timestamps);
    # its access log is off, ours (with durations) replaces it.
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                            log_config=None, access_log=False,
                            timeout_graceful_shutdown=args.shutdown_timeout,
                            ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile,
                            ssl_ca_certs=args.ssl_ca_certs, ssl_cert_reqs=args.ssl_cert_reqs)
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it once it has shut down; with the default
    # SIGTERM handler that would kill the process after a clean drain. A no-op handler makes a
    # graceful SIGTERM exit 0 (uvicorn installs its own handlers while serving).
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    served = threading.Event()
    threading.Thread(target=_stop_when_engine_dies, args=(server, client, served),
                     name="trt-gemma-engine-watch", daemon=True).start()
    try:
        server.run()
    finally:
        served.set()
    failure = client.failure()
    if failure is not None:  # the engine died (a step raised, e.g. a rank failed): say why
        print(f"trt-gemma: error: {_one_line(_death_reason(failure))}", file=sys.stderr)
        return 1
    return 0 if server.started else 1


ENGINE_WATCH_PERIOD_S = 0.5


def _stop_when_engine_dies(server, client, served: threading.Event) -> None:
    """Stop uvicorn once the engine has died. A dead engine never comes back (under tensor
    parallelism its model is split over processes, one of which failed), so answering 503
    forever would only hide it from the supervisor that restarts the server: any engine death,
    not only a rank's, ends the server with exit code 1. An orderly shutdown is not a death."""
    while not served.wait(ENGINE_WATCH_PERIOD_S):
        if client.failure() is not None:
            logger.error("the engine died (%s); stopping the server",
                         _one_line(_death_reason(client.failure())))
            server.should_exit = True
            return


def _death_reason(error: BaseException) -> str:
    from trt_gemma.distributed.group import RankFailure

    if isinstance(error, RankFailure):
        return f"tensor-parallel rank failure: {error}"
    return f"the engine stopped: {type(error).__name__}: {error}"


def _one_line(text: str) -> str:
    return " ".join(text.split())[:500]
