"""Serve /classify and /segment over HTTP with Ray Serve (autoscaled, dynamically batched).

On a cluster (prefer the Serve config there: `serve deploy cluster/serve.yaml`), or as a job:
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/serve.py \
        --checkpoint s3://models/beit-ft/ --segment_checkpoint s3://models/beit-ade/ \
        --http.host 0.0.0.0 --classify.max_replicas 4 --classify.num_gpus 1

Locally (listens on 127.0.0.1 unless --http.host says otherwise):
    python jobs/serve.py --checkpoint ./runs/ft/ [--port 8000]
    curl -s -H 'Content-Type: image/jpeg' --data-binary @cat.jpg 'http://127.0.0.1:8000/classify?top_k=3'
    curl -s -H 'Accept: image/png' -F image=@street.jpg http://127.0.0.1:8000/segment -o mask.png

A page at / takes a dropped image and shows the top classes or the mask over the image.
OpenAPI docs at /docs; GET /healthz, GET /labels. Ctrl-C (or SIGTERM) stops serving.
``python jobs/serve.py --help`` lists every option; --dry-run prints the plan and exits;
--verbose also shows Ray's and Serve's output, which otherwise goes to runs/logs/serve-<time>.log.
"""

from __future__ import annotations

import signal
import sys
import threading

from beit_ray import console, plan
from beit_ray.config import job_flags, parse_args, run_job
from beit_ray.serve.config import ServeConfig


def main(argv: list[str] | None = None) -> int:
    flags, argv = job_flags(argv)
    argv = ["--http.port" if a == "--port" else "--http.host" if a == "--host" else a for a in argv]
    cfg = parse_args(ServeConfig, argv)
    cfg.require()
    lines = plan.serve(cfg)
    if not console.begin(lines, flags, console.log_path_for("", "serve")):
        return 0

    from ray import serve

    from beit_ray.runtime import init_ray
    from beit_ray.serve.app import build_app

    init_ray(cfg.ray, cfg.storage)
    console.stage("starting Serve")
    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
    console.adopt_loggers()  # Serve's driver-side logger exists from here
    serve.run(build_app(cfg), name=cfg.name, route_prefix="/")
    url = f"http://{cfg.http.host}:{cfg.http.port}"
    console.show(f"serving on {url}: the page at {url}/ (POST /classify, /segment; docs at /docs)")

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
