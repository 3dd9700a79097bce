"""The decisions GPU mode makes, pinned on CPU (no GPU here): DeepSpeed config and precision,
collectives under a mixed-backend group, resource and autoscaling checks against fake clusters,
the device rule of Serve replicas and tokenizer actors, shared-storage refusal, the SDPA and
checkpointed fast path."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from beit_ray import runtime
from beit_ray.config import StorageConfig
from beit_ray.runtime import Cluster
from beit_ray.train import resources
from beit_ray.train.config import (
    CheckpointSection,
    DeepSpeedConfig,
    PretrainConfig,
    ScalingSection,
)
from beit_ray.train.deepspeed import deepspeed_config, mmap_threshold, precision

REPO = Path(__file__).resolve().parents[1]


def _cfg(use_gpu: bool, workers: int = 2, **ds) -> PretrainConfig:
    return PretrainConfig(
        scaling=ScalingSection(num_workers=workers, use_gpu=use_gpu),
        deepspeed=DeepSpeedConfig(**ds),
    )


# ----------------------------------------------------------------------------- DeepSpeed


def test_gpu_gets_model_sized_buckets_and_fp32_bf16_and_cpu_keeps_its_tuning():
    gpu = deepspeed_config(_cfg(True, zero_stage=2, offload_optimizer=True), 86_000_000)
    z = gpu["zero_optimization"]
    # bf16 is autocast over fp32 parameters: fp32 gradients, reduction and master weights
    assert gpu["torch_autocast"]["enabled"] and gpu["torch_autocast"]["dtype"] == "bfloat16"
    assert gpu["torch_autocast"]["lower_precision_safe_modules"] == []  # nothing reduced in bf16
    assert not gpu["bf16"]["enabled"] and not gpu["fp16"]["enabled"]
    assert z["overlap_comm"] and z["reduce_scatter"]
    # BEiT-base in 8 buckets, so reduction overlaps the backward (5e8 never filled: no overlap)
    assert z["reduce_bucket_size"] == z["allgather_bucket_size"] == 86_000_000 // 8
    big = deepspeed_config(_cfg(True, zero_stage=2), 10**10)["zero_optimization"]
    assert big["reduce_bucket_size"] == 500_000_000  # DeepSpeed's default stays the ceiling
    assert (
        deepspeed_config(_cfg(True, zero_stage=2))["zero_optimization"]["reduce_bucket_size"]
        == 500_000_000
    )  # no model size known
    assert z["offload_optimizer"] == {"device": "cpu", "pin_memory": True}

    cpu = deepspeed_config(_cfg(False, zero_stage=2, offload_optimizer=True))
    z = cpu["zero_optimization"]
    assert not cpu["torch_autocast"]["enabled"] and not cpu["fp16"]["enabled"]
    assert not z["overlap_comm"] and not z["reduce_scatter"]
    assert z["reduce_bucket_size"] == 50_000_000
    assert z["offload_optimizer"]["pin_memory"] is False


def test_zero3_limits_and_allocator_per_device_and_explicit_values_win():
    z = deepspeed_config(_cfg(True, zero_stage=3))["zero_optimization"]
    assert z["stage3_max_live_parameters"] == z["stage3_max_reuse_distance"] == 1_000_000_000
    assert "stage3_prefetch_bucket_size" not in z  # DeepSpeed's own 5e7
    z = deepspeed_config(_cfg(False, zero_stage=3))["zero_optimization"]
    assert z["stage3_max_live_parameters"] == z["sub_group_size"] == 50_000_000
    z = deepspeed_config(_cfg(True, zero_stage=3, bucket_size=7_000_000))["zero_optimization"]
    assert z["reduce_bucket_size"] == z["stage3_max_live_parameters"] == 7_000_000
    assert mmap_threshold(_cfg(True, zero_stage=3)) == 0
    assert mmap_threshold(_cfg(False, zero_stage=3)) == 1 << 20
    assert mmap_threshold(_cfg(True, zero_stage=3, malloc_mmap_threshold=4096)) == 4096
    assert precision(_cfg(True, precision="fp32")) == "fp32"
    assert precision(_cfg(True, precision="fp16")) == "fp16"
    assert precision(_cfg(False)) == "fp32" and precision(_cfg(True)) == "bf16"


def test_feed_options_and_backend():
    assert resources.feed_options(False) == {}
    opts = resources.feed_options(True)
    assert opts["pin_memory"] and 2 <= opts["prefetch_batches"] <= 4
    assert resources.process_group_backend(True) == "cpu:gloo,cuda:nccl"
    assert resources.process_group_backend(False) == "gloo"


# ----------------------------------------------------------------------------- collectives


def _group(backend: str, tmp_path: Path) -> None:
    store = dist.FileStore(str(tmp_path / f"store-{backend.replace(':', '_')}"), 1)
    dist.init_process_group(backend, store=store, rank=0, world_size=1)


def test_cpu_collective_fails_without_a_cpu_backend_and_runs_in_a_mixed_group(tmp_path):
    from beit_ray.train.loop import due
    from beit_ray.train.tasks import all_reduce_on

    # "cuda:gloo" stands in for Ray Train's plain nccl group: nothing serves CPU tensors.
    _group("cuda:gloo", tmp_path)
    try:
        with pytest.raises(RuntimeError, match="cpu"):
            dist.broadcast(torch.zeros(1), src=0)
    finally:
        dist.destroy_process_group()
    # The group Ray Train now gets on GPU, with gloo standing in for nccl on this machine.
    _group(resources.process_group_backend(True).replace("nccl", "gloo"), tmp_path)
    try:
        cfg = PretrainConfig(checkpoint=CheckpointSection(every_n_minutes=1e-9))
        assert due(cfg, 3, last=0.0, device=torch.device("cpu"))
        assert not due(cfg, 3, last=0.0, device=torch.device("cpu"), read_clock=False)
        sums = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
        out = all_reduce_on(sums, torch.device("cpu"))
        assert out.tolist() == [1.0, 2.0, 3.0] and out.device == sums.device
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- resources


def test_gpu_oversubscription_is_refused_with_what_to_change():
    cfg = _cfg(True, workers=16)
    fixed = Cluster(cpus=448, gpus=16, nodes=5)
    with pytest.raises(ValueError, match="need 17 GPUs") as e:
        runtime.check_gpus(cfg, 1.0, fixed)
    assert "scaling.num_workers" in str(e.value) and "data.tokenizer_num_gpus" in str(e.value)
    assert runtime.check_gpus(cfg, 0.0, fixed) is None  # CPU tokenizer actors fit
    assert runtime.check_gpus(_cfg(True, workers=15), 1.0, fixed) is None
    # An autoscaler that can never reach 17 GPUs: still refused.
    scaling = Cluster(cpus=0, gpus=0, nodes=1, max_cpus=448, max_gpus=16, max_nodes=21, fixed=False)
    with pytest.raises(ValueError):
        runtime.check_gpus(cfg, 1.0, scaling)


def test_autoscaling_cluster_warns_instead_of_refusing(capsys):
    # cluster/aws.yaml right after `ray up`: only the CPU-0 head is up.
    limits = runtime._bootstrap_limits(str(REPO / "cluster" / "aws.yaml"))
    assert limits == {"CPU": 16 * 16 + 4 * 48, "GPU": 16, "nodes": 21}
    head_only = Cluster(
        cpus=0,
        gpus=0,
        nodes=1,
        max_cpus=limits["CPU"],
        max_gpus=limits["GPU"],
        max_nodes=int(limits["nodes"]),
        fixed=False,
    )
    cfg = _cfg(True, workers=8)
    assert runtime.check_cpus(cfg, 1.0, head_only) == "warn"
    assert runtime.check_gpus(cfg, 1.0, head_only) == "warn"
    assert "autoscaler may still add nodes" in capsys.readouterr().out
    # GPU nodes scaled to zero still make the tokenizer's auto-detect pick GPU actors.
    assert runtime.tokenizer_gpus(None, head_only) == 1.0
    assert runtime.tokenizer_gpus(None, Cluster(cpus=8, gpus=0, nodes=1)) == 0.0
    assert runtime.tokenizer_gpus(0.5, head_only) == 0.5
    # A joined cluster whose autoscaler limits are unknown: warn; a local Ray: refuse.
    unknown = Cluster(cpus=1, gpus=0, nodes=1, fixed=False)
    assert runtime.check_cpus(cfg, 1.0, unknown) == "warn"
    with pytest.raises(ValueError, match="scaling.cpus_per_worker"):
        runtime.check_cpus(cfg, 1.0, Cluster(cpus=1, gpus=0, nodes=1))


def test_gcs_node_groups_with_unbounded_max_count():
    out = runtime.node_group_limits([({"CPU": 4.0}, 1), ({"CPU": 8.0, "GPU": 1.0}, -1)])
    assert out["GPU"] >= sys.maxsize and out["CPU"] >= 4


# ----------------------------------------------------------------------------- storage


def test_local_outputs_refused_on_multi_node_clusters(tmp_path):
    two = Cluster(cpus=4, gpus=0, nodes=2)
    with pytest.raises(ValueError, match="checkpoint.storage_path") as e:
        runtime.check_shared_storage({"checkpoint.storage_path": "./runs"}, None, two)
    assert "s3://" in str(e.value) and "storage.shared_paths" in str(e.value)
    ok = {"checkpoint.storage_path": "s3://bucket/runs", "data.errors_uri": None}
    runtime.check_shared_storage(ok, None, two)
    shared = StorageConfig(shared_paths=[str(tmp_path)])
    runtime.check_shared_storage({"output": str(tmp_path / "labels")}, shared, two)
    with pytest.raises(ValueError, match="output"):
        runtime.check_shared_storage({"output": str(tmp_path) + "-other"}, shared, two)
    runtime.check_shared_storage({"x": "./runs"}, None, Cluster(cpus=4, gpus=0, nodes=1))
    # One node up, more to come from the autoscaler: refused as well.
    coming = Cluster(cpus=0, gpus=0, nodes=1, max_nodes=5, fixed=False)
    with pytest.raises(ValueError, match="nodes the autoscaler can add"):
        runtime.check_shared_storage({"x": "./runs"}, None, coming)


def _joined_cluster(monkeypatch, view: Cluster) -> list[str]:
    """A job joining ``view`` (RAY_ADDRESS set) without Ray: init_ray recorded, Cluster.read faked."""
    from beit_ray import runtime

    joined: list[str] = []
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    monkeypatch.setattr(runtime, "init_ray", lambda cfg, st=None, env=None: joined.append("x"))
    monkeypatch.setattr(Cluster, "read", classmethod(lambda cls, ray_cfg=None: view))
    return joined


def test_labelling_and_tokenizing_refuse_local_outputs_before_any_ray_work(monkeypatch, tmp_path):
    """label() and materialize() check their output on a joined 2-node cluster before reading the
    checkpoint or listing the input (both missing here: reaching them would raise otherwise)."""
    from beit_ray.data.config import TokenizeConfig
    from beit_ray.data.materialize import materialize
    from beit_ray.infer.config import LabelConfig
    from beit_ray.infer.label import label

    joined = _joined_cluster(monkeypatch, Cluster(cpus=4, gpus=0, nodes=2))
    missing = str(tmp_path / "missing")
    lab = LabelConfig(input=missing, output=str(tmp_path / "labels"), checkpoint=missing)
    with pytest.raises(ValueError, match=r"^output: .*2 nodes.*storage.shared_paths"):
        label(lab)
    tok = TokenizeConfig(input=missing, output=str(tmp_path / "shards"))
    with pytest.raises(ValueError, match=r"^output: .*2 nodes.*s3://"):
        materialize(tok, progress=False)
    assert joined == ["x", "x"]  # Ray joined (the job's own address) to read the cluster
    assert not (tmp_path / "labels").exists() and not (tmp_path / "shards").exists()
    # A path declared shared passes the check: the runs go on and fail at their missing inputs.
    lab.storage = tok.storage = StorageConfig(shared_paths=[str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="no Hugging Face model"):
        label(lab)
    with pytest.raises(FileNotFoundError, match="data.source"):
        materialize(tok, progress=False)


def test_labelling_output_check_warns_when_an_unknown_autoscaler_may_add_nodes(
    monkeypatch, tmp_path, capsys
):
    from beit_ray.infer.config import LabelConfig
    from beit_ray.infer.label import check_outputs

    _joined_cluster(monkeypatch, Cluster(cpus=4, gpus=0, nodes=1, fixed=False))
    check_outputs(LabelConfig(input="s3://b/in", output=str(tmp_path / "labels"), checkpoint="c"))
    assert "output: " in capsys.readouterr().out


def test_local_jobs_check_outputs_without_starting_ray(monkeypatch, tmp_path):
    """No address and no Ray up: the job's own local Ray is one node, so nothing is started."""
    from beit_ray import runtime
    from beit_ray.data.config import TokenizeConfig
    from beit_ray.data.materialize import check_outputs as tokenize_check
    from beit_ray.infer.config import LabelConfig
    from beit_ray.infer.label import check_outputs as label_check

    if "ray" in sys.modules:
        monkeypatch.setattr(sys.modules["ray"], "is_initialized", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def no_ray(*a, **k):
        raise AssertionError("Ray started for a local job's output check")

    monkeypatch.setattr(runtime, "init_ray", no_ray)
    monkeypatch.setattr(Cluster, "read", classmethod(no_ray))
    label_check(LabelConfig(input="in", output=str(tmp_path / "labels"), checkpoint="c"))
    tokenize_check(TokenizeConfig(input="in", output=str(tmp_path / "shards")))


def test_training_refused_on_a_real_two_node_cluster(tmp_path):
    """ray.cluster_utils.Cluster: two raylets on loopback, in a child process (own Ray)."""
    from tests.conftest import run_child

    script = tmp_path / "two_nodes.py"
    script.write_text(
        "import json, ray\n"
        "from ray.cluster_utils import Cluster as RayCluster\n"
        "from beit_ray.config import RayConfig\n"
        "from beit_ray.train.config import PretrainConfig\n"
        "from beit_ray.runtime import Cluster, check_training\n"
        "c = RayCluster(initialize_head=True, head_node_args={'num_cpus': 2})\n"
        "c.add_node(num_cpus=2)\n"
        "ray.init(address=c.address)\n"
        "c.wait_for_nodes()\n"
        "view = Cluster.read(RayConfig(address=c.address))\n"
        "cfg = PretrainConfig()\n"
        "try:\n"
        "    check_training(cfg, 1.0, view)\n"
        "    err = None\n"
        "except ValueError as e:\n"
        "    err = str(e)\n"
        "ray.shutdown(); c.shutdown()\n"
        "print('RESULT ' + json.dumps({'nodes': view.nodes, 'error': err}))\n"
    )
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(REPO)}
    out = run_child([str(script)], env=env, timeout=300)
    assert out["nodes"] == 2
    assert out["error"] and out["error"].startswith("checkpoint.storage_path: ")


