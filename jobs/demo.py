"""The whole pipeline end to end on a small local dataset: pretrain → fine-tune → label → serve.

    make demo                 # installs into .venv, then runs this
    python jobs/demo.py       # the same, with the venv active

Everything is local: a Ray started here on loopback, outputs under ./runs, images cut from
the photos scikit-image ships (8 classes). Debug-sized models, a few minutes on 2 CPU cores.
A rerun starts fresh runs (their names carry the time). On a cluster, run the stages as
their own jobs instead (see each job's docstring and the README's "Scale out").
--dry-run prints the plan of each stage and exits; Ray's, DeepSpeed's and Serve's own output
goes to runs/demo-<time>.log (--verbose shows it on the console too). --serve-seconds N keeps
the served model (and its page at /) up N seconds after the demo's own request.

It ends on what a person can check: the served image is one fine-tuning held out, shown with
its true class beside the prediction, and the run's val top-1.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time

from beit_ray import console, plan
from beit_ray.config import ConfigError, RayConfig, job_flags, parse_args, run_job
from beit_ray.runtime import check_training, init_ray


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_smoke(checkpoint: str, image_path: str, serve_seconds: float = 0.0) -> dict:
    """Deploy /classify on loopback, ask it about one image, keep serving ``serve_seconds``
    (the page at / can be opened meanwhile), shut down; returns the answer."""
    import httpx
    from ray import serve

    from beit_ray.serve.app import build_app
    from beit_ray.serve.config import ServeConfig

    cfg = parse_args(ServeConfig, ["--checkpoint", checkpoint, "--http.port", str(free_port())])
    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
    console.adopt_loggers()  # Serve's driver-side logger exists from here
    serve.run(build_app(cfg), name=cfg.name, route_prefix="/")
    url = f"http://{cfg.http.host}:{cfg.http.port}"
    try:
        with open(image_path, "rb") as f:
            body = f.read()
        answer = httpx.post(
            f"{url}/classify?top_k=3",
            content=body,
            headers={"Content-Type": "image/jpeg"},
            timeout=60,
        )
        answer.raise_for_status()
        if serve_seconds > 0:
            console.show(f"  the page is at {url}/ for {serve_seconds:.0f} s (Ctrl-C ends it)")
            with contextlib.suppress(KeyboardInterrupt):
                time.sleep(serve_seconds)
        return answer.json()
    finally:
        serve.shutdown()


def held_out(images: str, cls: str, val_fraction: float, seed: int) -> list[str]:
    """``cls``'s images in fine-tuning's validation split (the same key hash it used)."""
    from beit_ray.data.listing import in_val_split

    names = sorted(os.listdir(os.path.join(images, cls)))
    return [n for n in names if in_val_split(f"{cls}/{n}", val_fraction, seed)]


def _serve_seconds(argv: list[str]) -> tuple[float, list[str]]:
    if "--serve-seconds" not in argv:
        return 0.0, argv
    i = argv.index("--serve-seconds")
    try:
        seconds = float(argv[i + 1])
    except (IndexError, ValueError):
        raise ConfigError("--serve-seconds: give a number of seconds") from None
    return seconds, argv[:i] + argv[i + 2 :]


def main(argv: list[str] | None = None) -> int:
    from beit_ray.infer.config import LabelConfig
    from beit_ray.infer.label import label
    from beit_ray.models.flavours import get_flavour
    from beit_ray.train.config import FinetuneConfig, PretrainConfig
    from beit_ray.train.demo_data import demo_argv, ensure_demo_data
    from beit_ray.train.trainer import run_finetuning, run_pretraining, run_uri

    flags, argv = job_flags(argv)
    serve_seconds, argv = _serve_seconds(argv)
    if argv:
        raise ConfigError(
            f"{argv[0]}: the demo takes only --dry-run, --verbose and --serve-seconds N"
        )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    pre_args = [
        "--ray.num_cpus", "4",
        "--optim.lr", "1e-3",
        "--run.epochs", "4",
        "--run.log_every", "8",
        "--checkpoint.name", f"demo-pretrain-{stamp}",
    ]  # fmt: skip
    # The demo images and their codebook under the run storage (./runs/demo-data), as in the
    # jobs' embedded default
    pre_cfg = parse_args(PretrainConfig, demo_argv(PretrainConfig, pre_args, []))
    images = pre_cfg.data.source
    ft_cfg = parse_args(
        FinetuneConfig,
        [
            "--ray.num_cpus", "4",
            "--model.init_from", os.path.join(run_uri(pre_cfg), "model"),
            "--data.source", images,
            "--optim.lr", "2e-3",
            # 12 epochs: val top-1 0.78 (14 of 18 held-out images); 4 epochs stopped at 0.44,
            # and the served held-out cat was called "coffee"
            "--run.epochs", "12",
            # ImageNet-strength RandAugment / random erasing need more than 4 epochs of 256 images
            "--data.rand_augment", "", "--optim.reprob", "0",
            "--checkpoint.name", f"demo-finetune-{stamp}",
        ],
    )  # fmt: skip
    labels_uri = os.path.abspath(os.path.join("runs", f"demo-labels-{stamp}"))
    lines = [
        *plan.pretrain(pre_cfg, demo=True),
        *plan.finetune(ft_cfg, demo=True),
        f"plan: labelling every demo image into {labels_uri}, then serving /classify on loopback",
    ]
    if not console.begin(lines, flags, os.path.join("runs", f"demo-{stamp}.log")):
        return 0
    init_ray(RayConfig(num_cpus=4))
    check_training(pre_cfg)  # every cluster and output check, before any work
    check_training(ft_cfg)

    console.stage("== 1/4 pretraining (masked image modelling, ZeRO-2, 2 workers)")
    ensure_demo_data(pre_cfg.data, get_flavour(pre_cfg.model.flavour).vocab_size, pre_cfg.storage)
    with console.capture_output():  # DeepSpeed's and transformers' prints go to the log
        pre = run_pretraining(pre_cfg)

    console.stage("== 2/4 fine-tuning (classification from the pretrained encoder)")
    with console.capture_output():
        ft = run_finetuning(ft_cfg)

    console.stage("== 3/4 batch labelling every demo image with the fine-tuned model")
    summary = label(
        LabelConfig(input=images, output=labels_uri, checkpoint=ft.model_uri, task="classify")
    )

    console.stage("== 4/4 serving /classify on loopback (one request, then shut down)")
    val_fraction, seed = ft_cfg.val_fraction, ft_cfg.data.seed
    example = held_out(images, "chelsea", val_fraction, seed)[0]  # never trained on
    with console.capture_output():
        answer = serve_smoke(ft.model_uri, os.path.join(images, "chelsea", example), serve_seconds)

    top = answer["predictions"][0]
    verdict = "right" if top["label"] == "chelsea" else "wrong"
    n_val = sum(len(held_out(images, c, val_fraction, seed)) for c in sorted(os.listdir(images)))
    top1 = ft.metrics.get("top1")
    val = f"val top-1 {top1:.3f} on {n_val} held-out images" if top1 is not None else "see logs"
    preview = summary.get("preview") or "no preview"
    for line in (
        "",
        "demo finished; outputs:",
        f"  pretraining run   {pre.run_uri}  (logs: {pre.logs_uri}, HF export: {pre.model_uri})",
        f"  fine-tuning run   {ft.run_uri}  ({val}, 8 classes: chance 0.125)",
        f"  fine-tuned model  {ft.model_uri}  (loads with transformers' from_pretrained)",
        f"  labels            {labels_uri}  ({summary.get('files')} files, {summary.get('errors')} errors)",
        f"  labels preview    {preview}  (open in a browser)",
        f"  served /classify  chelsea/{example}, held out, true class chelsea → "
        f"{top['label']} ({top['score']:.2f}): {verdict}",
        f"  the page          python jobs/serve.py --checkpoint {ft.model_uri} "
        "→ http://127.0.0.1:8000/  (or rerun the demo with --serve-seconds 600)",
        f"  log               {console.log_file()}",
    ):
        console.show(line)
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
