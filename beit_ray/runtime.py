"""Starting or joining Ray for a job, what a job needs from the cluster, and rank-0 printing.

    init_ray(cfg.ray, cfg.storage)            # join RAY_ADDRESS / ray.address, or a local Ray
    check_training(cfg)                       # or check_job_outputs(...) for other jobs

Ray Data and Ray Train wait forever, without an error, for resources that never come (workers
holding every CPU, more GPU requests than GPUs), and outputs written to one node's disk are lost
to the others. Every check here runs before a job does any work and names the field to change.
On an autoscaling cluster what is up now is not the limit: the autoscaler's node types are,
and a shortfall it can still fill is a warning. Open-source Ray 2.60 publishes no node types
to the GCS (its ``ClusterConfig`` key is written only through an RPC no Ray 2.60 code calls),
so they are read where Ray's own autoscalers read them (:func:`autoscaler_limits`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

from beit_ray import storage
from beit_ray.config import RayConfig, StorageConfig

log = logging.getLogger(__name__)

# Where `ray up` leaves the launcher config on the head node (the v1 autoscaler reads it there).
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"


def print0(*args: Any, **kwargs: Any) -> None:
    """print on global rank 0 only (every process outside a distributed group is rank 0)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)


def init_ray(
    cfg: RayConfig, storage_cfg: StorageConfig | None = None, env: dict[str, str] | None = None
) -> None:
    """Join ``cfg.address`` or start a local Ray on loopback; workers get the storage env.

    A job run with ``ray job submit`` is already connected (RAY_ADDRESS is set), so this joins
    it. Calling again when Ray is up is a no-op.
    """
    import ray

    if ray.is_initialized():
        return
    runtime_env = {"env_vars": {**storage.worker_env(storage_cfg), **(env or {})}}
    for key in ("TORCH_EXTENSIONS_DIR", "RAY_AUTH_MODE", "OMP_NUM_THREADS"):
        if os.environ.get(key):
            runtime_env["env_vars"].setdefault(key, os.environ[key])
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        # In a submitted job, the job's runtime env already reaches every worker, and Ray
        # refuses to merge env_vars that both set: pass only the keys the job's env lacks.
        job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        taken = set((job_env.get("runtime_env") or {}).get("env_vars") or {})
        runtime_env["env_vars"] = {
            k: v for k, v in runtime_env["env_vars"].items() if k not in taken
        }
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        _console_after_init()
        return
    # A single-machine Ray stays on loopback instead of this machine's network address.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    temp_dir = cfg.temp_dir or tempfile.mkdtemp(prefix="ray_", dir="/tmp")
    ray.init(
        num_cpus=cfg.num_cpus,
        include_dashboard=False,
        _temp_dir=temp_dir,
        runtime_env=runtime_env,
        configure_logging=False,
        _system_config={"worker_niceness": cfg.worker_niceness},
    )
    _console_after_init()


def _console_after_init() -> None:
    """With a job log open (``console.start``), worker output and Ray's loggers go there."""
    from beit_ray import console

    if console.log_file():
        import ray.data  # noqa: F401  (configures its loggers on import: adopt them now)

        console.route_worker_output()
        console.adopt_loggers()


def worker_threads(requested: int | None, local_workers: int) -> int:
    """torch threads for one of ``local_workers`` processes sharing this node's cores."""
    if requested:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, local_workers))


def say(line: str) -> None:
    """Write one line to this process's stdout, once, also inside a Ray Train worker.

    Ray Train patches ``print`` in its workers to log through Train's logger, and when Ray has
    also wrapped ``sys.stdout`` it writes the line to both, so every progress line showed twice.
    """
    out = sys.__stdout__ or sys.stdout
    out.write(line + "\n")
    out.flush()


# --------------------------------------------------------------------------- cluster checks


