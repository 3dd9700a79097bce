"""Rank-0 observability: a progress line, TensorBoard events, metrics.jsonl and a curve plot.

Files are written to a local folder; when the run lives on an object store they are mirrored
to ``<run>/logs/`` at every checkpoint and at the end. A resumed run drops the records after its
checkpoint's step (metrics.jsonl is trimmed, TensorBoard's ``purge_step`` hides the rest), so
no step is counted twice.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections import defaultdict
from typing import Any

from beit_ray import storage
from beit_ray.config import StorageConfig
from beit_ray.runtime import say

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"


class Observer:
    """Averages per-step metrics over a log interval and writes them out (rank 0 only)."""

    def __init__(
        self, logs_uri: str, start_step: int, storage_cfg: StorageConfig | None = None
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.uri, self.storage_cfg = logs_uri, storage_cfg
        self.remote = storage.is_remote(logs_uri)
        self.local = (
            tempfile.mkdtemp(prefix="beit_logs_") if self.remote else storage.strip_scheme(logs_uri)
        )
        os.makedirs(self.local, exist_ok=True)
        if self.remote and storage.exists(storage.join(logs_uri, METRICS_FILE), storage_cfg):
            storage.download_dir(logs_uri, storage_cfg, dest=self.local)
        _trim(os.path.join(self.local, METRICS_FILE), start_step)
        self.tb = SummaryWriter(os.path.join(self.local, "tb"), purge_step=start_step + 1)
        self.sums: dict[str, Any] = defaultdict(float)
        self.steps = 0
        self.last_step = start_step
        self.images = 0
        self.wait = 0.0
        self.t0 = time.perf_counter()

    def step(self, metrics: dict[str, Any], images: int, data_wait: float) -> None:
        """Add one micro-step: its metrics (floats or 0-d device tensors, summed on the device
        and read only by :meth:`log`), global images processed, seconds spent waiting."""
        for k, v in metrics.items():
            self.sums[k] = self.sums[k] + v
        self.steps += 1
        self.images += images
        self.wait += data_wait

    def log(
        self, step: int, epoch: int, total: int, extra: dict[str, float] | None = None
    ) -> dict[str, float]:
        """Write the averages since the last call; returns the record written."""
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        rec: dict[str, float] = {k: float(v) / max(self.steps, 1) for k, v in self.sums.items()}
        rec.update(
            images_per_s=self.images / elapsed,
            data_wait_frac=self.wait / elapsed,
            peak_rss_gb=_peak_rss_gb(),
        )
        rec.update(extra or {})
        # The ETA is for the progress line only; the rate is images_per_s.
        per_step = elapsed / max(step - self.last_step, 1)
        self.last_step = step
        tail = f"  eta {_duration((total - step) * per_step)}"
        self._record("train", step, epoch, rec, f"step {step}/{total}", tail)
        self.sums.clear()
        self.steps = self.images = 0
        self.wait = 0.0
        self.t0 = time.perf_counter()
        return rec

    def log_eval(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        """Write one validation record."""
        self._record("eval", step, epoch, metrics, f"eval  step {step}")

    def _record(
        self, kind: str, step: int, epoch: int, rec: dict[str, float], head: str, tail: str = ""
    ) -> None:
        """One record to metrics.jsonl, TensorBoard (train/ or val/) and the progress line."""
        with open(os.path.join(self.local, METRICS_FILE), "a") as f:
            line = {"kind": kind, "step": step, "epoch": epoch, **rec, "time": time.time()}
            f.write(json.dumps(line) + "\n")
        prefix = "train" if kind == "train" else "val"
        for k, v in rec.items():
            self.tb.add_scalar(f"{prefix}/{k}", v, step)
        shown = "  ".join(f"{k} {_fmt(v)}" for k, v in rec.items())
        say(f"{head}  epoch {epoch}  {shown}{tail}")

    def sync(self) -> None:
        """Flush TensorBoard and mirror the files to the run's logs folder when it is remote."""
        self.tb.flush()
        if self.remote:
            storage.upload_dir(self.local, self.uri, self.storage_cfg)

    def close(self) -> None:
        self.tb.close()
        plot_curves(os.path.join(self.local, METRICS_FILE), os.path.join(self.local, CURVES_FILE))
        self.sync()


def read_metrics(
    path_or_uri: str, storage_cfg: StorageConfig | None = None
) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (local path or URI)."""
    text = storage.read_text(path_or_uri, storage_cfg)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def plot_curves(metrics_path: str, out_png: str) -> None:
    """Loss and the task's accuracy-like metrics against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not os.path.exists(metrics_path):
        return
    with open(metrics_path) as f:
        recs = [json.loads(x) for x in f if x.strip()]
    keys = [
        k
        for k in ("loss", "mlm_acc", "acc", "top1", "miou", "pixel_acc")
        if any(k in r for r in recs)
    ]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        pts = [(r["step"], r[key]) for r in recs if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def _trim(path: str, start_step: int) -> None:
    """Keep only records up to ``start_step`` (those after it will be trained again)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= start_step]
    with open(path, "w") as f:
        f.writelines(keep)


def _peak_rss_gb() -> float:
    """This process's peak resident memory (rank 0's worker), in GiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _duration(seconds: float) -> str:
    s = max(0, int(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _fmt(v: float) -> str:
    if v == 0 or math.isnan(v):
        return f"{v:g}"
    return f"{v:.3e}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.4f}"
