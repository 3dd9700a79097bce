"""`ray job submit` against a real two-node Ray cluster on this machine (loopback only).

The cluster is `ray start --head` on 127.0.0.2 plus `ray start --address=...` on 127.0.0.3,
each with its own temp dir and agent ports, so it never meets the session's local Ray
(`ray_session`, 127.0.0.1). Every `ray start --block` runs in a new session (setsid) that this
module owns; teardown signals those processes and then kills whatever is left in exactly those
sessions, by pid. It never runs `ray stop`.

Jobs are submitted the way the README says, from the repo root:

    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env-json '{"excludes": [".venv", "runs", ".git", ...]}' \
        -- python jobs/pretrain.py ...
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from beit_ray.infer.label import PART_RE

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
# The documented runtime env (`--runtime-env cluster/runtime_env.yaml`): excludes keep .venv
# (~2 GB; Ray caps uploads at 500 MiB), .git and runs out of the upload.
RUNTIME_ENV = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
S3_ENV_KEYS = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
)


def _free_port() -> int:
    # Bound on every interface: some Ray agents listen on 0.0.0.0, not on the node's IP.
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _session_pids(sid: int) -> list[int]:
    """Pids of live processes whose session id is ``sid`` (read from /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp session
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


@dataclass
class Cluster:
    """A running two-node cluster this module started."""

    dashboard: str
    gcs: str
    env: dict[str, str]
    temp_dir: str
    procs: list[subprocess.Popen] = field(default_factory=list)

    def submit(
        self,
        entrypoint: list[str],
        timeout: float,
        env_vars: dict[str, str] | None = None,
    ) -> tuple[str, str]:
        """``ray job submit`` from the repo root; returns (final status, job logs)."""
        from ray.job_submission import JobSubmissionClient

        submission_id = f"test_{uuid.uuid4().hex[:8]}"
        runtime_env = {
            **RUNTIME_ENV,
            "env_vars": {**RUNTIME_ENV.get("env_vars", {}), **(env_vars or {})},
        }
        cmd = [
            str(VENV_BIN / "ray"),
            "job",
            "submit",
            "--address",
            self.dashboard,
            "--submission-id",
            submission_id,
            "--working-dir",
            ".",
            "--runtime-env-json",
            json.dumps(runtime_env),
            "--",
            *entrypoint,
        ]
        # The CLI uploads the working dir, submits, then follows the job's logs until it ends.
        try:
            cli = subprocess.run(
                cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout
            )
            cli_output = cli.stdout[-3000:] + cli.stderr[-3000:]
        except subprocess.TimeoutExpired:
            cli_output = f"`ray job submit` still waiting after {timeout:.0f} s"
        client = JobSubmissionClient(self.dashboard)
        try:
            status = str(client.get_job_status(submission_id).value)
        except RuntimeError:  # the job server never accepted the submission
            return "NOT_SUBMITTED", cli_output
        info = client.get_job_info(submission_id)
        if info.start_time and info.end_time:
            print(f"{entrypoint[1:3]}: {status} in {(info.end_time - info.start_time) / 1e3:.0f} s")
        if status not in ("SUCCEEDED", "FAILED", "STOPPED"):
            client.stop_job(submission_id)
        return status, client.get_job_logs(submission_id)

    def stop(self) -> None:
        """SIGTERM each `ray start --block`, then SIGKILL what is left in its session."""
        for proc in reversed(self.procs):  # worker node first
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5  # the head drains for up to 30 s; don't wait for it
        while time.monotonic() < deadline and any(_session_pids(p.pid) for p in self.procs):
            time.sleep(0.25)
        deadline = time.monotonic() + 15
        while (left := [q for p in self.procs for q in _session_pids(p.pid)]) and (
            time.monotonic() < deadline
        ):
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.25)
        for proc in self.procs:
            proc.wait(timeout=10)