@dataclass(frozen=True)
class Cluster:
    """Resources up now and, where an autoscaler is known, the most it can bring up."""

    cpus: float
    gpus: float
    nodes: int
    """Alive nodes now."""
    max_cpus: float | None = None
    """Most CPUs the autoscaler's node types allow; None: unknown."""
    max_gpus: float | None = None
    max_nodes: int | None = None
    fixed: bool = True
    """No autoscaler can add nodes (a local Ray). Unknown limits on a joined cluster are not fixed."""

    @classmethod
    def read(cls, ray_cfg: RayConfig | None = None) -> Cluster:
        """The connected Ray's view (call after ``init_ray``)."""
        import ray

        res = ray.cluster_resources()
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        joined = bool((ray_cfg.address if ray_cfg else None) or os.environ.get("RAY_ADDRESS"))
        limits = autoscaler_limits()
        if limits is None:
            return cls(res.get("CPU", 0.0), res.get("GPU", 0.0), nodes, fixed=not joined)
        return cls(
            res.get("CPU", 0.0),
            res.get("GPU", 0.0),
            nodes,
            max_cpus=max(limits.get("CPU", 0.0), res.get("CPU", 0.0)),
            max_gpus=max(limits.get("GPU", 0.0), res.get("GPU", 0.0)),
            max_nodes=max(int(limits.get("nodes", 1)), nodes),
            fixed=limits.get("nodes", 1) <= nodes,
        )

    def shortfall(self, key: str, need: float) -> str | None:
        """None when ``need`` of CPU/GPU is up now; "warn" when an autoscaler may bring it;
        "refuse" when it can never come."""
        now = self.cpus if key == "CPU" else self.gpus
        most = self.max_cpus if key == "CPU" else self.max_gpus
        if need <= now + 1e-9:
            return None
        if most is not None:
            return "refuse" if need > most + 1e-9 else "warn"
        return "refuse" if self.fixed else "warn"

    def multi_node(self) -> bool | None:
        """True with several nodes now or possible; None when an unknown autoscaler may add some."""
        if self.nodes > 1 or (self.max_nodes or 1) > 1:
            return True
        return False if self.fixed or self.max_nodes is not None else None

    def describe(self, key: str) -> str:
        now = self.cpus if key == "CPU" else self.gpus
        most = self.max_cpus if key == "CPU" else self.max_gpus
        if most is not None and most > now:
            return f"{now:g} {key}s up now, at most {most:g} with the autoscaler's node types"
        if most is None and not self.fixed:
            return f"{now:g} {key}s up now (the autoscaler's limits are unknown)"
        return f"{now:g} {key}s"


def autoscaler_limits() -> dict[str, float] | None:
    """{"CPU", "GPU", "nodes"} at the autoscaler's maximum, or None when no source is found.

    Read where Ray's autoscalers read their node types: on KubeRay the RayCluster object, through
    the head pod's service account (KubeRay's autoscaler RBAC), translated by Ray's own
    ``_derive_autoscaling_config_from_ray_cr``; on a ``ray up`` cluster the launcher config the
    v1 and v2 autoscalers load, ``~/ray_bootstrap_config.yaml`` on the head (a job's driver runs
    there). The GCS ``ClusterConfig`` is read first, for platforms that do report it.
    ``ray.autoscaler.v2.sdk.get_cluster_status`` lists live and pending nodes only, no maxima.
    """
    for source in (_gcs_limits, _kuberay_limits):
        limits = source()
        if limits is not None:
            return limits
    return _bootstrap_limits(os.path.expanduser(BOOTSTRAP_CONFIG))


def node_group_limits(groups: list[tuple[dict[str, float], int]]) -> dict[str, float]:
    """Totals over (resources per node, max nodes) groups; a max of -1 (unbounded) counts huge."""
    out: dict[str, float] = {"CPU": 0.0, "GPU": 0.0, "nodes": 0.0}
    for resources, count in groups:
        n = float(sys.maxsize) if count < 0 else float(count)
        out["nodes"] += n
        for key in ("CPU", "GPU"):
            out[key] += n * float(resources.get(key, 0.0))
    return out


