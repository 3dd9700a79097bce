"""Every job script: --help lists its fields, and a bad value fails before any Ray work."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS = sorted(
    f for f in os.listdir(os.path.join(ROOT, "jobs")) if f.endswith(".py") and f != "demo.py"
)


def run(job: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join("jobs", job), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "RAY_ADDRESS": ""},
    )


@pytest.mark.parametrize("job", JOBS)
def test_help_lists_documented_fields(job):
    out = run(job, "--help")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout
    assert "--ray.address" in out.stdout and "--storage.endpoint_url" in out.stdout
    # Every job script opens with a docstring showing the cluster and the local command.
    with open(os.path.join(ROOT, "jobs", job)) as f:
        source = f.read()
    assert (
        "ray job submit" in source.split('"""')[1]
        and f"python jobs/{job}" in source.split('"""')[1]
    )


@pytest.mark.parametrize("job", JOBS)
def test_bad_value_fails_before_ray_naming_the_field(job):
    out = run(job, "--ray.num_cpus", "-3")
    assert out.returncode != 0
    err = out.stderr + out.stdout
    assert "ray.num_cpus" in err and "must be positive" in err
    assert "Started a local Ray instance" not in err


# Arguments each job needs to get past its required fields.
REQUIRED = {
    "demo.py": [],
    "finetune.py": [],
    "pretrain.py": [],
    "fit_tokenizer.py": ["--input", "runs/demo-data/images", "--output", "cb.safetensors"],
    "label.py": ["--input", "photos", "--output", "labels", "--checkpoint", "ft"],
    "serve.py": ["--checkpoint", "ft"],
    "tokenize_shards.py": ["--input", "photos", "--output", "shards"],
}


def test_every_job_is_listed_for_dry_run():
    assert set(REQUIRED) == set(JOBS) | {"demo.py"}


@pytest.mark.parametrize("job", sorted(REQUIRED))
def test_dry_run_prints_the_plan_and_starts_nothing(job):
    out = run(job, *REQUIRED[job], "--dry-run")
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines and lines[0].startswith("plan: ")
    text = out.stdout
    for part in ("  input ", "  asks ", "  cluster ", "  outputs ") if job != "serve.py" else ():
        assert part in text, (part, text)
    if job in ("pretrain.py", "finetune.py", "demo.py"):
        assert "  model " in text and "parameters" in text and "global batch" in text
    assert "Started a local Ray" not in out.stderr + text and "log: " not in text


@pytest.mark.parametrize("job", sorted(REQUIRED))
def test_dry_run_with_a_bad_value_exits_2(job):
    # the demo takes no config fields: any is an error; the others' ray.num_cpus must be > 0
    bad = ["--optim.lr", "1e-3"] if job == "demo.py" else ["--ray.num_cpus", "-3"]
    out = run(job, *REQUIRED[job], "--dry-run", *bad)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.startswith("config error: ")
    assert ("--optim.lr" if job == "demo.py" else "ray.num_cpus: must be positive") in out.stderr
    assert "plan: " not in out.stdout


def test_demo_settings_apply_to_the_demo_data_only(tmp_path):
    from beit_ray.config import on_demo_data

    assert on_demo_data([], ("--data.source",))
    assert on_demo_data(["--run.epochs", "2"], ("--data.source",))
    assert not on_demo_data(["--data.source", "s3://b/x"], ("--data.source",))
    assert not on_demo_data(["--data.source=s3://b/x"], ("--data.source",))
    assert not on_demo_data(["--config", "c.yaml"], ("--data.source",))
    assert not on_demo_data(["--shards", "s3://b/s"], ("--data.source", "--shards"))

    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    demo = run("finetune.py", "--dry-run")
    real = run("finetune.py", "--dry-run", "--data.source", str(tmp_path))
    assert demo.returncode == real.returncode == 0, demo.stderr + real.stderr
    assert "demo settings" in demo.stdout and "peak lr 0.001," in demo.stdout
    assert "demo settings" not in real.stdout and "peak lr 0.001," not in real.stdout
    real_pt = run(
        "pretrain.py", "--dry-run", "--data.source", str(tmp_path),
        "--data.tokenizer_weights", str(tmp_path / "cb.safetensors"),
    )  # fmt: skip
    assert real_pt.returncode == 0, real_pt.stderr
    assert "demo settings" not in real_pt.stdout and "peak lr 0.001," not in real_pt.stdout
    assert "4 logical CPUs" not in real_pt.stdout  # the demo's --ray.num_cpus 4 is not applied


CONSOLE_LINES_SHORT_JOB = 40
"""A 2-step pretraining job: plan (8), stage, progress, warnings, summary (4) stay under this,
so the demo's four stages stay well under the issue's ~150 lines."""


@pytest.mark.integration
def test_a_short_job_prints_what_a_person_reads_and_logs_the_rest(tmp_path):
    out = subprocess.run(
        [
            sys.executable, os.path.join("jobs", "pretrain.py"), "--run.max_steps", "2",
            "--run.log_every", "1", "--checkpoint.storage_path", str(tmp_path),
            "--checkpoint.name", "console",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env={**os.environ, "RAY_ADDRESS": "", "BEIT_PROGRESS_EVERY_S": "3600",
             "RAY_raylet_start_wait_time_s": "300"},  # a loaded 2-core machine starts Ray slowly
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    console_lines = (out.stdout + out.stderr).splitlines()
    assert len(console_lines) < CONSOLE_LINES_SHORT_JOB, "\n".join(console_lines)
    assert any(x.startswith("step 2/2") for x in console_lines)  # the last step always shows
    assert console_lines[0].startswith("log: ") and "pretraining done at step 2" in out.stdout
    with open(tmp_path / "console" / "job.log") as f:
        log = f.read()
    assert "(TrainController pid=" in log, log[:3000]  # Ray Train's own lines
    assert "(RayTrainWorker pid=" in log, log[-3000:]  # what the workers printed
    assert "DeepSpeed" in log and "Processing zero checkpoint" in log  # DeepSpeed's lines
    assert "step 1/2" in log and "step 2/2" in log
