"""Starting or joining Ray for a job, and rank-0 printing."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Any

from beit_ray.config import RayConfig, StorageConfig


def print0(*args: Any, **kwargs: Any) -> None:
    """print on global rank 0 only (every process outside a distributed group is rank 0)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)


def init_ray(
    cfg: RayConfig, storage: StorageConfig | None = None, env: dict[str, str] | None = None
) -> None:
    """Join ``cfg.address`` or start a local Ray on loopback; workers get the storage env.

    A job run with ``ray job submit`` is already connected (RAY_ADDRESS is set), so this joins
    it. Calling again when Ray is up is a no-op.
    """
    import ray

    from beit_ray import storage as st

    if ray.is_initialized():
        return
    runtime_env = {"env_vars": {**st.worker_env(storage), **(env or {})}}
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
