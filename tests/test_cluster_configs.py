"""The cluster configs in cluster/ are valid for the tools that will read them.

- cluster/aws.yaml: Ray's own cluster-launcher schema (`prepare_config` + `validate_config`,
  what `ray up` runs before it contacts AWS; nothing here contacts AWS).
- cluster/kuberay/*.yaml: every pod mounts an in-memory /dev/shm; the fields the KubeRay ray.io/v1 CRDs require (RayClusterSpec,
  HeadGroupSpec, WorkerGroupSpec, RayJobSpec, RayServiceSpec in ray-project/kuberay
  ray-operator/apis/ray/v1), plus unknown-field checks: the API server prunes unknown fields
  of a CRD silently, so a typo would otherwise vanish. serveConfigV2 is parsed with Ray's
  `ServeDeploySchema`, runtimeEnvYAML with Ray's `RuntimeEnv`, and the RayJob entrypoint
  with the job's own config class.
- cluster/runtime_env.yaml: Ray's `RuntimeEnv`, and the package Ray would upload stays small.
- Each cluster feeds what it trains (beit_ray/feed.py): the RayJob's entrypoint on its own
  groups, cluster/pretrain-cluster.yaml on cluster/aws.yaml, limits read as the job reads them.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import zipfile
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"

# Field names of the KubeRay v1 Go types (json tags); required ones carry no omitempty.
CLUSTER_SPEC_FIELDS = {
    "suspend",
    "managedBy",
    "autoscalerOptions",
    "headServiceAnnotations",
    "enableInTreeAutoscaling",
    "gcsFaultToleranceOptions",
    "headGroupSpec",
    "rayVersion",
    "workerGroupSpecs",
}
HEAD_GROUP_FIELDS = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
HEAD_GROUP_REQUIRED = {"template", "rayStartParams"}
WORKER_GROUP_FIELDS = {
    "suspend",
    "groupName",
    "replicas",
    "minReplicas",
    "maxReplicas",
    "idleTimeoutSeconds",
    "rayStartParams",
    "template",
    "scaleStrategy",
    "numOfHosts",
}
WORKER_GROUP_REQUIRED = {"groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"}
AUTOSCALER_FIELDS = {
    "resources",
    "image",
    "imagePullPolicy",
    "securityContext",
    "idleTimeoutSeconds",
    "upscalingMode",
    "env",
    "envFrom",
    "volumeMounts",
    "version",
}
RAYJOB_FIELDS = {
    "activeDeadlineSeconds",
    "backoffLimit",
    "rayClusterSpec",
    "submitterPodTemplate",
    "metadata",
    "clusterSelector",
    "submitterConfig",
    "managedBy",
    "deletionPolicy",
    "deletionStrategy",
    "entrypoint",
    "runtimeEnvYAML",
    "jobId",
    "submissionMode",
    "entrypointResources",
    "entrypointNumCpus",
    "entrypointNumGpus",
    "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes",
    "suspend",
}
RAYSERVICE_FIELDS = {
    "serveConfigV2",
    "rayClusterConfig",
    "serveService",
    "upgradeStrategy",
    "excludeHeadPodFromServeSvc",
    "rayClusterDeletionDelaySeconds",
    "serviceUnhealthySecondThreshold",
    "deploymentUnhealthySecondThreshold",
}
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def load(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f)


# --------------------------------------------------------------------------- AWS launcher


def test_aws_launcher_yaml_passes_rays_cluster_config_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load(CLUSTER / "aws.yaml")
    config = prepare_config(copy.deepcopy(raw))  # fills the AWS defaults, as `ray up` does
    validate_config(config)  # jsonschema ray-schema.json + node-type consistency

    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head should not run tasks"
    workers = {n: t for n, t in types.items() if n != config["head_node_type"]}
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) > 0]
    cpu = [t for t in workers.values() if t["resources"].get("GPU", 0) == 0]
    assert gpu and cpu, "needs CPU workers for Ray Data and GPU workers for training"
    for name, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"], name
        assert t["node_config"]["InstanceType"], name
    assert gpu[0]["node_config"]["InstanceType"].startswith(("g", "p"))
    assert sum(t["max_workers"] for t in workers.values()) <= config["max_workers"]


def _setup_command_lists(raw: dict) -> list[list[str]]:
    """The launcher's setup commands: the head's and each worker type's own."""
    return [raw["setup_commands"]] + [
        t["worker_setup_commands"]
        for t in raw["available_node_types"].values()
        if "worker_setup_commands" in t
    ]


