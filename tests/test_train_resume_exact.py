"""Exact resume of a training epoch (beit_ray/data/plan.py: EpochProgress), on real Ray Train +
DeepSpeed: a pretraining run over class tars with ``data.images_per_epoch`` set (the tars are
never counted) loses a worker mid-epoch, restarts from its last checkpoint, and trains on every
image of the epoch exactly once (counted through the ``debug.record_rows`` hook)."""

from __future__ import annotations

import json
import os
import tarfile
from collections import defaultdict

import pytest

from beit_ray.config import build
from beit_ray.data.plan import EpochProgress
from beit_ray.train.config import PretrainConfig
from beit_ray.train.trainer import run_pretraining

pytestmark = pytest.mark.integration


def test_progress_merges_ranks_and_closes_groups():
    a, b = EpochProgress(), EpochProgress()
    a.add([0, 0, 1], [0, 2, 0], [-1, -1, -1])
    b.add([0, 1], [1, 1], [3, -1])  # the row of group 0 that carries its total: 3 rows
    both = a.merge(b)
    assert both.done == {0} and both.skip(0) is None  # rows 0, 1, 2 of 3: done
    assert both.skip(1) == {0, 1} and both.rows_in_flight == 2
    again = EpochProgress.from_json(json.loads(json.dumps(both.to_json())))
    assert again.done == {0} and again.skip(1) == {0, 1} and again.skip(7) == set()
    assert both.to_json()["taken"] == {"1": [[0, 2]]}  # runs, not every index


def _class_tars(images: str, out: str) -> int:
    os.makedirs(out, exist_ok=True)
    n = 0
    for cls in sorted(os.listdir(images)):
        with tarfile.open(os.path.join(out, f"{cls}.tar"), "w") as tar:
            for name in sorted(os.listdir(os.path.join(images, cls))):
                tar.add(os.path.join(images, cls, name), arcname=name)
                n += 1
    return n


def test_killed_mid_epoch_resumes_every_image_once(ray_session, tmp_path):
    from beit_ray.train.demo_data import ensure_demo_data, make_demo_images

    root = str(tmp_path)
    make_demo_images(root, per_photo=8, size=64)
    n = _class_tars(os.path.join(root, "images"), os.path.join(root, "tars"))
    assert n == 64
    rows_dir = os.path.join(root, "rows")
    tree = {
        "checkpoint": {"storage_path": root, "name": "exact", "every_n_steps": 2},
        "run": {"log_every": 1, "seed": 5, "epochs": 1},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "deepspeed": {"micro_batch_size": 8, "zero_stage": 2},
        "data": {
            "source": os.path.join(root, "images"),
            "tokenizer": "codebook",
            "tokenizer_weights": os.path.join(root, "codebook.safetensors"),
        },
        "debug": {"fail_rank": 1, "fail_at_step": 3, "record_rows": rows_dir},
    }
    ensure_demo_data(build(PretrainConfig, tree).data, vocab_size=64)  # the codebook
    tree["data"].update(source=os.path.join(root, "tars"), images_per_epoch=n)
    cfg = build(PretrainConfig, tree)
    assert cfg.data.layout == "auto"

    result = run_pretraining(cfg)
    assert result.step == 4  # 64 images / 2 workers / 8 a batch: 4 steps in the epoch
    assert os.path.exists(os.path.join(result.run_uri, ".fail_injected_rank1_step3"))

    # The rows each step trained on: a step redone after the restart replaces its first try.
    final: dict[tuple[int, int], list[tuple[int, int]]] = {}
    pids = defaultdict(set)
    for rank in (0, 1):
        with open(os.path.join(rows_dir, f"rows-rank{rank}.jsonl")) as f:
            for line in f:
                r = json.loads(line)
                pids[rank].add(r["pid"])
                assert r["epoch"] == 0
                final[rank, r["step"]] = list(zip(r["pos"], r["idx"], strict=True))
    assert all(len(p) == 2 for p in pids.values())  # each rank ran twice: killed, restarted
    seen = [place for rows in final.values() for place in rows]
    assert len(seen) == len(set(seen)) == n  # every image of the epoch once, none twice
    assert {idx for _, idx in seen} == set(range(n))  # 8 tars: one read group, rows 0..63
