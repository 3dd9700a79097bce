"""The console: library chatter to the job log, progress throttled, Ray errors unwrapped."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys

import pytest

from beit_ray import console

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture()
def job_log(tmp_path, monkeypatch):
    """A started console whose terminal is a StringIO; yields (console text, log path)."""
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    path = console.start(str(tmp_path / "job.log"))
    yield out, path
    root.setLevel(level)
    root.handlers[:] = handlers
    console.finish()


def read(path: str) -> str:
    console._s.log.flush()
    with open(path) as f:
        return f.read()


def test_worker_lines_go_to_the_log_and_only_ours_and_warnings_to_the_console(job_log):
    out, path = job_log
    ds_info = "[2026-01-01 10:00:00,000] [INFO] [engine.py:1:__init__] DeepSpeed info: version=0.19"
    warn = "[2026-01-01 10:00:01,000] [WARNING] [stage_1_and_2.py:9:f] something to look at"
    data = {
        "pid": 42,
        "ip": "127.0.0.1",
        "localhost": "127.0.0.1",
        "actor_name": "RayTrainWorker",
        "lines": [
            ds_info,
            "Checkpoint successfully created at: Checkpoint(...)",
            warn,
            warn.replace("10:00:01", "10:00:07"),  # the same warning again: shown once
            "eval  step 8  epoch 1  top1 0.5000",
        ],
    }
    console._route(data, None)
    shown = out.getvalue()
    assert "eval  step 8" in shown and shown.count("something to look at") == 1
    assert "DeepSpeed info" not in shown and "Checkpoint successfully" not in shown
    logged = read(path)
    assert "(RayTrainWorker pid=42) " + ds_info in logged
    assert "Checkpoint successfully created" in logged and logged.count("something to look at") == 2


def test_library_loggers_info_to_the_log_warnings_to_the_console(job_log, monkeypatch):
    out, path = job_log
    monkeypatch.setattr(sys, "stdout", out)  # pytest's capture swapped it back after setup
    lib = logging.getLogger("ray.fake_component")
    handler = logging.StreamHandler(sys.stdout)  # as Ray's own console handler
    lib.addHandler(handler)
    lib.propagate = False
    lib.setLevel(logging.INFO)
    try:
        console.adopt_loggers()
        lib.info("Started a local Ray instance.")
        lib.warning("a warning a person should read")
        logging.getLogger("DeepSpeed").info("DeepSpeed's INFO chatter")
    finally:
        lib.removeHandler(handler)
    shown, logged = out.getvalue(), read(path)
    assert "Started a local Ray" not in shown and "a warning a person should read" in shown
    assert "DeepSpeed's INFO chatter" not in shown
    for text in ("Started a local Ray", "a warning a person should read", "DeepSpeed's INFO"):
        assert text in logged


def test_progress_lines_are_throttled_off_a_terminal(job_log, monkeypatch):
    out, path = job_log
    monkeypatch.setattr(console, "PROGRESS_EVERY_S", 3600.0)
    for step in range(1, 11):
        console.progress(f"step {step}/10  epoch 0  loss 1.0  eta 0m0{10 - step}s")
    shown = out.getvalue().splitlines()
    assert [s.split()[1] for s in shown if s.startswith("step")] == ["1/10", "10/10"]
    assert read(path).count("step ") == 10  # every line is kept in the log


def test_captured_library_prints_go_to_the_log(job_log):
    out, path = job_log
    with console.capture_output():
        print("Processing zero checkpoint '/x/state'")
        print("x.py:83: FutureWarning: `f` is deprecated", file=sys.stderr)
    assert "Processing zero" not in out.getvalue() and "FutureWarning" in out.getvalue()
    assert "Processing zero checkpoint" in read(path)


def test_original_error_under_ray_wrappers():
    from ray.exceptions import RayTaskError
    from ray.train.v2.api.exceptions import WorkerGroupError

    def boom():
        raise ValueError("bad pixel in 3.jpg")

    try:
        boom()
    except ValueError as e:
        cause = e
    tb = 'Traceback (most recent call last):\n  File "/w/decode.py", line 7, in decode\nValueError: bad'
    task_err = RayTaskError(
        "decode", tb, cause, "ray::decode", pid=7, ip="127.0.0.1"
    ).as_instanceof_cause()
    wrapped = WorkerGroupError("Training failed", {1: task_err, 0: task_err})
    orig, where, frame = console.original_error(wrapped)
    assert orig is cause
    assert "training worker rank 0" in where and "ray::decode (pid 7)" in where
    assert frame == "/w/decode.py:7 in decode"


@pytest.mark.integration
def test_a_failing_map_task_surfaces_its_original_exception(tmp_path):
    script = f"""
import ray
from beit_ray import console
from beit_ray.config import RayConfig, run_job
from beit_ray.runtime import init_ray

def fail(batch):
    raise ValueError("no pixels in image 3")

def main(argv):
    console.start({str(tmp_path / "job.log")!r})
    init_ray(RayConfig(num_cpus=1))
    ray.data.range(4).map_batches(fail).materialize()

raise SystemExit(run_job(main))
"""
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    err = proc.stderr
    assert "error: ValueError: no pixels in image 3" in err
    assert "RayTaskError" not in err and "UserCodeException" not in err
    assert len([x for x in err.splitlines() if x.strip()]) <= 6, err
    with open(tmp_path / "job.log") as f:
        assert "Traceback" in f.read()  # the full chain is kept in the log