def test_aws_launcher_installs_pinned_torch_before_the_project():
    raw = load(CLUSTER / "aws.yaml")
    command_lists = _setup_command_lists(raw)
    for commands in command_lists:
        torch_at = next(i for i, c in enumerate(commands) if '"torch==2.13.*"' in c)
        project_at = next(i for i, c in enumerate(commands) if "-e ~/beit-ray" in c)
        assert torch_at < project_at, commands
        assert "constraints.txt" in commands[project_at]
    # The synced checkout is where the project is installed from, without the local venv.
    assert raw["file_mounts"]["~/beit-ray"] == "."
    assert {".venv", ".git", "runs"} <= set(raw["rsync_exclude"])
    # Nodes run the same Ray as the machine that submits to them.
    images = [raw["docker"]["image"]] + [
        t["docker"]["worker_image"] for t in raw["available_node_types"].values() if "docker" in t
    ]
    for image in images:
        assert image.startswith(f"rayproject/ray:{ray.__version__}-"), image


def _prebuild_command() -> str:
    """`make install`'s DeepSpeed step, as a command a node runs: `python -m beit_ray.train.ops`."""
    make = re.search(r"^PREBUILD_DEEPSPEED_OPS := (.+)$", (REPO / "Makefile").read_text(), re.M)
    assert make and "$(PY) $(PREBUILD_DEEPSPEED_OPS)" in (REPO / "Makefile").read_text()
    return f"python {make.group(1).strip()}"


def test_cluster_nodes_prebuild_deepspeed_ops_where_their_ray_looks():
    """Nodes build DeepSpeed's ops at setup, as `make install` does, into a
    TORCH_EXTENSIONS_DIR that their `ray start` (and so every worker) sees, instead of
    JIT-compiling them in the first job's workers (minutes per node)."""
    prebuild = _prebuild_command()
    raw = load(CLUSTER / "aws.yaml")
    command_lists = _setup_command_lists(raw)
    for commands in command_lists:
        # The launcher sources ~/.bashrc before every command, `ray start` included.
        export_at = next(
            i
            for i, c in enumerate(commands)
            if "export TORCH_EXTENSIONS_DIR=" in c and "bashrc" in c
        )
        project_at = next(i for i, c in enumerate(commands) if "-e ~/beit-ray" in c)
        build_at = commands.index(prebuild)
        assert export_at < build_at and project_at < build_at, commands
    for cmd in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]:
        assert "TORCH_EXTENSIONS_DIR" not in cmd, cmd  # nothing points Ray elsewhere

    # The KubeRay image: ENV (reaches `ray start` in every pod) before the build, after the install.
    lines = [x.strip() for x in (KUBERAY / "Dockerfile").read_text().splitlines()]
    env_at = next(i for i, x in enumerate(lines) if x.startswith("ENV TORCH_EXTENSIONS_DIR="))
    build_at = lines.index(f"RUN {prebuild}")
    install_at = next(i for i, x in enumerate(lines) if x.startswith("RUN pip") and "-e ." in x)
    assert install_at < build_at and env_at < build_at
    for path in sorted(KUBERAY.glob("*.yaml")):  # no pod overrides the image's folder
        assert "TORCH_EXTENSIONS_DIR" not in path.read_text(), path.name


def test_prebuild_builds_each_op_and_reports_one_that_cannot_be_built(monkeypatch):
    """A node without a compiler still comes up: the op is reported, jobs build it later."""
    import sys
    import types

    from beit_ray.train import ops

    loaded = []

    class Builder:
        def __init__(self, name: str) -> None:
            self.name = name

        def is_compatible(self) -> bool:
            return True

        def load(self) -> None:
            if self.name == "CPUAdamBuilder":
                raise RuntimeError("no c++ compiler")
            loaded.append(self.name)

    class Accelerator:
        def create_op_builder(self, name: str):
            return None if name == "FusedAdamBuilder" else Builder(name)

        def device_name(self) -> str:
            return "cpu"

    fake = types.ModuleType("deepspeed.accelerator")
    fake.get_accelerator = Accelerator
    monkeypatch.setitem(sys.modules, "deepspeed.accelerator", fake)
    monkeypatch.setenv("PATH", os.environ["PATH"])  # prebuild puts the venv's bin first
    out = ops.prebuild((*ops.OPS, "FusedAdamBuilder"))
    assert loaded == ["ShareMemCommBuilder"] and out["ShareMemCommBuilder"] == "built"
    assert out["CPUAdamBuilder"].startswith("not built (RuntimeError: no c++ compiler)")
    assert out["FusedAdamBuilder"] == "not used on cpu"


