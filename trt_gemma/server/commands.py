"""``trt-gemma serve``: load a model, start the engine and serve the OpenAI API with uvicorn.

The model is loaded before the port opens, so /health answering at all means "ready". SIGTERM (or
Ctrl-C) stops accepting connections, lets in-flight requests finish for --shutdown-timeout
seconds, cancels (and so aborts in the engine) whatever is still running, then stops the engine.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
from pathlib import Path

from trt_gemma.errors import ConfigError

logger = logging.getLogger("trt_gemma.server")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve the OpenAI API (completions, chat) over HTTP")
    p.add_argument("source", help="bundled name (gemma3-270m), .gguf file, HF dir or engine dir")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default loopback; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("TRT_GEMMA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (env TRT_GEMMA_API_KEY)")
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
    p.add_argument("--max-queue", type=int, default=128,
                   help="sequences allowed to wait beyond --max-num-seqs; more get 503")
    p.add_argument("--max-body-bytes", type=int, default=8 << 20, help="larger bodies get 413")
    p.add_argument("--shutdown-timeout", type=int, default=30,
                   help="seconds in-flight requests may take to finish after SIGTERM")
    p.add_argument("--log-level", default="info", help="debug | info | warning | error")
    p.set_defaults(func=cmd_serve)


def _check(args: argparse.Namespace) -> None:
    checks = [
        ("--port", 0 <= args.port <= 65535, "must be in [0, 65535]"),
        ("--max-queue", args.max_queue >= 0, "must be >= 0"),
        ("--max-body-bytes", args.max_body_bytes >= 1024, "must be >= 1024"),
        ("--shutdown-timeout", args.shutdown_timeout >= 0, "must be >= 0"),
        ("--kv-cache-gib", args.kv_cache_gib is None or args.kv_cache_gib > 0, "must be > 0"),
    ]
    for name, ok, why in checks:
        if not ok:
            raise ConfigError(f"{name} {why}, got {getattr(args, name[2:].replace('-', '_'))!r}")


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

    from trt_gemma.server.app import create_app
    from trt_gemma.server.engine_client import EngineClient

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
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
    if not _is_loopback(args.host) and not args.api_key:
        logger.warning("binding %s without --api-key: anyone who can reach it can use it",
                       args.host)
    client = EngineClient.from_source(args.source, dtype=args.dtype, device=device,
                                      verify=not args.no_verify, max_queue=args.max_queue,
                                      **engine_config)
    name = args.served_model_name or default_model_name(args.source)
    app = create_app(client, name, api_key=args.api_key, max_body_bytes=args.max_body_bytes)
    logger.info("serving %s as %r on http://%s:%d (max_model_len %d, max_num_seqs %d)",
                args.source, name, args.host, args.port, client.max_model_len,
                client.max_num_seqs)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout,
                            access_log=args.log_level == "debug")
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it once it has shut down; with the default
    # SIGTERM handler that would kill the process after a clean drain. A no-op handler makes a
    # graceful SIGTERM exit 0 (uvicorn installs its own handlers while serving).
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run()
    return 0 if server.started else 1
