"""`ray job submit` against a real two-node Ray cluster on this machine (loopback only).

The cluster is the README's ("Try a two-node cluster on one machine"): its `ray start --head`
on 127.0.0.2, which runs no tasks (`--num-cpus=0`), and its `ray start --address=...` on
127.0.0.3, read from README.md and run as written but for fresh ports and temp dirs (so it
never meets the session's local Ray on 127.0.0.1, or another run of this module), with
`--block` and a small object store. Every `ray start --block` runs in a new session (setsid)
that this module owns; teardown signals those processes and then kills whatever is left in
exactly those sessions, by pid. It never runs `ray stop`.

Then the README's own `ray job submit ... -- python jobs/pretrain.py` (the embedded default
plus the README's storage flags, `$PWD/runs` → a temp dir) must end with a model; the other
jobs are submitted the same way, from the repo root, with everything on a local S3 server:

    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env-json '{"excludes": [".venv", "runs", ".git", ...]}' \
        -- python jobs/pretrain.py ...
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
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
RECIPE_TITLE = "**Try a two-node cluster on one machine**"
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
class Recipe:
    """The README's two-node recipe: what it exports, its two `ray start`s, its `ray job submit`."""

    env: dict[str, str]
    head: list[str]
    worker: list[str]
    submit: list[str]


