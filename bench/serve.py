"""Serving throughput and latency: dynamic batching on vs off, same replicas, one run.

    .venv/bin/python bench/serve.py [--flavour base] [--seconds 20] [--clients 16] [--dtype bfloat16]

Phase 1 and 2: one Classifier replica (min = max = 1), 16 concurrent HTTP clients posting
JPEGs to /classify for ``--seconds``; max_batch_size 16 vs 1 (off). Phase 3: autoscaling
1 → ``--max-replicas`` under the same load; reports how many replicas Serve reached.
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import threading
import time

import httpx
import numpy as np
import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(url: str, bodies: list[bytes], seconds: float, clients: int) -> dict[str, float]:
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def worker(i: int) -> None:
        with httpx.Client(timeout=120) as client:
            n = i
            while time.monotonic() < end:
                t = time.perf_counter()
                r = client.post(
                    url, content=bodies[n % len(bodies)], headers={"Content-Type": "image/jpeg"}
                )
                with lock:
                    if r.status_code == 200:
                        lat.append(time.perf_counter() - t)
                    else:
                        errors[0] += 1
                n += 1

    start = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    a = np.array(lat) * 1000
    return {
        "rps": len(lat) / wall,
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "ok": len(lat),
        "errors": errors[0],
    }


def replicas(name: str) -> int:
    from ray import serve

    status = serve.status().applications["beit"].deployments[name]
    return int(status.replica_states.get("RUNNING", 0))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flavour", default="base")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-replicas", type=int, default=2)
    ap.add_argument("--dtype", default="float32", help="replicas' model dtype (classify.dtype)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray import serve

    from beit_ray.config import RayConfig, parse_args
    from beit_ray.models.build import build_model
    from beit_ray.models.load import export_hf
    from beit_ray.runtime import init_ray
    from beit_ray.serve.app import build_app
    from beit_ray.serve.config import ServeConfig

    sys_path = os.path.join(os.path.dirname(__file__), "..", "tests")
    import sys

    sys.path.insert(0, sys_path)
    from conftest import jpeg_bytes
    from skimage import data

    root = tempfile.mkdtemp(prefix="bench_serve_")
    torch.manual_seed(0)
    ckpt = os.path.join(root, "ckpt")
    export_hf(build_model(args.flavour, "classification", num_labels=1000), ckpt)
    bodies = [
        jpeg_bytes(np.ascontiguousarray(getattr(data, n)()[..., :3]))
        for n in ("astronaut", "chelsea", "coffee", "rocket")
    ]
    cores = os.cpu_count() or 1
    init_ray(RayConfig(num_cpus=4))  # as jobs/serve.py starts it
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/classify"

    def deploy(batch: int, max_replicas: int) -> None:
        cfg = parse_args(
            ServeConfig,
            [
                "--checkpoint", ckpt, "--batching.max_batch_size", str(batch),
                "--classify.min_replicas", "1", "--classify.max_replicas", str(max_replicas),
                "--classify.num_cpus", "1", "--classify.threads", str(max(1, cores // max_replicas)),
                "--classify.upscale_delay_s", "2", "--classify.target_ongoing_requests", "4",
                "--ingress_cpus", "0.5", "--classify.dtype", args.dtype,
            ],
        )  # fmt: skip
        serve.run(build_app(cfg), name="beit", route_prefix="/")
        httpx.post(
            url, content=bodies[0], headers={"Content-Type": "image/jpeg"}, timeout=120
        )  # warm-up

    print(
        f"{args.flavour} checkpoint, {cores} cores, {args.clients} clients x {args.seconds:.0f} s"
    )
    deploy(16, 1)
    on = load(url, bodies, args.seconds, args.clients)
    print(
        f"batching on (max 16), 1 replica:  {on['rps']:.2f} req/s, p50 {on['p50_ms']:.0f} ms, p99 {on['p99_ms']:.0f} ms, errors {on['errors']}"
    )
    serve.delete("beit")
    deploy(1, 1)
    off = load(url, bodies, args.seconds, args.clients)
    print(
        f"batching off (max 1), 1 replica:  {off['rps']:.2f} req/s, p50 {off['p50_ms']:.0f} ms, p99 {off['p99_ms']:.0f} ms, errors {off['errors']}"
    )
    print(f"throughput ratio on/off: {on['rps'] / off['rps']:.2f}x")
    serve.delete("beit")
    deploy(16, args.max_replicas)
    peak = [1]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], replicas("Classifier"))
            time.sleep(0.5)

    watcher = threading.Thread(target=watch)
    watcher.start()
    auto = load(url, bodies, max(args.seconds, 30), args.clients)
    stop.set()
    watcher.join()
    print(
        f"autoscaling 1→{args.max_replicas}: reached {peak[0]} replicas; {auto['rps']:.2f} req/s, p50 {auto['p50_ms']:.0f} ms, p99 {auto['p99_ms']:.0f} ms"
    )
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