# ----------------------------------------------------------------------------- devices


def test_replicas_and_tokenizer_actors_use_cuda_only_with_an_assigned_gpu(monkeypatch):
    import ray

    from beit_ray.data import tokenizers
    from beit_ray.infer.predictor import ray_device
    from beit_ray.serve.app import replica_dtype
    from beit_ray.serve.config import ReplicaConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU is visible
    assert ray_device([]) == "cpu"  # ... but this replica reserved none
    assert ray_device(["0"]) == "cuda"
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    assert tokenizers.actor_device() == "cpu"
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [1])
    assert tokenizers.actor_device() == "cuda"
    assert ReplicaConfig().dtype == "auto"
    assert replica_dtype("auto", "cuda") == "bfloat16"
    assert replica_dtype("auto", "cpu") == "float32"
    assert replica_dtype("float16", "cuda") == "float16"


def test_labelling_dtype_auto_is_bfloat16_on_gpu_actors_and_float32_on_cpu(monkeypatch):
    from beit_ray.infer import predictor
    from beit_ray.infer.config import LabelConfig, resolve_dtype
    from beit_ray.infer.label import PredictorActor
    from beit_ray.serve.app import replica_dtype

    assert replica_dtype is resolve_dtype  # one rule for Serve's replicas and labelling
    assert LabelConfig().predict.dtype == "auto"
    built: list[tuple[str, str]] = []

    class FakePredictor:
        def __init__(self, *args, device, dtype, **kwargs):
            built.append((device, dtype))

    monkeypatch.setattr(predictor, "Predictor", FakePredictor)
    for num_gpus, dtype in ((1.0, "auto"), (0.0, "auto"), (0.5, "float16"), (0.0, "bfloat16")):
        PredictorActor("ckpt", "classify", None, 5, "pooled", 1, num_gpus, dtype=dtype)
    assert built == [
        ("cuda", "bfloat16"),
        ("cpu", "float32"),
        ("cuda", "float16"),
        ("cpu", "bfloat16"),
    ]


