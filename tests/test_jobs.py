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