def test_every_process_runs_the_interpreters_ninja(monkeypatch):
    """The prebuild, the job's workers and engines built in-process find the same ninja."""
    import shutil
    import sys

    from beit_ray.train import ops

    here = os.path.dirname(sys.executable)
    if not os.path.exists(os.path.join(here, "ninja")):
        pytest.skip("no ninja beside this interpreter")
    monkeypatch.setenv("PATH", "/usr/local/bin:/usr/bin:/bin")  # a system ninja first, if any
    ops.use_own_ninja()
    ops.use_own_ninja()
    assert os.environ["PATH"].split(os.pathsep).count(here) == 1  # first, once
    assert shutil.which("ninja") == os.path.join(here, "ninja")


def test_installed_ops_need_no_rebuild_by_that_ninja():
    """`make install`'s prebuilt ops are up to date for the ninja every process now runs: a
    ninja of another version reads the build log as "command line changed" and rebuilds."""
    import subprocess
    import sys

    ninja = os.path.join(os.path.dirname(sys.executable), "ninja")
    ext = os.environ.get("TORCH_EXTENSIONS_DIR", "")
    built = [
        os.path.join(ext, d)
        for d in ("deepspeed_shm_comm", "cpu_adam")
        if os.path.exists(os.path.join(ext, d, "build.ninja"))
    ]
    if not os.path.exists(ninja) or not built:
        pytest.skip("no prebuilt DeepSpeed ops (run make install) or no ninja in the venv")
    for d in built:
        out = subprocess.run([ninja, "-n", "-d", "explain"], cwd=d, capture_output=True, text=True)
        assert "no work to do" in out.stdout, (d, out.stdout[-2000:], out.stderr[-2000:])


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c["available_node_types"]["gpu_worker"].update(min_worker=1),  # typo
        lambda c: c["available_node_types"]["gpu_worker"].update(resources={"GPU": "4"}),
        lambda c: c.update(head_node_type="nope"),
        lambda c: c["available_node_types"]["cpu_worker"].update(min_workers=99),
    ],
    ids=["unknown-field", "string-resource", "bad-head-type", "min-over-global-max"],
)
def test_aws_launcher_validation_rejects_broken_copies(mutate):
    """The validator used above is live: the same file with one mistake fails."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load(CLUSTER / "aws.yaml")
    mutate(raw)
    with pytest.raises((jsonschema.ValidationError, ValueError, KeyError)):
        validate_config(prepare_config(raw))


# --------------------------------------------------------------------------- KubeRay


def check_resources(container: dict[str, Any], where: str) -> dict[str, Any]:
    res = container.get("resources") or {}
    limits = res.get("limits") or {}
    # KubeRay derives Ray's num-cpus / memory / num-gpus from the container limits.
    assert "cpu" in limits and "memory" in limits, f"{where}: resources.limits needs cpu, memory"
    requests = res.get("requests") or {}
    for k, v in requests.items():
        assert str(limits.get(k, v)) == str(v), f"{where}: request {k} differs from its limit"
    return limits


def check_pod_template(template: dict[str, Any], where: str) -> dict[str, Any]:
    assert isinstance(template, dict), f"{where}.template: required"
    containers = (template.get("spec") or {}).get("containers")
    assert containers, f"{where}.template.spec.containers: required"
    for i, c in enumerate(containers):
        assert c.get("name"), f"{where}.containers[{i}].name: required"
        assert c.get("image"), f"{where}.containers[{i}].image: required"
    check_shm(template["spec"], where)
    # The Ray container is the first one.
    return check_resources(containers[0], f"{where}.containers[0]")


def check_shm(pod: dict[str, Any], where: str) -> None:
    """The Ray container mounts an in-memory emptyDir at /dev/shm (a pod's own is 64 MB:
    NCCL's shared-memory transport fails and Ray's object store falls back to disk)."""
    memory = {
        v["name"]
        for v in pod.get("volumes") or []
        if (v.get("emptyDir") or {}).get("medium") == "Memory"
    }
    mounts = pod["containers"][0].get("volumeMounts") or []
    assert any(m.get("mountPath") == "/dev/shm" and m.get("name") in memory for m in mounts), (
        f"{where}: mount an emptyDir with medium Memory at /dev/shm in the Ray container"
    )


def check_start_params(params: Any, where: str) -> None:
    assert isinstance(params, dict), f"{where}.rayStartParams: required (may be empty)"
    for k, v in params.items():
        # map[string]string in the CRD: `num-cpus: 0` (an int) is rejected by the API server.
        assert isinstance(k, str) and isinstance(v, str), f"{where}.rayStartParams.{k}: quote it"


def check_cluster_spec(spec: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    """Check a RayClusterSpec; returns the container limits per group name ('head' included)."""
    assert set(spec) <= CLUSTER_SPEC_FIELDS, f"{where}: unknown {set(spec) - CLUSTER_SPEC_FIELDS}"
    assert str(spec.get("rayVersion")) == ray.__version__, f"{where}.rayVersion"
    assert set(spec.get("autoscalerOptions") or {}) <= AUTOSCALER_FIELDS
    head = spec.get("headGroupSpec")
    assert isinstance(head, dict), f"{where}.headGroupSpec: required"
    assert set(head) >= HEAD_GROUP_REQUIRED, f"{where}.headGroupSpec: needs {HEAD_GROUP_REQUIRED}"
    assert set(head) <= HEAD_GROUP_FIELDS, f"{where}.headGroupSpec: unknown fields"
    check_start_params(head["rayStartParams"], f"{where}.headGroupSpec")
    limits = {"head": check_pod_template(head["template"], f"{where}.headGroupSpec")}
    groups = spec.get("workerGroupSpecs") or []
    names = [g.get("groupName") for g in groups]
    assert len(set(names)) == len(names), f"{where}: groupName must be unique"
    for g in groups:
        w = f"{where}.workerGroupSpecs[{g.get('groupName')}]"
        assert set(g) >= WORKER_GROUP_REQUIRED, f"{w}: needs {WORKER_GROUP_REQUIRED - set(g)}"
        assert set(g) <= WORKER_GROUP_FIELDS, f"{w}: unknown {set(g) - WORKER_GROUP_FIELDS}"
        assert DNS1123.match(g["groupName"]), f"{w}.groupName: must be a DNS-1123 label"
        lo, hi, n = g["minReplicas"], g["maxReplicas"], g.get("replicas", g["minReplicas"])
        assert all(isinstance(x, int) for x in (lo, hi, n)), f"{w}: replicas are integers"
        assert 0 <= lo <= n <= hi, f"{w}: needs minReplicas <= replicas <= maxReplicas"
        check_start_params(g["rayStartParams"], w)
        limits[g["groupName"]] = check_pod_template(g["template"], w)
    return limits


def check_manifest(doc: dict[str, Any], kind: str) -> dict[str, Any]:
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == kind
    assert DNS1123.match(doc["metadata"]["name"]), "metadata.name: must be a DNS-1123 name"
    assert isinstance(doc.get("spec"), dict), "spec: required"
    return doc["spec"]


def test_raycluster_has_head_cpu_and_gpu_groups():
    spec = check_manifest(load(KUBERAY / "raycluster.yaml"), "RayCluster")
    limits = check_cluster_spec(spec, "spec")
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert "nvidia.com/gpu" not in limits["head"]
    gpu = [n for n, lim in limits.items() if "nvidia.com/gpu" in lim]
    cpu = [n for n, lim in limits.items() if n != "head" and "nvidia.com/gpu" not in lim]
    assert gpu and cpu, limits
    assert spec["enableInTreeAutoscaling"] is True


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s["headGroupSpec"].pop("rayStartParams"),
        lambda s: s["workerGroupSpecs"][0].pop("groupName"),
        lambda s: s["workerGroupSpecs"][0].update(minReplicas=5, maxReplicas=2),
        lambda s: s["workerGroupSpecs"][0].update(maxReplica=2),
        lambda s: s["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
        lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0].pop("image"),
        lambda s: s["workerGroupSpecs"][1]["template"]["spec"].pop("volumes"),
        lambda s: s["workerGroupSpecs"][0]["template"]["spec"]["volumes"][0].update(emptyDir={}),
        lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0].pop("volumeMounts"),
    ],
    ids=[
        "no-start-params",
        "no-group-name",
        "min-over-max",
        "typo",
        "int-param",
        "no-image",
        "gpu-no-shm-volume",
        "shm-on-disk",
        "head-no-shm-mount",
    ],
)
def test_raycluster_checks_reject_broken_copies(mutate):
    spec = load(KUBERAY / "raycluster.yaml")["spec"]
    mutate(spec)
    with pytest.raises((AssertionError, KeyError)):
        check_cluster_spec(spec, "spec")


def test_rayjob_runs_pretrain_with_a_valid_config_and_runtime_env():
    from ray.runtime_env import RuntimeEnv

    spec = check_manifest(load(KUBERAY / "rayjob-pretrain.yaml"), "RayJob")
    assert set(spec) <= RAYJOB_FIELDS, set(spec) - RAYJOB_FIELDS
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode")
    limits = check_cluster_spec(spec["rayClusterSpec"], "spec.rayClusterSpec")
    assert any("nvidia.com/gpu" in lim for lim in limits.values())

    env = yaml.safe_load(spec["runtimeEnvYAML"])
    # The working dir is this repo as the image holds it (the Dockerfile's WORKDIR); Ray's own
    # validation needs it to exist, so it checks the env with the repo in its place.
    workdir = re.search(r"^WORKDIR (\S+)", (KUBERAY / "Dockerfile").read_text(), re.M)
    assert workdir and env["working_dir"] == workdir.group(1)
    RuntimeEnv(**{**env, "working_dir": str(REPO)})
    assert isinstance(env["env_vars"], dict)

    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "jobs/pretrain.py"], argv
    if not (REPO / "jobs" / "pretrain.py").exists():
        pytest.skip("jobs/pretrain.py not written yet: cannot check its arguments")
    from beit_ray.config import parse_args
    from beit_ray.train.config import PretrainConfig

    cfg = parse_args(PretrainConfig, argv[2:])  # every --section.field exists and validates
    assert cfg.scaling.use_gpu and cfg.checkpoint.storage_path.startswith("s3://")
    # The GPU groups can hold every train worker plus the tokenizer actors at full size.
    gpus = sum(
        int(lim["nvidia.com/gpu"]) * g["maxReplicas"]
        for g in spec["rayClusterSpec"]["workerGroupSpecs"]
        for lim in [limits[g["groupName"]]]
        if "nvidia.com/gpu" in lim
    )
    tok_gpus = (cfg.data.tokenizer_num_gpus or 0) * cfg.data.tokenizer_actors[1]
    assert cfg.scaling.num_workers + tok_gpus <= gpus


def serve_config(doc: dict[str, Any]):
    """Parse with Ray's ServeDeploySchema, plus what it lets through: unknown keys (ignored by
    pydantic, so a typo is silently dropped) and autoscaling bounds (checked only at deploy)."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    schema = ServeDeploySchema.model_validate(doc)
    assert set(doc) <= set(ServeDeploySchema.model_fields), set(doc)
    for app in doc["applications"]:
        assert set(app) <= set(ServeApplicationSchema.model_fields), set(app)
        for dep in app.get("deployments") or []:
            assert set(dep) <= set(DeploymentSchema.model_fields), set(dep)
            if dep.get("autoscaling_config"):
                AutoscalingConfig(**dep["autoscaling_config"])
    return schema


