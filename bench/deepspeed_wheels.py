"""A folder of wheels that brings DeepSpeed to a machine without it or a network (the lent GPU
machines: torch, transformers, numpy, packaging, tqdm; no DeepSpeed, no pip index).

DeepSpeed's own wheel is built from its source package (pure Python; its C++ ops compile on
use, and the GPU check uses none); its dependencies that such a machine lacks are downloaded at
this venv's versions, the compiled ones for CPython 3.10-3.13 on x86-64 Linux. Well under the
64 MiB a device run carries. ``bench/gpu_check.py`` unpacks the ones this interpreter can use.

    make deepspeed-wheels          # = .venv/bin/python bench/deepspeed_wheels.py --out wheels/deepspeed
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from importlib.metadata import version

PURE = ("hjson", "py-cpuinfo", "einops", "pydantic", "annotated-types", "typing-inspection")
COMPILED = ("pydantic-core", "msgpack", "psutil", "ninja")
PYTHONS = ("3.10", "3.11", "3.12", "3.13")


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-q", *args], check=True)


def build(out: str) -> int:
    """Fill ``out`` with the wheels; returns their total size in bytes."""
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    pip("wheel", "--no-deps", "-w", out, f"deepspeed=={version('deepspeed')}")
    pip("download", "--no-deps", "--only-binary=:all:", "-d", out, *_pinned(PURE))
    for py in PYTHONS:
        pip(
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--platform",
            "manylinux2014_x86_64",
            "--platform",
            "manylinux_2_17_x86_64",
            "--python-version",
            py,
            "-d",
            out,
            *_pinned(COMPILED),
        )
    return sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))


def _pinned(names: tuple[str, ...]) -> list[str]:
    return [f"{n}=={version(n)}" for n in names]


def unpack(folder: str, target: str) -> list[str]:
    """Extract the wheels in ``folder`` that this interpreter can use into ``target`` (one
    per project, the most specific tag first); returns their file names. No pip needed."""
    import zipfile

    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename

    rank = {t: i for i, t in enumerate(sys_tags())}
    best: dict[str, tuple[int, str]] = {}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".whl"):
            continue
        project, _, _, tags = parse_wheel_filename(name)
        score = min((rank[t] for t in tags if t in rank), default=None)
        if score is not None and (project not in best or score < best[project][0]):
            best[project] = (score, name)
    os.makedirs(target, exist_ok=True)
    for _, name in best.values():
        with zipfile.ZipFile(os.path.join(folder, name)) as z:
            z.extractall(target)
    return sorted(name for _, name in best.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="wheels/deepspeed")
    a = p.parse_args()
    size = build(a.out)
    print(f"{len(os.listdir(a.out))} wheels, {size / 2**20:.1f} MiB in {a.out}")


if __name__ == "__main__":
    main()