# ----------------------------------------------------------------------------- fast path


def _mim_batch():
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(3, 3, 32, 32, generator=g)
    mask = torch.rand(3, 16, generator=g) < 0.4
    mask[:, 0] = True
    return pixels, mask, torch.randint(0, 256, (3, 16), generator=g)


def test_sdpa_and_checkpointed_fast_path_match_the_bmm_path():
    from beit_ray.models.build import build_model
    from beit_ray.models.speed import beit_encoder, speed_options

    model = build_model("debug", "mim").train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    pixels, mask, _ = _mim_batch()

    def run(sdpa: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        out = beit_encoder(model.beit, pixels, mask, sdpa=sdpa)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.beit.parameters() if p.grad is not None]

    ref, ref_grads = run(False)
    out, grads = run(True)
    assert torch.allclose(out, ref, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, ref_grads, strict=True))
    speed_options(model, checkpointing=True, compile=False)
    assert all(layer.gradient_checkpointing for layer in model.beit.layers)
    out, grads = run(False)
    assert torch.allclose(out, ref, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, ref_grads, strict=True))


# ----------------------------------------------------------------------------- bench


def test_gpu_check_runs_tiny_on_cpu_without_ray(tmp_path):
    """bench/gpu_check.py --tiny: every section runs on CPU, and Ray is never imported."""
    import json
    import subprocess

    out = tmp_path / "gpu_check.json"
    code = (
        "import runpy, sys; sys.argv = ['gpu_check.py', '--tiny', '--skip-deepspeed', "
        f"'--json', {str(out)!r}]; runpy.run_path('bench/gpu_check.py', run_name='__main__'); "
        "assert 'ray' not in sys.modules, 'gpu_check imported ray'"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and res["bf16_matmul_tflops"] > 0
    for path in ("mim_sdpa", "mim_bmm", "mim_transformers"):
        assert res[path]["images_per_s"] > 0 and res[path]["fraction_of_bf16_matmul"] > 0
    assert res["dalle"]["images_per_s"] > 0 and res["predictor"]["images_per_s"] > 0
    assert "SKIPPED (--skip-deepspeed)" in proc.stdout
    assert res["attention_kernel"] and res["data_feed"]["images_per_s_per_core"] > 0


# ----------------------------------------------------------------------------- autoscaler limits


def test_no_open_source_ray_code_writes_the_gcs_cluster_config():
    """The GCS ClusterConfig is stored by the ReportClusterConfig RPC; in the installed Ray only
    the generated stubs name it, so no autoscaler of this Ray (v1, v2, KubeRay) publishes node
    types there and the limits are read where the autoscalers read them."""
    import ray

    root = Path(ray.__file__).parent
    callers = {
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if "/tests/" not in str(p) and "ReportClusterConfig" in p.read_text(errors="ignore")
    }
    assert callers and all(c.startswith("core/generated/") for c in callers), callers


def _raycluster(name: str, namespace: str) -> dict:
    import yaml

    doc = yaml.safe_load((REPO / "cluster" / "kuberay" / "rayjob-pretrain.yaml").read_text())
    meta = {"name": name, "namespace": namespace}
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": meta,
            "spec": doc["spec"]["rayClusterSpec"]}  # fmt: skip


