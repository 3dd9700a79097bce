"""ZeRO-3-safe build and load, in a subprocess so this test process stays free of DeepSpeed state."""

from __future__ import annotations

import os
import textwrap

import pytest
from conftest import free_port, run_child

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import deepspeed, torch
    import importlib

    # One process needs no shared-memory all-reduce kernel; skipping its JIT build (minutes on a
    # loaded 2-core machine) keeps this a test of partitioning and init, which it does not touch.
    # (importlib: `import deepspeed.comm.torch as m` gives the real torch, which deepspeed.comm's
    # star import binds to that name.)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    from beit_ray.models.build import build_model
    from beit_ray.models.layer_decay import param_groups
    from beit_ray.models.load import load_model

    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    out = {}
    try:
        build_model("debug", "mim", zero3_config=ds)
    except ValueError as e:
        out["needs_gather"] = "gather" in str(e)
    gather = lambda ps: deepspeed.zero.GatheredParameters(ps, modifier_rank=0)
    model = build_model("debug", "classification", num_labels=3, zero3_config=ds, gather=gather, seed=0)
    plain = build_model("debug", "classification", num_labels=3, seed=0)
    w = model.beit.layers[0].mlp.fc1.weight
    out["partitioned"] = hasattr(w, "ds_numel") and hasattr(w, "ds_status")
    out["local_numel"], out["ds_numel"] = w.numel(), int(w.ds_numel)
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        out["std"] = w.float().std().item()
        out["fc2_last_std"] = model.beit.layers[3].mlp.fc2.weight.float().std().item()
        # the same seed gives the same unilm init, partitioned or not
        out["init_diff"] = max((a - b).abs().max().item() for a, b in zip(model.parameters(), plain.parameters()))
    groups = param_groups(model, lr=1.0, weight_decay=0.05, layer_decay=1.0)
    wd = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    out["wd_fc1"], out["wd_fc1_bias"] = wd["beit.layers.0.mlp.fc1.weight"], wd["beit.layers.0.mlp.fc1.bias"]

    folder = sys.argv[1]
    clf = load_model(folder, "classification", num_labels=3, zero3_config=ds)
    ref = load_model(folder, "classification", num_labels=3)
    out["loaded_partitioned"] = all(hasattr(p, "ds_numel") for p in clf.parameters())
    with deepspeed.zero.GatheredParameters(list(clf.parameters())):
        out["max_diff"] = max((a - b).abs().max().item() for a, b in zip(clf.parameters(), ref.parameters()))
    out["copied"] = len(clf.beit_ray_load_report["copied"])
    print("RESULT " + json.dumps(out))
    """
)


@pytest.mark.integration
def test_zero3_build_partitions_and_inits_as_unilm(tmp_path):
    from beit_ray.models.build import build_model
    from beit_ray.models.load import export_hf

    export_hf(build_model("debug", "mim"), str(tmp_path / "mim"))
    env = {
        **os.environ,
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    out = run_child(["-c", SCRIPT, str(tmp_path / "mim")], env)
    assert out["needs_gather"]
    assert out["partitioned"] and out["local_numel"] == 0 and out["ds_numel"] == 128 * 64
    assert abs(out["std"] - 0.02) < 0.002, out["std"]  # unilm's init, not zero.Init's 0.059
    assert abs(out["fc2_last_std"] - 0.02 / 8**0.5) < 0.001, out["fc2_last_std"]  # / sqrt(2 * 4)
    assert out["init_diff"] == 0.0
    assert out["wd_fc1"] == 0.05 and out["wd_fc1_bias"] == 0.0  # partition shapes are [0]
    assert out["loaded_partitioned"] and out["max_diff"] == 0.0 and out["copied"] == 4