def _wait_for(what: str, ok, timeout: float, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"`ray start` exited with {proc.returncode} before {what}")
        try:
            if ok():
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def _start_cluster(temp_dir: str, extra_env: dict[str, str]) -> Cluster:
    import httpx

    # No AWS_* on the nodes: jobs get their S3 settings from the runtime env, as documented.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("AWS_")}
    env.update(extra_env)
    env.update(
        # Jobs run `python ...` from PATH: it must be this venv's interpreter.
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        # "0" forbids multi-node clusters; the nodes' explicit IPs keep everything on loopback.
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1",
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        TORCH_EXTENSIONS_DIR=env.get(
            "TORCH_EXTENSIONS_DIR", str(VENV_BIN.parent / "torch_extensions")
        ),
    )
    gcs_port, dash_port = _free_port(), _free_port()
    gcs = f"{HEAD_IP}:{gcs_port}"
    dashboard = f"http://{HEAD_IP}:{dash_port}"
    ray = str(VENV_BIN / "ray")
    common = ["--block", "--disable-usage-stats", "--num-cpus=2", "--object-store-memory=400000000"]
    head = [
        ray,
        "start",
        "--head",
        f"--node-ip-address={HEAD_IP}",
        f"--port={gcs_port}",
        f"--ray-client-server-port={_free_port()}",
        "--include-dashboard=true",
        f"--dashboard-host={HEAD_IP}",
        f"--dashboard-port={dash_port}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--temp-dir={temp_dir}/h",
        *common,
    ]
    worker = [
        ray,
        "start",
        f"--address={gcs}",
        f"--node-ip-address={WORKER_IP}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--temp-dir={temp_dir}/w",
        *common,
    ]
    cluster = Cluster(dashboard=dashboard, gcs=gcs, env=env, temp_dir=temp_dir)

    def popen(cmd: list[str], name: str) -> subprocess.Popen:
        log = open(Path(temp_dir) / f"{name}.log", "wb")  # noqa: SIM115 (lives with the process)
        proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        cluster.procs.append(proc)
        return proc

    def alive_nodes() -> list[str]:
        r = httpx.get(f"{dashboard}/api/v0/nodes", timeout=5).json()
        rows = r["data"]["result"]["result"]
        return sorted(n["node_ip"] for n in rows if n["state"] == "ALIVE")

    try:
        popen(head, "head")
        _wait_for(
            "the head's dashboard",
            lambda: httpx.get(f"{dashboard}/api/version", timeout=2).status_code == 200,
            120,
            cluster.procs,
        )
        popen(worker, "worker")
        _wait_for(
            "both nodes alive",
            lambda: alive_nodes() == [HEAD_IP, WORKER_IP],
            120,
            cluster.procs,
        )
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A two-node Ray cluster (2 + 2 logical CPUs) on 127.0.0.2 / 127.0.0.3."""
    temp_dir = tempfile.mkdtemp(prefix="rc_", dir="/tmp")
    c = _start_cluster(temp_dir, {})
    try:
        yield c
    finally:
        c.stop()
        left = [q for p in c.procs for q in _session_pids(p.pid)]
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"cluster processes left behind: {left}"


PROBE = """
import beit_ray, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

ray.init()
nodes = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}

@ray.remote(num_cpus=1)
def where() -> tuple[str, str]:
    import beit_ray
    return ray.get_runtime_context().get_node_id(), beit_ray.__file__

placed = [
    where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote()
    for n in nodes
]
print("RAN_ON", sorted(nodes[n] for n, _ in ray.get(placed)))
print("DRIVER_IMPORTS", beit_ray.__file__)
print("WORKER_IMPORTS", sorted({f for _, f in ray.get(placed)}))
total = ray.data.range(1000).map_batches(lambda b: {"x": b["id"] * 2}).sum("x")
print("DATA_SUM", total)
"""


def test_probe_job_runs_on_both_nodes_with_uploaded_code(cluster: Cluster, tmp_path: Path):
    """The repo is uploaded (without .venv/.git) and its code, not the editable install, runs."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    status, logs = cluster.submit(["python", str(script)], timeout=120)
    assert status == "SUCCEEDED", logs[-3000:]
    lines = dict(
        line.split(" ", 1)
        for line in logs.splitlines()
        if line.startswith(("RAN_ON", "DRIVER_IMPORTS", "WORKER_IMPORTS", "DATA_SUM"))
    )
    assert lines["RAN_ON"] == repr([HEAD_IP, WORKER_IP])
    assert lines["DATA_SUM"] == str(sum(2 * i for i in range(1000)))
    # The job's beit_ray is the uploaded copy (Ray puts the working dir first on PYTHONPATH).
    assert not lines["DRIVER_IMPORTS"].startswith(str(REPO)), lines["DRIVER_IMPORTS"]
    assert cluster.temp_dir in lines["DRIVER_IMPORTS"]
    for path in json.loads(lines["WORKER_IMPORTS"].replace("'", '"')):
        assert cluster.temp_dir in path and not path.startswith(str(REPO))