def test_rayservice_serve_config_is_a_valid_serve_deploy_config():
    spec = check_manifest(load(KUBERAY / "rayservice.yaml"), "RayService")
    assert set(spec) <= RAYSERVICE_FIELDS, set(spec) - RAYSERVICE_FIELDS
    assert isinstance(spec["serveConfigV2"], str), "serveConfigV2 is a YAML string"
    check_cluster_spec(spec["rayClusterConfig"], "spec.rayClusterConfig")

    schema = serve_config(yaml.safe_load(spec["serveConfigV2"]))
    assert [a.import_path for a in schema.applications] == ["beit_ray.serve.app:app_builder"]
    assert schema.http_options.host == "0.0.0.0"  # reachable through the serve Service
    if (REPO / "beit_ray" / "serve" / "config.py").exists():
        from beit_ray.config import build
        from beit_ray.serve.config import ServeConfig

        cfg = build(ServeConfig, schema.applications[0].args)  # what app_builder does first
        assert cfg.checkpoint.startswith("s3://")
    gpus = {d.name: d.ray_actor_options.num_gpus or 0 for d in schema.applications[0].deployments}
    assert gpus.get("Classifier", 0) >= 1, "model replicas go on the GPU group"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["applications"][0].update(import_path="beit_ray"),
        lambda d: d["applications"][0].update(deployments=[{"name": "X", "num_replicas": "lots"}]),
        lambda d: d["applications"][0].update(deployments=[{"name": "X", "num_replica": 2}]),
        lambda d: d["applications"][0].update(
            deployments=[
                {"name": "X", "autoscaling_config": {"min_replicas": 4, "max_replicas": 2}}
            ]
        ),
    ],
    ids=["bad-import-path", "bad-replicas", "typo", "min-over-max"],
)
def test_serve_config_checks_reject_broken_copies(mutate):
    from pydantic import ValidationError

    doc = yaml.safe_load(load(KUBERAY / "rayservice.yaml")["spec"]["serveConfigV2"])
    mutate(doc)
    with pytest.raises((ValidationError, AssertionError)):
        serve_config(doc)


