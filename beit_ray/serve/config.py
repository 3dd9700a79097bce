"""The serving job's typed config: checkpoints, HTTP limits, batching, replicas and resources.

The same dataclass feeds ``python jobs/serve.py --checkpoint URI`` and the ``args`` of
``cluster/serve.yaml`` (``beit_ray.serve.app:app_builder``). Per-deployment Serve settings in
the YAML's ``deployments:`` list (autoscaling_config, ray_actor_options) override these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from beit_ray.config import RayConfig, StorageConfig, check

ServeDtype = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass
class HttpConfig:
    """Where the HTTP proxy listens and what a request may hold."""

    host: str = "127.0.0.1"
    """Listen address; 0.0.0.0 exposes the endpoints to the network."""
    port: int = 8000
    """Listen port."""
    max_body_mb: float = 16.0
    """Largest request body in MiB; larger bodies get 413."""
    max_pixels: int = 50_000_000
    """Largest decoded image (width x height); larger images get 413 before decoding."""
    default_top_k: int = 5
    """/classify answers this many classes unless the query says ?top_k=N."""
    max_top_k: int = 1000
    """Largest top_k a request may ask for (422 above it)."""

    def __post_init__(self) -> None:
        check(0 < self.port < 65536, "http.port", "must be in 1..65535")
        check(self.max_body_mb > 0, "http.max_body_mb", "must be positive")
        check(self.max_pixels > 0, "http.max_pixels", "must be positive")
        check(self.default_top_k >= 1, "http.default_top_k", "must be >= 1")
        check(
            self.max_top_k >= self.default_top_k, "http.max_top_k", "must be >= http.default_top_k"
        )


@dataclass
class BatchingConfig:
    """Dynamic batching in each model replica (``@serve.batch``)."""

    max_batch_size: int = 8
    """Most requests run in one forward pass; 1 turns batching off."""
    batch_wait_timeout_s: float = 0.01
    """How long a replica waits to fill a batch after the first request arrives."""

    def __post_init__(self) -> None:
        check(self.max_batch_size >= 1, "batching.max_batch_size", "must be >= 1")
        check(self.batch_wait_timeout_s >= 0, "batching.batch_wait_timeout_s", "must be >= 0")


@dataclass
class ReplicaConfig:
    """One model deployment's autoscaling and per-replica resources."""

    min_replicas: int = 1
    """Autoscaling floor."""
    max_replicas: int = 2
    """Autoscaling ceiling."""
    target_ongoing_requests: float = 4.0
    """Serve adds replicas when requests in flight per replica exceed this."""
    max_ongoing_requests: int = 32
    """Requests a replica accepts at once (keep >= batching.max_batch_size to fill batches)."""
    num_cpus: float = 1.0
    """Logical CPUs per replica."""
    num_gpus: float = 0.0
    """GPUs per replica (0 on CPU-only machines; fractions share a GPU)."""
    threads: int | None = None
    """torch CPU threads per replica; unset: num_cpus rounded up."""
    dtype: ServeDtype = "auto"
    """Model weights and activations: float32 answers as transformers does (1e-4); bfloat16 is
    ~5x faster on CPUs with AMX and on recent GPUs (scores within ~1e-2); float16 for GPUs.
    auto: bfloat16 when the replica holds a GPU (tensor cores), else float32."""
    upscale_delay_s: float = 2.0
    """Seconds of sustained load before adding a replica."""
    downscale_delay_s: float = 30.0
    """Seconds of low load before removing a replica."""

    def __post_init__(self) -> None:
        check(self.min_replicas >= 0, "replicas.min_replicas", "must be >= 0")
        check(
            self.max_replicas >= max(1, self.min_replicas),
            "replicas.max_replicas",
            "must be >= min_replicas and >= 1",
        )
        check(
            self.target_ongoing_requests > 0, "replicas.target_ongoing_requests", "must be positive"
        )
        check(self.max_ongoing_requests >= 1, "replicas.max_ongoing_requests", "must be >= 1")
        check(self.num_cpus > 0, "replicas.num_cpus", "must be positive")
        check(self.num_gpus >= 0, "replicas.num_gpus", "must be >= 0")
        check(self.threads is None or self.threads >= 1, "replicas.threads", "must be >= 1")

    def autoscaling_config(self) -> dict[str, float | int]:
        return {
            "min_replicas": self.min_replicas,
            "initial_replicas": max(1, self.min_replicas),
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
        }


@dataclass
class ServeConfig:
    """Serve /classify and /segment from checkpoints (HF folders or beit-ray runs, local or s3://)."""

    checkpoint: str = ""
    """A classification checkpoint (served at /classify) or a segmentation one (/segment)."""
    segment_checkpoint: str = ""
    """A second, segmentation checkpoint for /segment when --checkpoint classifies."""
    name: str = "beit"
    """Serve application name."""
    http: HttpConfig = field(default_factory=HttpConfig)
    """HTTP listener and request limits."""
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    """Dynamic batching."""
    classify: ReplicaConfig = field(default_factory=ReplicaConfig)
    """The classification deployment."""
    segment: ReplicaConfig = field(default_factory=ReplicaConfig)
    """The segmentation deployment."""
    ingress_cpus: float = 0.5
    """Logical CPUs of each ingress replica (decodes and checks requests)."""
    ingress_replicas: int = 1
    """Ingress replicas (the HTTP front that decodes images)."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Ray connection."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object-store credentials and endpoint (default: the AWS_* environment)."""

    def __post_init__(self) -> None:
        check(self.ingress_cpus > 0, "ingress_cpus", "must be positive")
        check(self.ingress_replicas >= 1, "ingress_replicas", "must be >= 1")
        check(bool(self.name), "name", "must not be empty")

    def require(self) -> None:
        """A run needs a checkpoint (kept out of __post_init__ so ``--help`` can build defaults)."""
        check(bool(self.checkpoint), "checkpoint", "is required (an HF folder or a beit-ray run)")
