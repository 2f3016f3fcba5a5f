"""``trt-gemma serve SOURCE --replicas N``: the serve command's arguments as a Ray Serve
application, started on a local Ray (or the cluster at --ray-address) and kept until SIGTERM or
Ctrl-C, when the application is shut down (each replica drains its engine)."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time

from trt_gemma.deploy.settings import ReplicaSettings, ScaleSettings
from trt_gemma.errors import ConfigError

logger = logging.getLogger("trt_gemma.deploy")


def settings_from_args(args: argparse.Namespace, engine_config: dict, api_keys: list[str],
                       cors=None) -> tuple[ReplicaSettings, ScaleSettings]:
    """``engine_config``/``api_keys``/``cors``: as ``cmd_serve`` derived them for a single
    server."""
    if args.ssl_keyfile or args.ssl_certfile:
        # Ray's HTTP proxy, not our uvicorn, holds the socket.
        raise ConfigError("--ssl-keyfile/--ssl-certfile are not supported with --replicas: "
                          "terminate TLS in front of Ray Serve (a load balancer or ingress)")
    replica = ReplicaSettings(
        source=args.source, served_model_name=args.served_model_name, dtype=args.dtype,
        device=args.device, tensor_parallel_size=args.tensor_parallel_size,
        engine_config=engine_config, max_queue=args.max_queue, api_keys=tuple(api_keys),
        generation_config=args.generation_config, verify=not args.no_verify,
        max_body_bytes=args.max_body_bytes,
        torch_threads=max(1, int(args.cpus_per_replica)) if args.device != "cuda" else None,
        cors=cors, access_log=not args.disable_log_requests)
    scale = ScaleSettings(
        replicas=args.replicas, max_replicas=args.max_replicas,
        target_ongoing_requests=args.target_ongoing_requests,
        cpus_per_replica=args.cpus_per_replica, gpus=args.device != "cpu" and _has_gpus(args),
        router=args.router, graceful_shutdown_timeout_s=float(args.shutdown_timeout))
    return replica, scale


def _has_gpus(args: argparse.Namespace) -> bool:
    if args.device == "cuda":
        return True
    import torch  # --device unset: GPUs per replica where this machine has them

    return torch.cuda.is_available()


def serve_replicas(args: argparse.Namespace, engine_config: dict, api_keys: list[str],
                   cors=None) -> int:
    import ray
    from ray import serve

    from trt_gemma.deploy.ray_serve import APP_NAME, build_application

    replica, scale = settings_from_args(args, engine_config, api_keys, cors)
    stop: list[int] = []  # set from before Ray starts: a SIGTERM during the deploy counts too
    def on_signal(signum, frame):
        stop.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=True)
    signal.signal(signal.SIGTERM, on_signal)  # ray.init installs its own (it exits at once)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_application(replica, scale), name=APP_NAME, route_prefix="/")
    logger.info("serving %s on Ray Serve at http://%s:%d: %s replicas, router %s",
                args.source, args.host, args.port,
                f"{scale.replicas}..{scale.max_replicas}" if scale.max_replicas
                else scale.replicas, scale.router)
    try:
        while not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    logger.info("shutting down the Ray Serve application (replicas drain their engines)")
    # Bounded: a Ctrl-C in a terminal (or a signal to the process group) reaches Ray's own
    # processes too, and serve.delete would then wait for a cluster that is gone.
    deleting = threading.Thread(target=serve.shutdown, daemon=True)
    deleting.start()
    deleting.join(args.shutdown_timeout + 10)
    if deleting.is_alive():
        logger.warning("Ray Serve did not shut down in %d s; leaving it", args.shutdown_timeout)
    ray.shutdown()
    return 0