def _gcs_limits() -> dict[str, float] | None:
    # Written by ReportClusterConfig, which no open-source Ray 2.60 autoscaler calls (Ray Data
    # and Ray Train read it too); a private API: any failure means "unknown", never a crash.
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception as e:  # noqa: BLE001
        log.debug("no cluster config from the GCS: %s", e)
        return None
    if config is None or not config.node_group_configs:
        return None
    return node_group_limits(
        [(dict(g.resources), int(g.max_count)) for g in config.node_group_configs]
    )


# KubeRay sets RAY_CLUSTER_NAME (newer releases also RAY_CLUSTER_NAMESPACE) on every Ray
# container, and with in-tree autoscaling gives the head pod a service account allowed to read
# its RayCluster (the autoscaler sidecar uses it; the Ray container shares it).
SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"


def _kuberay_limits() -> dict[str, float] | None:
    """The RayCluster's groups, as Ray's KubeRay autoscaler reads them (``ray kuberay-autoscaler``
    fetches the same object and translates it with the same function)."""
    name = os.environ.get("RAY_CLUSTER_NAME")
    if not name or not os.path.exists(os.path.join(SERVICE_ACCOUNT, "token")):
        return None
    try:
        from ray.autoscaler._private.kuberay.autoscaling_config import (
            _derive_autoscaling_config_from_ray_cr,
        )
        from ray.autoscaler._private.kuberay.node_provider import KubernetesHttpApiClient

        namespace = os.environ.get("RAY_CLUSTER_NAMESPACE")
        if not namespace:
            with open(os.path.join(SERVICE_ACCOUNT, "namespace")) as f:
                namespace = f.read().strip()
        ray_cr = KubernetesHttpApiClient(namespace).get(f"rayclusters/{name}")
        config = _derive_autoscaling_config_from_ray_cr(ray_cr)
    except Exception as e:  # noqa: BLE001 - no RBAC, no API server: the limits stay unknown
        log.debug("no RayCluster %r from the Kubernetes API: %s", name, e)
        return None
    return launcher_limits(config)


def _bootstrap_limits(path: str) -> dict[str, float] | None:
    """Limits from a cluster-launcher YAML file (``ray up``'s bootstrap config)."""
    if not os.path.exists(path):
        return None
    import yaml

    with open(path) as f:
        return launcher_limits(yaml.safe_load(f) or {})


def launcher_limits(cfg: dict[str, Any]) -> dict[str, float] | None:
    """Limits of an autoscaling config (``available_node_types``), capped by max_workers."""
    types = cfg.get("available_node_types") or {}
    head = cfg.get("head_node_type")
    groups = []
    for name, t in types.items():
        count = 1 if name == head else int(t.get("max_workers", cfg.get("max_workers", 0)))
        groups.append((dict(t.get("resources") or {}), count))
    if not groups:
        return None
    out = node_group_limits(groups)
    if "max_workers" in cfg:
        out["nodes"] = min(out["nodes"], 1 + int(cfg["max_workers"]))
    return out


_WARNED: set[str] = set()
"""Warnings already printed: a job checks before its own work and the library's run_* check
again for callers that skip the job, and a person needs each warning once."""


def _act(verdict: str | None, message: str) -> None:
    if verdict == "refuse":
        raise ValueError(message)
    if verdict == "warn" and message not in _WARNED:
        _WARNED.add(message)
        log.warning("%s (continuing: the autoscaler may still add nodes)", message)
        print(f"WARNING: {message} (continuing: the autoscaler may still add nodes)", flush=True)


def check_cpus(cfg: Any, ray_data_cpus: float, cluster: Cluster) -> str | None:
    """Fail clearly instead of hanging: Ray Data waits forever when workers hold every CPU."""
    s = cfg.scaling
    held = s.num_workers * s.cpus_per_worker
    verdict = cluster.shortfall("CPU", held + ray_data_cpus)
    _act(
        verdict,
        f"scaling: {s.num_workers} workers × {s.cpus_per_worker} CPU leave "
        f"{cluster.cpus - held:g} of {cluster.describe('CPU')} for Ray Data, which needs "
        f"{ray_data_cpus:g} (read tasks + actor pools) or the run hangs: lower "
        "scaling.cpus_per_worker or give Ray more logical CPUs (ray.num_cpus for a local Ray)",
    )
    return verdict


