"""GPU-mode choices that must agree between a training job's driver and its workers: the
process-group backend and the data feed options. The cluster and output checks every job runs
before any work are in :mod:`beit_ray.runtime`."""

from __future__ import annotations

from typing import Any


def process_group_backend(use_gpu: bool) -> str:
    """torch.distributed backend for Ray Train's group.

    A plain "nccl" group has no backend for CPU tensors (torch 2.13 raises "No backend type
    associated with device type cpu"); the mixed form keeps gloo for small CPU-side collectives.
    """
    return "cpu:gloo,cuda:nccl" if use_gpu else "gloo"


def feed_options(use_gpu: bool) -> dict[str, Any]:
    """Extra ``iter_torch_batches`` arguments for a training worker.

    On GPU the batch is copied to the device (Ray's device="auto"): pinned host memory makes that
    copy asynchronous, and 4 batches in flight hide the host-side collate behind the step. On CPU
    there is no copy and each prefetched batch holds memory and a thread: keep Ray's default.
    """
    return {"prefetch_batches": 4, "pin_memory": True} if use_gpu else {}
