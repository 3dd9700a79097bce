"""Pretraining on a 2-node Ray cluster on one machine (ray.cluster_utils.Cluster), one worker
per node. It cannot share a process with the session's Ray, so it runs in a subprocess."""

from __future__ import annotations

import os
import textwrap

import pytest
from conftest import run_child

pytestmark = pytest.mark.integration

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import ray
    from ray.cluster_utils import Cluster
    from beit_ray.config import build
    from beit_ray.train.config import PretrainConfig
    from beit_ray.train.data import TrainData
    from beit_ray.train.observe import read_metrics
    from beit_ray.train.trainer import run_pretraining

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "node_ip_address": "127.0.0.1"})
    cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
    ray.init(address=cluster.address)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        rng = np.random.default_rng(0)
        rows = [{"pixel_values": rng.integers(0, 255, (3, 32, 32), dtype=np.uint8),
                 "bool_masked_pos": rng.permutation(16) < 6,  # 6 of 16, as the data masks
                 "visual_token_ids": rng.integers(0, 256, 16).astype(np.int16)} for _ in range(64)]
        cfg = build(PretrainConfig, {
            "data": {"source": "unused", "tokenizer": "none"},
            "scaling": {"num_workers": 2, "placement": "STRICT_SPREAD"},
            "deepspeed": {"zero_stage": 2, "micro_batch_size": 8},
            "run": {"max_steps": 4, "log_every": 1},
            "optim": {"lr": 1e-3},
            "checkpoint": {"storage_path": sys.argv[1], "name": "two-nodes", "every_n_steps": 2},
            # Both "nodes" are this machine: its temp folder is shared storage, declared so.
            "storage": {"shared_paths": [os.path.dirname(sys.argv[1])]},
        })
        nodes = len([n for n in ray.nodes() if n["Alive"]])
        result = run_pretraining(cfg, TrainData({"train": ray.data.from_items(rows)}, passes=1))
        steps = [r["step"] for r in read_metrics(os.path.join(result.logs_uri, "metrics.jsonl"))]
        print("RESULT " + json.dumps({"nodes": nodes, "step": result.step, "steps": steps, "model": result.model_uri}))
    finally:
        ray.shutdown()
        cluster.shutdown()
    """
)


def test_two_node_cluster_trains_one_worker_per_node(tmp_path) -> None:
    script = tmp_path / "two_nodes.py"
    script.write_text(SCRIPT)
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "disabled",
        "RAY_ADDRESS": "",
    }
    env.pop("RAY_ADDRESS")
    out = run_child([str(script), str(tmp_path / "runs")], env)
    assert out["nodes"] == 2 and out["step"] == 4 and out["steps"] == [1, 2, 3, 4]
    assert os.path.exists(os.path.join(out["model"], "model.safetensors"))