def check_gpus(cfg: Any, tokenizer_gpus: float, cluster: Cluster) -> str | None:
    """Training workers' GPUs plus the tokenizer pool's smallest size must fit the GPUs."""
    s = cfg.scaling
    workers = s.num_workers if s.use_gpu else 0
    actors = cfg.data.tokenizer_actors[0] if tokenizer_gpus > 0 else 0
    need = workers + actors * tokenizer_gpus
    if need == 0:
        return None
    verdict = cluster.shortfall("GPU", need)
    _act(
        verdict,
        f"scaling: {workers} training workers × 1 GPU + {actors} tokenizer actors × "
        f"{tokenizer_gpus:g} GPU need {need:g} GPUs, the cluster has {cluster.describe('GPU')}; "
        "Ray waits forever for the rest: lower scaling.num_workers, set "
        "data.tokenizer_num_gpus 0 (CPU actors), tokenize once ahead (jobs/tokenize_shards.py, "
        "then --shards), or add GPU nodes",
    )
    return verdict


def tokenizer_choice(
    requested: float | None, cluster: Cluster, train_gpus: bool = False
) -> tuple[float, str]:
    """(GPUs per tokenizer actor, why): ``requested``, else 1 GPU when the job trains on GPUs or
    the cluster has GPUs now or in its autoscaler's node types, else CPU actors.

    GPU actors never fall back to CPU: Ray Data waits for its pool's first actors (without a
    timeout by default) and their GPU demand makes the autoscaler start a GPU node.
    """
    if requested is not None:
        where = f"{requested:g} GPU" if requested else "CPU"
        return requested, f"{where} actors (data.tokenizer_num_gpus)"
    if cluster.gpus > 0:
        return 1.0, f"1-GPU actors: the cluster has {cluster.gpus:g} GPUs"
    if (cluster.max_gpus or 0.0) > 0:
        return 1.0, (
            "1-GPU actors: no GPU node is up, the autoscaler's node types have "
            f"{cluster.max_gpus:g} GPUs; the actors wait for one"
        )
    if train_gpus:
        return 1.0, (
            "1-GPU actors: training runs on GPUs, so GPU nodes exist or will; the actors wait "
            "for one as the training workers do"
        )
    if not cluster.fixed:
        return 0.0, (
            "CPU actors: no GPU is up and the autoscaler's limits are unknown; set "
            "data.tokenizer_num_gpus 1 to wait for GPU nodes instead"
        )
    return 0.0, "CPU actors: the cluster has no GPUs"


def tokenizer_gpus(
    requested: float | None,
    cluster: Cluster | None = None,
    train_gpus: bool = False,
    announce: bool = False,
) -> float:
    """GPUs per tokenizer actor (:func:`tokenizer_choice`); ``announce``: say which when the
    config left it unset and there was a choice (not on a fixed cluster without GPUs)."""
    if requested is not None:
        return requested
    cluster = cluster or Cluster.read()
    gpus, why = tokenizer_choice(None, cluster, train_gpus)
    if announce and (gpus or not cluster.fixed):
        print0(f"tokenizer: {why}")
    return gpus


def unshared_outputs(uris: dict[str, str | None], st: StorageConfig | None) -> dict[str, str]:
    """The ``uris`` (config field → value) a multi-node cluster refuses: local paths outside
    ``storage.shared_paths``. A relative path counts as local even under a shared path: it
    resolves inside each node's own copy of the job's working dir. Needs no Ray."""
    shared = [os.path.abspath(p) for p in ((st.shared_paths if st else None) or [])]
    out = {}
    for name, uri in uris.items():
        if not uri or storage.is_remote(uri):
            continue
        path = storage.strip_scheme(uri)
        if any(path == p or path.startswith(p.rstrip("/") + "/") for p in shared):
            continue
        out[name] = uri
    return out


