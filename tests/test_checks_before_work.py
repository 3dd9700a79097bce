"""Every job runs its cluster and output checks right after it joins Ray, before any work.

A refusal on a cluster of several nodes comes in seconds, with nothing made, listed or read
(the issue's refusal came after 1 min 52 s of fitting a tokenizer and reading data); the
README's `--storage.shared_paths` passes the same job on to its work. The `--dry-run` plan says
what it can of these checks without Ray; the embedded default keeps what it makes for its
workers under the run storage, where every node reads it.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import pytest

from beit_ray import console, plan
from beit_ray.config import parse_args
from beit_ray.runtime import Cluster
from beit_ray.train.config import FinetuneConfig, PretrainConfig
from beit_ray.train.demo_data import demo_argv, ensure_demo_images
from tests.test_gpu_mode import _joined_cluster

REPO = Path(__file__).resolve().parents[1]
WORK = ("ensure_demo_data", "ensure_demo_images", "fit_codebook", "run_pretraining")
"""What each job calls to start its work (made or read data), stubbed to record the call."""


class Started(Exception):
    """A job reached its work: its checks passed."""


def _job(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "job, field",
    [
        ("pretrain", "checkpoint.storage_path"),
        ("finetune", "checkpoint.storage_path"),
        ("fit_tokenizer", "output"),
    ],
)
def test_a_two_node_cluster_refuses_local_outputs_before_any_work(
    job, field, monkeypatch, tmp_path
):
    """The embedded default (pretrain, finetune) or a fit, joined to a faked 2-node cluster with
    a local output: refused right after joining, naming the field, in seconds, nothing written
    but the driver's own job log; with the README's --storage.shared_paths it goes to work."""
    module = _job(job)
    joined = _joined_cluster(monkeypatch, Cluster(cpus=4, gpus=0, nodes=2))
    monkeypatch.setattr(module, "init_ray", lambda *a, **k: joined.append("job"))
    started: list[str] = []

    def work(name: str):
        def start(*a, **k):
            started.append(name)
            raise Started(name)

        return start

    for name in WORK:
        if hasattr(module, name):
            monkeypatch.setattr(module, name, work(name))
    runs = tmp_path / "runs"
    argv = (
        ["--input", str(tmp_path / "images"), "--output", str(runs / "cb.safetensors")]
        if job == "fit_tokenizer"
        else ["--checkpoint.storage_path", str(runs)]
    )
    t0 = time.perf_counter()
    try:
        with pytest.raises(ValueError, match=rf"^{field}: .*2 nodes.*storage.shared_paths"):
            module.main(argv)
    finally:
        console.finish()
    seconds = time.perf_counter() - t0
    assert joined and not started
    assert seconds < 30, f"refused after {seconds:.0f} s"
    written = [p.name for p in tmp_path.rglob("*") if p.is_file()]
    assert written == [p.name for p in tmp_path.rglob("*.log")] and len(written) == 1, written

    try:
        with pytest.raises(Started):
            module.main([*argv, "--storage.shared_paths", str(runs)])
    finally:
        console.finish()
    assert started


def test_dry_run_says_which_outputs_a_cluster_will_refuse(monkeypatch, tmp_path):
    """Without Ray: a storage line only when the job joins a cluster (RAY_ADDRESS or
    ray.address); a local path is refused unless under storage.shared_paths; s3:// passes."""
    from beit_ray.infer.config import LabelConfig

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    local = parse_args(PretrainConfig, [])
    assert not any(line.startswith("  storage") for line in plan.pretrain(local))

    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.2:8266")
    (line,) = [x for x in plan.pretrain(local) if x.startswith("  storage")]
    assert "checkpoint.storage_path ./runs is a local path: refused" in line
    assert "storage.shared_paths" in line
    runs = str(tmp_path / "runs")
    shared = parse_args(
        PretrainConfig, ["--checkpoint.storage_path", runs, "--storage.shared_paths", runs]
    )
    assert "  storage  every output on storage all nodes read" in "\n".join(plan.pretrain(shared))
    # A relative path is refused even under a shared path: each node resolves it in its own
    # copy of the job's working dir.
    relative = parse_args(
        FinetuneConfig, ["--checkpoint.storage_path", "runs", "--storage.shared_paths", runs]
    )
    assert "checkpoint.storage_path runs is a local path" in "\n".join(plan.finetune(relative))
    labels = LabelConfig(input="s3://b/in", output=str(tmp_path / "labels"), checkpoint="s3://m")
    assert f"output {tmp_path / 'labels'} is a local path" in "\n".join(plan.label(labels))
    on_s3 = LabelConfig(input="s3://b/in", output="s3://b/labels", checkpoint="s3://m")
    assert "every output on storage all nodes read" in "\n".join(plan.label(on_s3))


def test_the_embedded_default_keeps_its_demo_data_under_the_run_storage(tmp_path, monkeypatch):
    """Demo images and codebook go to <storage_path>/demo-data (absolute, or the object store),
    not to ./runs/demo-data inside a node's copy of the working dir; a field given wins."""
    monkeypatch.chdir(tmp_path)
    preset = ["--ray.num_cpus", "4"]
    cfg = parse_args(PretrainConfig, demo_argv(PretrainConfig, preset, []))
    assert cfg.data.source == str(tmp_path / "runs" / "demo-data" / "images")
    assert cfg.data.tokenizer_weights == str(tmp_path / "runs/demo-data/codebook.safetensors")
    assert cfg.data.tokenizer == "codebook" and cfg.data.batch_size == 16  # the job's defaults
    s3 = ["--checkpoint.storage_path", "s3://bucket/runs"]
    cfg = parse_args(PretrainConfig, demo_argv(PretrainConfig, preset, s3))
    assert cfg.data.source == "s3://bucket/runs/demo-data/images"
    assert cfg.data.tokenizer_weights == "s3://bucket/runs/demo-data/codebook.safetensors"
    own = [*s3, "--data.tokenizer_weights", "s3://other/cb.safetensors"]
    assert (
        parse_args(PretrainConfig, demo_argv(PretrainConfig, preset, own)).data.tokenizer_weights
        == "s3://other/cb.safetensors"
    )
    ft = parse_args(FinetuneConfig, demo_argv(FinetuneConfig, preset, s3))
    assert ft.data.source == "s3://bucket/runs/demo-data/images" and ft.data.tokenizer == "none"
    assert ft.checkpoint.name == "finetune-debug"  # a partial section keeps the job's defaults

    images = tmp_path / "shared" / "demo-data" / "images"
    ensure_demo_images(str(images))
    classes = sorted(os.listdir(images))
    assert len(classes) == 8 and all(len(os.listdir(images / c)) == 32 for c in classes)
    assert os.listdir(images.parent) == ["images"]  # made aside, moved in whole
    before = (images / classes[0] / "000.jpg").stat().st_mtime_ns
    ensure_demo_images(str(images))  # there already: left as it is
    assert (images / classes[0] / "000.jpg").stat().st_mtime_ns == before