JOBS = ("fit_tokenizer.py", "pretrain.py", "label.py")


@pytest.fixture(scope="module")
def images_on_s3(s3_server, tmp_path_factory) -> str:
    """64 small real-photo JPEGs in 8 class folders on the moto S3 server; returns the URI."""
    import boto3

    from beit_ray import storage
    from beit_ray.train.demo_data import make_demo_images

    bucket = f"cluster-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    local = make_demo_images(str(tmp_path_factory.mktemp("demo")), per_photo=8, size=64)
    storage.upload_dir(local, f"s3://{bucket}/images")
    return f"s3://{bucket}"


@pytest.mark.skipif(
    not all((REPO / "jobs" / j).exists() for j in JOBS),
    reason=f"needs jobs/{', jobs/'.join(JOBS)}",
)
def test_tokenizer_pretrain_and_label_jobs_on_the_cluster(cluster: Cluster, images_on_s3: str):
    """The README's cluster path: fit a tokenizer, pretrain (2 DeepSpeed workers, checkpoints on
    s3://), then label the images with the pretrained run; S3 settings travel in env_vars."""
    from beit_ray import storage

    bucket = images_on_s3
    s3_env = {k: os.environ[k] for k in S3_ENV_KEYS}

    status, logs = cluster.submit(
        [
            "python",
            "jobs/fit_tokenizer.py",
            "--input",
            f"{bucket}/images",
            "--output",
            f"{bucket}/codebook.safetensors",
            "--data.image_size",
            "32",
            "--data.patch_size",
            "8",
            "--data.tokenizer_image_size",
            "32",
            "--codebook.vocab_size",
            "64",
            "--codebook.sample_images",
            "64",
        ],
        timeout=240,
        env_vars=s3_env,
    )
    assert status == "SUCCEEDED", logs[-4000:]
    assert storage.exists(f"{bucket}/codebook.safetensors")

    status, logs = cluster.submit(
        [
            "python",
            "jobs/pretrain.py",
            "--model.flavour",
            "debug",
            "--model.vocab_size",
            "64",
            "--data.source",
            f"{bucket}/images",
            "--data.tokenizer",
            "codebook",
            "--data.tokenizer_weights",
            f"{bucket}/codebook.safetensors",
            "--data.batch_size",
            "16",
            "--scaling.num_workers",
            "2",
            "--deepspeed.micro_batch_size",
            "4",
            "--optim.lr",
            "1e-3",
            "--run.max_steps",
            "4",
            "--run.log_every",
            "1",
            "--checkpoint.storage_path",
            f"{bucket}/runs",
            "--checkpoint.name",
            "cluster-pt",
        ],
        timeout=420,
        env_vars=s3_env,
    )
    assert status == "SUCCEEDED", logs[-4000:]
    run = f"{bucket}/runs/cluster-pt"
    assert "pretraining done at step 4" in logs, logs[-4000:]
    assert storage.exists(f"{run}/model/config.json")

    status, logs = cluster.submit(
        [
            "python",
            "jobs/label.py",
            "--input",
            f"{bucket}/images",
            "--output",
            f"{bucket}/labels",
            "--checkpoint",
            run,
            "--task",
            "embed",
            "--actors.num_cpus",
            "0.5",
        ],
        timeout=300,
        env_vars=s3_env,
    )
    assert status == "SUCCEEDED", logs[-4000:]
    summary = json.loads(storage.read_text(f"{bucket}/labels/_SUMMARY.json"))
    import pyarrow.parquet as pq

    rows = []
    for part in storage.list_files(f"{bucket}/labels", suffixes=(".parquet",)):
        if not PART_RE.match(part.rsplit("/", 1)[-1]):  # the plan and listing files beside them
            continue
        with storage.open_uri(part) as f:
            rows += pq.read_table(f).to_pylist()
    assert len(rows) == 64 and all(r["error"] is None for r in rows), summary
    assert {len(r["embedding"]) for r in rows} == {64}  # debug flavour width


def test_job_scripts_do_not_shadow_stdlib_modules():
    """`python jobs/X.py` puts jobs/ first on sys.path: a jobs/tokenize.py would replace the
    stdlib `tokenize` (imported by dataclasses → inspect → linecache) and break every job."""
    shadowing = sorted(
        p.name for p in (REPO / "jobs").glob("*.py") if p.stem in sys.stdlib_module_names
    )
    assert not shadowing, f"rename {shadowing}: they shadow standard-library modules"