def check_shared_storage(
    uris: dict[str, str | None], st: StorageConfig | None, cluster: Cluster
) -> None:
    """Outputs written by tasks on any node must be on storage every node sees.

    ``uris`` maps a config field to its value; object-store URIs and paths under
    ``storage.shared_paths`` pass. One node (or a local Ray) accepts anything.
    """
    multi = cluster.multi_node()
    if multi is False:
        return
    for name, uri in unshared_outputs(uris, st).items():
        where = f"{cluster.nodes} nodes" if cluster.nodes > 1 else "nodes the autoscaler can add"
        _act(
            "refuse" if multi else "warn",
            f"{name}: {uri!r} is a local path, but the cluster has {where}: tasks and workers "
            "on other nodes would write to their own disks (and Ray Train refuses local storage "
            "across nodes). Use an object store (s3://bucket/prefix), or an absolute path mounted "
            "on every node, declared with storage.shared_paths [/mnt/shared]",
        )


def check_job_outputs(
    uris: dict[str, str | None],
    ray_cfg: RayConfig,
    st: StorageConfig | None,
    cluster: Cluster | None = None,
) -> None:
    """:func:`check_shared_storage` for jobs that start Ray only when they need it (labelling,
    tokenizing). A local Ray such a job would start is one node, so Ray is joined here only
    when the job joins a cluster (ray.address, RAY_ADDRESS) or Ray is already up."""
    if cluster is None:
        joining = bool(ray_cfg.address or os.environ.get("RAY_ADDRESS"))
        up = "ray" in sys.modules and sys.modules["ray"].is_initialized()
        if not (joining or up):
            return
        init_ray(ray_cfg, st)
        cluster = Cluster.read(ray_cfg)
    check_shared_storage(uris, st, cluster)


def streams_tokens(cfg: Any) -> bool:
    """The training data runs tokenizer actors (pretraining streamed, not from shards)."""
    return getattr(cfg, "shards", "") is None and cfg.data.tokenizer != "none"


def ray_data_cpus(cfg: Any) -> float:
    """CPUs Ray Data holds while a training run trains, from its config alone: one for read
    tasks, plus the tokenizer pool's smallest size when the run streams visual tokens."""
    d = cfg.data
    return 1.0 + (d.tokenizer_actors[0] * d.tokenizer_num_cpus if streams_tokens(cfg) else 0.0)


def training_outputs(cfg: Any) -> dict[str, str | None]:
    """What a training run's tasks and workers write, by config field (the run's listing,
    class index and demo data live under checkpoint.storage_path)."""
    data = getattr(cfg, "data", None)
    return {
        "checkpoint.storage_path": cfg.checkpoint.storage_path,
        "data.errors_uri": getattr(data, "errors_uri", None),
        "data.listing_uri": getattr(data, "listing_uri", None),
        "shards": getattr(cfg, "shards", None),
    }


def check_training(
    cfg: Any, data_cpus: float | None = None, cluster: Cluster | None = None
) -> None:
    """Every driver-side check of a training job: CPUs, GPUs, shared outputs. Jobs run it
    right after joining Ray, before any listing, demo data or tokenizer fit; Ray Data's CPUs
    come from the config (:func:`ray_data_cpus`) unless given."""
    cluster = cluster or Cluster.read(cfg.ray)
    check_cpus(cfg, ray_data_cpus(cfg) if data_cpus is None else data_cpus, cluster)
    gpus = (
        tokenizer_gpus(cfg.data.tokenizer_num_gpus, cluster, cfg.scaling.use_gpu)
        if streams_tokens(cfg)
        else 0.0
    )
    check_gpus(cfg, gpus, cluster)
    check_shared_storage(training_outputs(cfg), cfg.storage, cluster)