def readme_recipe(runs: Path) -> Recipe:
    """The commands of README.md's recipe block, with `$PWD/.venv` the venv these tests run in,
    `$PWD/runs` = ``runs`` (never the checkout's own runs/) and `$PWD` this checkout."""
    text = (REPO / "README.md").read_text()
    block = text.split(RECIPE_TITLE, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    block = block.replace("\\\n", " ").replace("$PWD/.venv", str(VENV_BIN.parent))
    block = block.replace("$PWD/runs", str(runs)).replace("$PWD", str(REPO))
    commands = [shlex.split(line, comments=True) for line in block.splitlines()]
    commands = [c for c in commands if c]
    env: dict[str, str] = {}
    for argv in (c for c in commands if c[0] == "export"):
        for item in argv[1:]:
            key, value = item.split("=", 1)
            env[key] = value.replace("$PATH", os.environ.get("PATH", ""))
    starts = [c for c in commands if c[:2] == ["ray", "start"]]
    submits = [c for c in commands if c[:3] == ["ray", "job", "submit"]]
    assert len(starts) == 2 and len(submits) == 1, block
    assert len(commands) == 3 + sum(c[0] == "export" for c in commands), block  # nothing else
    assert not any("$" in a for c in starts + submits for a in c), block  # all substituted
    head, worker = sorted(starts, key=lambda c: "--head" not in c)
    return Recipe(env, head, worker, submits[0])


def with_values(argv: list[str], values: dict[str, str]) -> list[str]:
    """``argv`` with each ``--flag=value`` / ``--flag value`` in ``values`` given that value; every
    flag must be there already (a README change shows up here, not as a silent extra flag)."""
    out, seen, skip = [], set(), False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        flag = arg.split("=", 1)[0]
        if flag in values:
            seen.add(flag)
            out.append(f"{flag}={values[flag]}")
            skip = "=" not in arg and i + 1 < len(argv)
        else:
            out.append(arg)
    assert seen == set(values), (set(values) - seen, argv)
    return out


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
        runtime_env = {
            **RUNTIME_ENV,
            "env_vars": {**RUNTIME_ENV.get("env_vars", {}), **(env_vars or {})},
        }
        args = ["--address", self.dashboard, "--working-dir", "."]
        args += ["--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint]
        return self.submit_cli(args, timeout)

    def submit_cli(self, args: list[str], timeout: float) -> tuple[str, str]:
        """``ray job submit <args>`` from the repo root, as a person types it; returns (final
        status, job logs)."""
        from ray.job_submission import JobSubmissionClient

        submission_id = f"test_{uuid.uuid4().hex[:8]}"
        entrypoint = args[args.index("--") + 1 :]
        cmd = [str(VENV_BIN / "ray"), "job", "submit", "--submission-id", submission_id, *args]
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


def _start_cluster(temp_dir: str) -> Cluster:
    """The README's two nodes, with fresh ports and temp dirs under ``temp_dir``."""
    import httpx

    recipe = readme_recipe(Path(temp_dir) / "runs")
    # No AWS_* on the nodes: jobs get their S3 settings from the runtime env, as documented.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("AWS_")}
    # Unset, as in a person's shell: "0" (this test session's single-node setting) forbids
    # multi-node clusters; the nodes' explicit IPs keep everything on loopback.
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    env.update(recipe.env, RAY_USAGE_STATS_ENABLED="0")
    gcs_port, dash_port = _free_port(), _free_port()
    gcs = f"{HEAD_IP}:{gcs_port}"
    dashboard = f"http://{HEAD_IP}:{dash_port}"
    ray = str(VENV_BIN / "ray")
    extra = ["--block", "--disable-usage-stats", "--object-store-memory=400000000"]
    head = [ray] + with_values(
        recipe.head[1:],
        {
            "--port": str(gcs_port),
            "--dashboard-port": str(dash_port),
            "--dashboard-agent-listen-port": str(_free_port()),
            "--temp-dir": f"{temp_dir}/h",
        },
    )
    head += [*extra, f"--ray-client-server-port={_free_port()}", "--include-dashboard=true"]
    worker = [ray] + with_values(
        recipe.worker[1:],
        {
            "--address": gcs,
            "--dashboard-agent-listen-port": str(_free_port()),
            "--temp-dir": f"{temp_dir}/w",
        },
    )
    worker += extra
    assert f"--node-ip-address={HEAD_IP}" in head and f"--node-ip-address={WORKER_IP}" in worker
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
    """The README's two-node Ray cluster: a head that runs no tasks on 127.0.0.2, a worker on
    127.0.0.3 with the CPUs."""
    temp_dir = tempfile.mkdtemp(prefix="rc_", dir="/tmp")
    c = _start_cluster(temp_dir)
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

@ray.remote(num_cpus=0)  # the head has no CPUs: it runs only what asks for none
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


@pytest.fixture(scope="module")
def recipe_run(cluster: Cluster, tmp_path_factory) -> Path:
    """The README's `ray job submit ... -- python jobs/pretrain.py` with its storage flags, run
    as written (its `--address` → this cluster's, `$PWD/runs` → a temp dir); returns the runs dir.

    The embedded default on the head-runs-nothing cluster: the driver on 127.0.0.2 makes the
    demo images and fits their codebook, and the tokenizer actor, read tasks and train workers
    on 127.0.0.3 must find them (they once looked in their own node's copy of the working dir).
    """
    runs = tmp_path_factory.mktemp("recipe") / "runs"
    recipe = readme_recipe(runs)
    args = with_values(recipe.submit[3:], {"--address": cluster.dashboard})
    status, logs = cluster.submit_cli(args, timeout=1200)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "pretraining done at step" in logs, logs[-4000:]
    return runs


def test_readme_two_node_recipe_ends_with_a_model(recipe_run: Path):
    from beit_ray.models.load import load_model

    run = recipe_run / "pretrain-debug"
    model = load_model(str(run))  # the run's HF export
    assert sum(p.numel() for p in model.parameters()) > 100_000
    # What the job made for its workers is under the run storage, where both nodes read it.
    demo = recipe_run / "demo-data"
    assert (demo / "codebook.safetensors").is_file() and len(list((demo / "images").iterdir())) == 8
    assert (run / "listing").is_dir() and (run / "model" / "config.json").is_file()


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


def test_pretrain_and_label_jobs_on_the_cluster_with_s3(
    cluster: Cluster, images_on_s3: str, recipe_run: Path
):
    """The README's cluster path on a local S3: pretrain (2 DeepSpeed workers, checkpoints on
    s3://) with the recipe's fitted codebook, then label the images with the pretrained run;
    S3 settings travel in env_vars."""
    from beit_ray import storage

    bucket = images_on_s3
    s3_env = {k: os.environ[k] for k in S3_ENV_KEYS}
    # The codebook the recipe's job fitted on the cluster (the fit_tokenizer job's fit_codebook)
    codebook = (recipe_run / "demo-data" / "codebook.safetensors").read_bytes()
    storage.write_bytes(f"{bucket}/codebook.safetensors", codebook)

    status, logs = cluster.submit(
        [
            "python",
            "jobs/pretrain.py",
            "--model.flavour",
            "debug",
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
        timeout=600,  # 4 steps, then checkpoints and the export to S3: 420 s ran out under load
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