def test_rayservice_matches_cluster_serve_yaml_and_the_app_exists():
    """The RayService serves the same application as cluster/serve.yaml (`serve run`)."""
    local_path = CLUSTER / "serve.yaml"
    if not local_path.exists() or not (REPO / "beit_ray" / "serve" / "app.py").exists():
        pytest.skip("cluster/serve.yaml / beit_ray/serve/app.py not written yet")
    import importlib

    k8s = serve_config(yaml.safe_load(load(KUBERAY / "rayservice.yaml")["spec"]["serveConfigV2"]))
    local = serve_config(load(local_path))
    assert len(k8s.applications) == len(local.applications)
    for a, b in zip(k8s.applications, local.applications, strict=True):
        assert (a.name, a.route_prefix, a.import_path) == (b.name, b.route_prefix, b.import_path)
        assert set(a.args) == set(b.args), "the same app arguments (values may differ)"
        assert [d.name for d in a.deployments] == [d.name for d in b.deployments]
        assert a.runtime_env == b.runtime_env
        module, attr = a.import_path.split(":")
        assert callable(getattr(importlib.import_module(module), attr))


def test_all_manifests_use_one_image_and_ray_version():
    images = set()
    for path in sorted(KUBERAY.glob("*.yaml")):
        text = path.read_text()
        images |= set(re.findall(r"image:\s*(\S+)", text))
    assert len(images) == 1, images
    assert re.search(r"FROM \$\{BASE\}", (KUBERAY / "Dockerfile").read_text())
    assert f"rayproject/ray:{ray.__version__}-" in (KUBERAY / "Dockerfile").read_text()