def test_kuberay_limits_are_the_rayclusters_groups_read_as_rays_autoscaler_reads_them(
    monkeypatch, tmp_path
):
    import requests
    from ray.autoscaler._private.kuberay.node_provider import KubernetesHttpApiClient

    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text("t")
    (sa / "namespace").write_text("ml")
    monkeypatch.setattr(runtime, "SERVICE_ACCOUNT", str(sa))
    monkeypatch.setattr(runtime, "BOOTSTRAP_CONFIG", str(tmp_path / "none.yaml"))
    monkeypatch.setattr(runtime, "_gcs_limits", lambda: None)
    monkeypatch.setenv("RAY_CLUSTER_NAME", "beit-pretrain-x7k2p")  # KubeRay sets it on every pod
    monkeypatch.delenv("RAY_CLUSTER_NAMESPACE", raising=False)
    asked: list[tuple[str, str]] = []

    def get(self: KubernetesHttpApiClient, path: str) -> dict:
        asked.append((self._namespace, path))
        return _raycluster("beit-pretrain-x7k2p", self._namespace)

    monkeypatch.setattr(KubernetesHttpApiClient, "get", get)
    limits = runtime.autoscaler_limits()
    assert asked == [("ml", "rayclusters/beit-pretrain-x7k2p")]
    groups = _raycluster("x", "ml")["spec"]["workerGroupSpecs"]
    lim = [g["template"]["spec"]["containers"][0]["resources"]["limits"] for g in groups]
    assert limits == {
        "CPU": sum(int(x["cpu"]) * g["maxReplicas"] for x, g in zip(lim, groups, strict=True)),
        "GPU": sum(int(x.get("nvidia.com/gpu", 0)) * g["maxReplicas"] for x, g in zip(lim, groups, strict=True)),
        "nodes": 1 + sum(g["maxReplicas"] for g in groups),
    }  # fmt: skip
    assert limits["GPU"] > 0
    # GPU pods scaled to zero, only the CPU-0 head up: GPU tokenizer actors, which wait for a node.
    head_only = Cluster(0, 0, 1, limits["CPU"], limits["GPU"], int(limits["nodes"]), fixed=False)
    gpus, why = runtime.tokenizer_choice(None, head_only)
    assert gpus == 1.0 and "wait for one" in why

    def denied(self: KubernetesHttpApiClient, path: str) -> dict:
        raise requests.HTTPError("403 Forbidden")  # a head pod without the autoscaler's RBAC

    monkeypatch.setattr(KubernetesHttpApiClient, "get", denied)
    assert runtime.autoscaler_limits() is None
    monkeypatch.setattr(KubernetesHttpApiClient, "get", get)
    monkeypatch.delenv("RAY_CLUSTER_NAME")  # not a KubeRay pod: the API is never asked
    assert runtime._kuberay_limits() is None and len(asked) == 1


