"""Shared fixtures: one moto S3 server and one Ray per test session, real photos, tiny models.

Integration tests run real services on loopback: moto's S3 server over HTTP (never a mock)
and a local Ray. Starting Ray costs seconds and ``fit()`` ~30 s here, so one Ray is shared.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


MOTO: list[Any] = []  # the session's ThreadedMotoServer


@pytest.fixture(scope="session", autouse=True)
def own_ninja() -> None:
    """Engines built in this process (and the ranks it spawns, and the Ray it starts) load
    DeepSpeed's ops with the ninja `make install` prebuilt them with, not the system's: another
    ninja version reads the build log as "command line changed" and rebuilds (minutes)."""
    from beit_ray.train.ops import use_own_ninja

    use_own_ninja()


@pytest.fixture(scope="session")
def s3_server():
    """moto's real S3 server on 127.0.0.1; sets AWS_* so every layer (and Ray workers) uses it.

    Yields the endpoint URL. Ray must start after this fixture for workers to inherit the env.
    """
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    MOTO.append(server)  # tests that count requests wrap its WSGI app
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture()
def s3_bucket(s3_server, request):
    """A fresh, empty bucket on the moto server; yields its name."""
    import boto3

    name = "t-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[
        :40
    ].strip("-")
    name = name + "-" + os.urandom(3).hex()
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray for the whole session, on loopback, with 4 logical CPUs.

    Four logical CPUs on a 2-core machine leave Ray Data room beside train workers and actor
    pools (it hangs silently when they hold every CPU).
    """
    import ray

    from beit_ray import storage

    if not ray.is_initialized():
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            _temp_dir=tempfile.mkdtemp(prefix="ray_", dir="/tmp"),
            runtime_env={"env_vars": {**storage.worker_env(), "RAY_AUTH_MODE": "disabled"}},
            configure_logging=False,
        )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """Real photos shipped with scikit-image, as RGB uint8 arrays."""
    from beit_ray.train.demo_data import load_photo

    out = {}
    for name in (
        "astronaut",
        "chelsea",
        "coffee",
        "rocket",
        "hubble_deep_field",
        "immunohistochemistry",
    ):
        out[name] = load_photo(name)
    return out


def jpeg_bytes(img: np.ndarray, quality: int = 90) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """An uncompressed tar of (name, bytes) members, in that order."""
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_child(args: list[str], env: dict[str, str] | None = None, timeout: int = 600) -> Any:
    """Run ``python *args`` from the repo root (for work that must not share this process:
    a process group, a second Ray); return the JSON of its last ``RESULT <json>`` line."""
    proc = subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


@contextlib.contextmanager
def moto_requests(fail: Any = None) -> Iterator[Counter[str]]:
    """Count the GETs the moto server answers, from every process (Ray workers included), and
    their bytes, per path suffix and per folder: ``got["GET .tar"]``, ``got["bytes .tar"]``,
    ``got["GET /bucket/pq"]``, ``got["GET"]``.
    ``fail(method, path, n)``, given the path's n-th request (from 1), may answer it with S3's
    503 SlowDown instead (throttling). The server's WSGI app is wrapped meanwhile."""
    server, got, lock = MOTO[0]._server, Counter(), threading.Lock()
    app, tries = server.app, Counter()

    def wrapped(environ: dict, start_response: Any) -> list[bytes]:
        method, path = environ["REQUEST_METHOD"], environ["PATH_INFO"]
        with lock:
            tries[method, path] += 1
            n = tries[method, path]
        if fail is not None and fail(method, path, n):
            with lock:
                got["throttled"] += 1
            start_response("503 Slow Down", [("Content-Type", "application/xml")])
            return [SLOW_DOWN]
        body = list(app(environ, start_response))
        if method == "GET":
            suffix, folder = os.path.splitext(path)[1], os.path.dirname(path)
            size = sum(len(b) for b in body)
            with lock:
                got["GET"] += 1
                got[f"GET {suffix}"] += 1
                got[f"bytes {suffix}"] += size
                got[f"GET {folder}"] += 1
                got[f"bytes {folder}"] += size
        return body

    server.app = wrapped
    try:
        yield got
    finally:
        server.app = app


SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>t</RequestId></Error>"
)


# Debian's chromium with the flags that keep it off the network (none here) and out of any
# profile but its own; selenium finds no driver by itself offline, so it is given chromedriver.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1200,900",
)


@pytest.fixture()
def browser(tmp_path_factory):
    """A headless Chromium driven by selenium; skips only where no chromium is installed
    (CI installs it: .ci/run)."""
    import shutil

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not binary or not driver_path:
        pytest.skip("no chromium / chromedriver (apt-get install chromium chromium-driver)")
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium')}")
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(driver_path))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_for(driver: Any, script: str, timeout: float = 60.0) -> Any:
    """Poll a JS expression in the page until it is truthy; returns its value."""
    import time

    end = time.monotonic() + timeout
    while True:
        value = driver.execute_script(f"return ({script});")
        if value:
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"page never satisfied {script!r}; last value {value!r}")
        time.sleep(0.1)