# --------------------------------------------------------------------------- runtime env


def test_runtime_env_yaml_is_valid_and_keeps_the_upload_small(tmp_path):
    """What `ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml` uploads."""
    from ray._private.runtime_env.packaging import create_package
    from ray.runtime_env import RuntimeEnv

    env = load(CLUSTER / "runtime_env.yaml")
    RuntimeEnv(working_dir=".", **env)
    package = tmp_path / "pkg.zip"
    # Without .gitignore help, so the excludes alone must keep the venv and runs out.
    create_package(str(REPO), package, include_gitignore=False, excludes=env["excludes"])
    names = zipfile.ZipFile(package).namelist()
    assert "jobs/label.py" in names and "beit_ray/config.py" in names
    for banned in (".venv/", ".git/", "runs/"):
        assert not any(n.startswith(banned) for n in names), banned
    assert package.stat().st_size < 20 * 2**20, f"{package.stat().st_size / 2**20:.1f} MiB"


# --------------------------------------------------------------------------- feed


# The GPU in an AWS instance family (the families whose cards beit_ray.feed knows).
AWS_GPUS = {"g5": "A10G", "g6": "L4", "p4d": "A100", "p4de": "A100", "p5": "H100", "p5e": "H200"}


def check_feeds(cfg: Any, limits: dict[str, float]) -> None:
    """The groups hold the trainers, the tokenizer pool at full size and the decode CPUs the
    feed model says keep the trainers busy, and the pool may grow to the actors it needs."""
    from beit_ray import feed

    s, d = cfg.scaling, cfg.data
    f = feed.estimate(cfg, gpus=limits["GPU"])
    assert f.ok, f.verdict
    assert s.num_workers + d.tokenizer_actors[1] * f.tokenizer_gpus <= limits["GPU"]
    held = s.num_workers * s.cpus_per_worker + d.tokenizer_actors[1] * d.tokenizer_num_cpus
    assert limits["CPU"] - held >= f.decode_cores + 1, (limits, held, f.decode_cores)