def test_gpu_tokenizer_actors_wait_for_gpu_nodes_instead_of_running_on_cpu():
    unknown = Cluster(cpus=16, gpus=0, nodes=2, fixed=False)  # joined, limits unknown, no GPU up
    gpus, why = runtime.tokenizer_choice(None, unknown, train_gpus=True)
    assert gpus == 1.0 and "training runs on GPUs" in why
    gpus, why = runtime.tokenizer_choice(None, unknown)  # a tokenize job: nothing says GPUs exist
    assert gpus == 0.0 and "data.tokenizer_num_gpus 1" in why
    assert runtime.tokenizer_choice(None, Cluster(cpus=8, gpus=2, nodes=1))[0] == 1.0
    assert runtime.tokenizer_choice(None, Cluster(cpus=8, gpus=0, nodes=1)) == (
        0.0,
        "CPU actors: the cluster has no GPUs",
    )
    assert runtime.tokenizer_choice(0.25, unknown)[0] == 0.25
    assert runtime.tokenizer_gpus(0.0, unknown, train_gpus=True) == 0.0  # set: kept


def test_training_decides_the_tokenizer_device_once_and_says_it(monkeypatch, capsys):
    from beit_ray.config import parse_args
    from beit_ray.train.data import with_tokenizer_device

    monkeypatch.setattr(
        Cluster, "read", classmethod(lambda cls, ray_cfg=None: Cluster(8, 0, 1, fixed=False))
    )
    cfg = parse_args(PretrainConfig, ["--scaling.use_gpu", "true", "--data.tokenizer", "dalle"])
    data = with_tokenizer_device(cfg)
    assert data.tokenizer_num_gpus == 1.0 and cfg.data.tokenizer_num_gpus is None
    assert "tokenizer: 1-GPU actors: training runs on GPUs" in capsys.readouterr().out
    cpu = parse_args(PretrainConfig, ["--data.tokenizer", "dalle"])
    assert with_tokenizer_device(cpu).tokenizer_num_gpus == 0.0
    assert "CPU actors" in capsys.readouterr().out
    cfg.data.tokenizer_num_gpus = 0.5
    assert with_tokenizer_device(cfg) is cfg.data and capsys.readouterr().out == ""
    # A local Ray without GPUs: CPU actors, nothing to say.
    monkeypatch.setattr(Cluster, "read", classmethod(lambda cls, ray_cfg=None: Cluster(8, 0, 1)))
    assert with_tokenizer_device(cpu).tokenizer_num_gpus == 0.0 and capsys.readouterr().out == ""
