"""What a Ray Serve deployment of trt-gemma is made of, as data: the replica's engine settings and
how many replicas, with what resources, routed how. No Ray import here: the options are plain
dicts that ``ray_serve.py`` hands to ``serve.deployment(...).options(...)``, so they can be
checked (and documented) without a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trt_gemma.errors import ConfigError

ROUTERS = ("prefix", "pow2")
# Ray's prefix-aware router. The public path imports ray.serve.llm, which needs ray[llm]'s extra
# dependencies (pyarrow); the class itself does not, so its defining module is the fallback.
PREFIX_ROUTER_PATHS = (
    "ray.serve.llm.request_router.PrefixCacheAffinityRouter",
    "ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router."
    "PrefixCacheAffinityRouter",
)


@dataclass(frozen=True)
class ReplicaSettings:
    """One replica's engine and HTTP app: the same knobs as ``trt-gemma serve``."""

    source: str  # bundled name, .gguf, HF dir or engine dir (must exist on every node)
    served_model_name: str | None = None  # default: the source's name
    dtype: str = "auto"
    device: str | None = None  # None: cuda where the replica got a GPU, else cpu
    # Ranks per replica: each replica starts its own N - 1 rank processes (one GPU each on
    # CUDA, where Ray gives the replica N GPUs; gloo processes on its CPUs otherwise).
    tensor_parallel_size: int = 1
    engine_config: dict = field(default_factory=dict)  # EngineConfig fields (max_num_seqs, ...)
    max_queue: int = 128  # our own admission limit per replica (503 beyond it)
    api_keys: tuple[str, ...] = ()
    generation_config: str = "auto"
    verify: bool = True
    max_body_bytes: int = 8 << 20
    torch_threads: int | None = None  # None: leave torch's default (OMP_NUM_THREADS)
    cors: Any = None  # trt_gemma.server.app.CORSSettings, or None for no CORS headers
    access_log: bool = False  # one log line per request in the replica's log

    def __post_init__(self):
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"--tensor-parallel-size must be >= 1, got "
                              f"{self.tensor_parallel_size}")
        if self.device not in (None, "cpu", "cuda"):
            raise ConfigError(f"--device must be cpu or cuda, got {self.device!r}")

    @property
    def max_num_seqs(self) -> int:
        default = 256 if self.device == "cuda" else 32
        return int(self.engine_config.get("max_num_seqs") or default)


@dataclass(frozen=True)
class ScaleSettings:
    """How many replicas, what each holds, and how requests pick one."""

    replicas: int = 1  # fixed count, or the autoscaling minimum when max_replicas is set
    max_replicas: int | None = None  # set: Ray autoscales between replicas and this
    target_ongoing_requests: float = 16.0  # autoscaling: in-flight requests per replica
    cpus_per_replica: float = 1.0  # Ray CPUs reserved (and torch threads on CPU)
    gpus: bool = False  # give each replica tensor_parallel_size GPUs
    router: str = "prefix"  # prefix: Ray's PrefixCacheAffinityRouter; pow2: Ray's default
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    graceful_shutdown_timeout_s: float = 30.0  # serve --shutdown-timeout

    def __post_init__(self):
        if self.replicas < 1:
            raise ConfigError(f"--replicas must be >= 1, got {self.replicas}")
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ConfigError(f"--max-replicas ({self.max_replicas}) must be >= --replicas "
                              f"({self.replicas})")
        if self.target_ongoing_requests <= 0:
            raise ConfigError(f"--target-ongoing-requests must be > 0, got "
                              f"{self.target_ongoing_requests}")
        if self.cpus_per_replica < 0:
            raise ConfigError(f"--cpus-per-replica must be >= 0, got {self.cpus_per_replica}")
        if self.router not in ROUTERS:
            raise ConfigError(f"--router must be one of {', '.join(ROUTERS)}, got "
                              f"{self.router!r}")


def model_deployment_options(scale: ScaleSettings, replica: ReplicaSettings) -> dict:
    """Options of the model deployment (``serve.deployment(...).options(**these)``), except
    the request router, which needs Ray to resolve (``ray_serve.router_config``)."""
    options = {
        "ray_actor_options": {
            "num_cpus": scale.cpus_per_replica,
            # A replica's GPUs follow its tensor-parallel size: Ray sets CUDA_VISIBLE_DEVICES
            # to them, and the rank processes the replica starts inherit it.
            "num_gpus": replica.tensor_parallel_size if scale.gpus else 0,
        },
        # What one replica's server admits before answering 503 itself: beyond it requests
        # wait in Ray's router for a replica with room, instead of being refused.
        "max_ongoing_requests": replica.max_num_seqs + replica.max_queue,
        "health_check_period_s": scale.health_check_period_s,
        "health_check_timeout_s": scale.health_check_timeout_s,
        # A replica being stopped or replaced gets this long to finish its requests.
        "graceful_shutdown_timeout_s": scale.graceful_shutdown_timeout_s,
    }
    if scale.max_replicas is None:
        options["num_replicas"] = scale.replicas
    else:
        options["num_replicas"] = "auto"
        options["autoscaling_config"] = {
            "min_replicas": scale.replicas,
            "initial_replicas": scale.replicas,
            "max_replicas": scale.max_replicas,
            "target_ongoing_requests": scale.target_ongoing_requests,
        }
    return options


INGRESS_OPTIONS = {
    # The ingress only forwards bytes: it reserves no CPU, so it never keeps a model replica
    # from being placed, and it admits far more than any replica (Ray's default is 5).
    "num_replicas": 1,
    "ray_actor_options": {"num_cpus": 0},
    "max_ongoing_requests": 4096,
}