def rayjob_config_and_limits(doc: dict[str, Any]) -> tuple[Any, dict[str, float]]:
    """The RayJob's pretraining config and its cluster's limits, translated by Ray's KubeRay
    autoscaler code as beit_ray.runtime reads them on the head."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    from beit_ray.config import parse_args
    from beit_ray.runtime import launcher_limits
    from beit_ray.train.config import PretrainConfig

    cr = {"metadata": {"name": "beit-pretrain-x", "namespace": "default"},
          "spec": doc["spec"]["rayClusterSpec"]}  # fmt: skip
    limits = launcher_limits(_derive_autoscaling_config_from_ray_cr(cr))
    return parse_args(PretrainConfig, shlex.split(doc["spec"]["entrypoint"])[2:]), limits


def test_rayjob_feeds_what_it_trains():
    cfg, limits = rayjob_config_and_limits(load(KUBERAY / "rayjob-pretrain.yaml"))
    assert cfg.data.tokenizer == "dalle" and cfg.scaling.use_gpu
    check_feeds(cfg, limits)


def test_aws_cluster_feeds_the_job_it_is_sized_for():
    from ray.autoscaler._private.util import prepare_config

    from beit_ray.config import parse_args
    from beit_ray.runtime import launcher_limits
    from beit_ray.train.config import PretrainConfig

    aws = prepare_config(load(CLUSTER / "aws.yaml"))
    cfg = parse_args(PretrainConfig, ["--config", str(CLUSTER / "pretrain-cluster.yaml")])
    gpu_types = [t for t in aws["available_node_types"].values() if t["resources"].get("GPU")]
    family = gpu_types[0]["node_config"]["InstanceType"].split(".")[0]
    assert cfg.scaling.gpu_kind == AWS_GPUS[family]  # the plan sizes for the cards it gets
    check_feeds(cfg, launcher_limits(aws))
    # The README submits this config to that cluster.
    assert "--config cluster/pretrain-cluster.yaml" in (REPO / "README.md").read_text()


@pytest.mark.parametrize(
    "args",
    [
        ["--data.tokenizer_actors", "[2,8]"],  # what the RayJob had: half the actors it needs
        ["--scaling.num_workers", "12"],  # 12 trainers + 6.4 GPUs of DALL-E > 16 GPUs
        ["--data.tokenizer_num_gpus", "0"],  # CPU DALL-E: ~1 image/s per core
        ["--scaling.cpus_per_worker", "50"],  # workers hold the CPUs decode needs
    ],
    ids=["small-pool", "too-many-trainers", "cpu-dalle", "no-decode-cpus"],
)
def test_feed_check_rejects_clusters_that_starve_their_trainers(args):
    from beit_ray.config import parse_args
    from beit_ray.train.config import PretrainConfig

    doc = load(KUBERAY / "rayjob-pretrain.yaml")
    _, limits = rayjob_config_and_limits(doc)
    cfg = parse_args(PretrainConfig, [*shlex.split(doc["spec"]["entrypoint"])[2:], *args])
    with pytest.raises(AssertionError):
        check_feeds(cfg, limits)
