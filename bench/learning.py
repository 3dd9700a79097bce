"""Does the training pipeline learn as well as a plain torch loop, and does pretraining pay?

    .venv/bin/python bench/learning.py --epochs 10 --seeds 3 --out /tmp/learning

Data: scikit-learn's digits (1,797 real 8×8 images, 10 classes) upsampled to 32 px, gray →
RGB, split stratified 1,400 / 397 and written as class folders of PNGs (bench/_digits.py).

1. Reference loop, same run: the ``debug`` flavour from scratch (built by beit_ray.models,
   10 labels) trained by ``jobs/finetune.py`` (child process) and by a plain torch loop with
   the hyper-parameters the job resolves from the same flags (peak lr, AdamW betas/eps, weight
   decay and its exclusions, warmup + cosine to min lr, clipping, label smoothing, drop path,
   layer decay 1.0, global batch): shuffled batches every epoch, the job's train view (whole
   image: crop scale and ratio 1, no RandAugment, colour jitter, mixup, cutmix or erasing,
   horizontal flip with probability ``--flip``, passed to the job as ``data.flip`` and read
   back from the resolved config by the loop) and the exported model's view at eval (the
   image as is). Reported: both top-1s at equal epochs and their ratio (goal ≥ 0.98), then
   ``jobs/label.py`` over the val folder with the exported model: its top-1 next to the run's
   eval top-1 (goal: within 0.5 points).
2. Pretraining pays: a codebook tokenizer (jobs/fit_tokenizer.py) and MIM pretraining
   (jobs/pretrain.py) on the 1,400 train images without labels, then fine-tuning on 10% of the
   labels (140 images) from that checkpoint vs from scratch, same budget, ``--seeds`` seeds:
   pretrained − scratch (mean, spread). Fine-tuning runs in the plain loop (seconds each;
   isolates the representation from the pipeline) and, with ``--few-job``, through the job
   (2 × ``--seeds`` jobs, ~2–5 min each here). ``--pretrained <run>`` reuses a pretraining
   run; a ``codebook.safetensors`` already in ``--out`` is reused, not refitted. What moves
   it: ``--mask-patches`` (of 16), ``--vocab`` (codebook size), ``--pt-epochs``. Pretraining
   flips at data.flip's default (0.5); ``--flip`` is the fine-tuning side's.

``--replay`` (with ``--few-job``): the fixed-order comparison. Each job run records what it
trains on (``--debug.record_rows``, every step logged); the plain loop then trains on exactly
those steps (the job's images, order, split between workers and flips, mapped through the
library's own plan and flip draw) from the same weights. Reported: both top-1s, and how far the
loop's per-step loss and gradient norm are from the job's logged ones.

``--dataset patches``: the same on a set the recipe was never tuned on (bench/_patches.py:
32 px patches of 10 scikit-image photos, class = photo, 1,400 / 400, train and val cut from
disjoint parts of each photo).

Each job starts its own local Ray (~30 s on 2 cores). Never run by the test suite.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _digits import load_folder, write_digits  # noqa: E402
from _patches import write_patches  # noqa: E402
from _replay import job_order, loop_epoch, print_order_stats  # noqa: E402

ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TORCH_EXTENSIONS_DIR": os.path.join(ROOT, ".venv", "torch_extensions"),
}


# ----------------------------------------------------------------------------- the jobs


def run_child(script: str, args: list[str], log: str, tries: int = 3) -> float:
    """Run ``jobs/<script>`` with ``args`` (output to ``log``); seconds taken. Raises on failure.
    A local Ray that times out starting (an overloaded shared machine) is retried."""
    env = {**ENV, **os.environ}
    for attempt in range(tries):
        t0 = time.perf_counter()
        with open(log, "w") as f:
            rc = subprocess.call(
                [sys.executable, os.path.join(ROOT, "jobs", script), *args],
                cwd=ROOT,
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
            )
        secs = time.perf_counter() - t0
        if rc == 0:
            return secs
        with open(log) as f:
            tail = f.read()[-3000:]
        if "timed out during startup" not in tail or attempt == tries - 1:
            raise RuntimeError(f"jobs/{script} exited {rc} after {secs:.0f} s; log {log}:\n{tail}")
        print(f"  jobs/{script}: Ray timed out starting; retrying", flush=True)
    raise AssertionError("unreachable")


def data_fields() -> set[str]:
    from beit_ray.data.config import DataConfig

    return {f.name for f in dataclasses.fields(DataConfig)}


def finetune_args(
    a: argparse.Namespace, train: str, val: str, runs: str, name: str, seed: int, epochs: int
) -> list[str]:
    """The job's flags: whole-image training view, no extra augmentation, the bench's recipe."""
    args = [
        "--ray.num_cpus", "4", "--data.source", train, "--val_source", val,
        "--checkpoint.storage_path", runs, "--checkpoint.name", name,
        "--run.epochs", str(epochs), "--run.seed", str(seed), "--run.log_every", "20",
        "--optim.lr", str(a.lr), "--optim.layer_decay", "1.0",
        "--deepspeed.micro_batch_size", str(a.micro_batch), "--scaling.num_workers", str(a.workers),
        "--data.crop_scale", "1,1", "--data.crop_ratio", "1,1", "--data.rand_augment", "",
        "--data.color_jitter", "0", "--optim.mixup", "0", "--optim.cutmix", "0",
        "--optim.reprob", "0",
    ]  # fmt: skip
    fields = data_fields()
    if "crop_pct" in fields:  # the eval view: the whole image, as the reference evaluates
        args += ["--data.crop_pct", str(a.crop_pct)]
    else:
        print("  note: the job has no data.crop_pct: it evaluates at 0.875 (resize + centre crop)")
    if "flip" in fields:
        args += ["--data.flip", str(a.flip)]
    elif a.flip != 0.5:
        raise SystemExit(f"--flip {a.flip}: the job has no data.flip (it always flips at p 0.5)")
    return args


def resolved(args: list[str]):  # noqa: ANN201 - FinetuneConfig
    """The FinetuneConfig the job builds from ``args`` (its hyper-parameters for the reference)."""
    from beit_ray.config import parse_args
    from beit_ray.train.config import FinetuneConfig

    return parse_args(FinetuneConfig, args)


def eval_records(run: str) -> list[dict]:
    path = os.path.join(run, "logs", "metrics.jsonl")
    with open(path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return [r for r in recs if r.get("kind") == "eval"]


def label_top1(a: argparse.Namespace, run: str, val: str, out: str) -> tuple[float, float]:
    """(top-1 of jobs/label.py's predictions over ``val`` with ``run``'s model, seconds)."""
    from beit_ray.infer.parts import read_parts

    secs = run_child(
        "label.py",
        [
            "--input",
            val,
            "--output",
            out,
            "--checkpoint",
            run,
            "--task",
            "classify",
            "--predict.top_k",
            "1",
            "--ray.num_cpus",
            "4",
            "--actors.max_actors",
            "1",
        ],  # fmt: skip
        out + ".log",
    )
    rows = read_parts(out).to_pylist()
    ok = [r for r in rows if not r["error"]]
    if len(ok) != len(rows) or not rows:
        raise RuntimeError(f"label: {len(rows) - len(ok)} error rows of {len(rows)} in {out}")
    hits = sum(r["top_labels"][0] == os.path.basename(os.path.dirname(r["path"])) for r in ok)
    return hits / len(ok), secs


# ----------------------------------------------------------------------------- the reference


def schedule(cfg):  # noqa: ANN001, ANN201 - (step, total) -> lr
    """The job's lr schedule for ``cfg`` (its warmup length and decay depend on the task's
    recipe), so both sides follow the same curve; the loop around it is ours."""
    try:
        from beit_ray.train.schedule import lr_at
    except ImportError:  # before the schedule had its own module
        from beit_ray.train.loop import lr_at
    return lambda step, total: lr_at(step, total, cfg)


def reference(cfg, train: str, val: str, epochs: int, seed: int, init_from: str | None = None,  # noqa: ANN001, ANN201
              replay: list | None = None):  # fmt: skip
    """Plain torch loop with ``cfg``'s model and recipe: {top1, top1_job_view, secs, curve,
    losses, norms}. ``replay`` (:func:`job_order`): train on the job's steps instead of the
    loop's own permutation and flips: each step's images, in the job's order, with its flips."""
    from beit_ray.models.build import build_model
    from beit_ray.models.load import load_model

    torch.set_num_threads(1)  # a tiny model on a shared machine: more threads only contend
    x, y, names = load_folder(train)  # [N, 3, H, W] uint8
    xv, yv, _ = load_folder(val)
    id2label = dict(enumerate(names))
    o, batch = cfg.optim, cfg.global_batch
    torch.manual_seed(seed)
    if init_from:
        model = load_model(init_from, "classification", num_labels=len(names), id2label=id2label,
                           image_size=x.shape[-1], seed=seed)  # fmt: skip
    else:
        model = build_model(cfg.model.flavour, "classification", image_size=x.shape[-1],
                            num_labels=len(names), id2label=id2label,
                            **({"drop_path": cfg.model.drop_path} if cfg.model.drop_path is not None else {}))  # fmt: skip
        with torch.no_grad():  # unilm --init_scale 0.001 on a new head, as the job
            for p in model.classifier.parameters():
                p.mul_(1e-3)
    model.train()
    no_wd = ("token", "position_embeddings", "relative_position_bias_table")
    decay = [
        p for n, p in model.named_parameters() if p.ndim > 1 and not any(k in n for k in no_wd)
    ]
    rest = [
        p
        for n, p in model.named_parameters()
        if not (p.ndim > 1 and not any(k in n for k in no_wd))
    ]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=cfg.peak_lr, betas=o.betas, eps=o.eps)  # fmt: skip
    steps_per_epoch = len(x) // batch
    total = epochs * steps_per_epoch
    lr_at = schedule(cfg)
    gen = torch.Generator().manual_seed(seed)
    norm = lambda u: (u.float() / 255 - 0.5) / 0.5  # noqa: E731 - BEiT's mean/std 0.5
    p_flip = getattr(cfg.data, "flip", 0.5)  # the job's own flip probability

    if replay is not None:
        total = len(replay)
        by_epoch = [[(torch.tensor(i), torch.tensor(f)) for e2, i, f in replay if e2 == e]
                    for e in range(epochs)]  # fmt: skip
    t0, step, curve, losses, norms = time.perf_counter(), 0, [], [], []
    for e in range(epochs):
        own = by_epoch[e] if replay is not None else loop_epoch(gen, len(x), batch, p_flip)
        for i, flip in own:
            xb = x[i].clone()
            xb[flip] = xb[flip].flip(-1)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total)
            per = F.cross_entropy(model(pixel_values=norm(xb)).logits, y[i],
                                  label_smoothing=o.label_smoothing, reduction="none")  # fmt: skip
            loss = per.mean()
            opt.zero_grad()
            loss.backward()
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            norms.append(torch.nn.utils.get_total_norm(grads).item())
            losses.append(per[: len(i) // cfg.scaling.num_workers].mean().item())  # rank 0's part
            if o.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad)
            opt.step()
            step += 1
        curve.append(accuracy(model, norm(xv), yv))
        print(f"  reference seed {seed} epoch {len(curve)}: val top-1 {curve[-1]:.4f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    secs = time.perf_counter() - t0
    return {"top1": curve[-1], "top1_job_view": job_view_top1(model, val, cfg),
            "secs": secs, "curve": curve, "losses": losses, "norms": norms}  # fmt: skip


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:  # noqa: ANN001
    model.eval()
    pred = torch.cat(
        [model(pixel_values=x[i : i + 256]).logits.argmax(-1) for i in range(0, len(x), 256)]
    )
    model.train()
    return (pred == y).float().mean().item()


def job_view_top1(model, val: str, cfg) -> float | None:  # noqa: ANN001
    """Top-1 of ``model`` on the job's own eval transform of the val images (None if unusable)."""
    try:
        from beit_ray.data.augment import ClassifyTransform, normalize
    except ImportError:
        return None
    _, yv, names = load_folder(val)
    files = [f for n in names for f in sorted(glob.glob(os.path.join(val, n, "*")))]
    try:
        t = ClassifyTransform(image_size=cfg.data.image_size, train=False)
        xs = []
        for f in files:
            with open(f, "rb") as fh:
                xs.append(t(fh.read(), os.path.relpath(f, val)))
    except Exception:  # noqa: BLE001 - the transform's signature is not ours to pin
        return None
    x = torch.from_numpy(normalize(__import__("numpy").stack(xs)))
    return accuracy(model, x, yv)


# ----------------------------------------------------------------------------- pretraining


def pretrain(a: argparse.Namespace, train: str, out: str) -> tuple[str, float]:
    """Fit a codebook and pretrain the debug flavour on ``train`` (labels unused): (run, secs)."""
    book = os.path.join(out, "codebook.safetensors")
    size, patch, vocab = 32, 8, a.vocab
    secs = (
        0.0
        if os.path.exists(book)
        else run_child(
            "fit_tokenizer.py",
            [
                "--input",
                train,
                "--output",
                book,
                "--ray.num_cpus",
                "4",
                "--data.image_size",
                str(size),
                "--data.patch_size",
                str(patch),
                "--data.tokenizer_image_size",
                str(size),
                "--codebook.vocab_size",
                str(vocab),
                "--codebook.sample_images",
                "1400",
            ],  # fmt: skip
            os.path.join(out, "fit_tokenizer.log"),
        )
    )
    args = [
        "--ray.num_cpus", "4", "--data.source", train, "--data.tokenizer", "codebook",
        "--data.tokenizer_weights", book, "--data.tokenizer_image_size", str(size),
        "--model.vocab_size", str(vocab), "--run.epochs", str(a.pt_epochs), "--run.log_every", "20",
        "--optim.lr", str(a.pt_lr), "--deepspeed.micro_batch_size", "16",
        "--data.crop_scale", a.pt_crop_scale, "--data.color_jitter", "0",
        "--checkpoint.storage_path", os.path.join(out, "runs"), "--checkpoint.name", "pretrain",
        "--checkpoint.every_n_steps", "0",
        "--run.seed", str(a.pt_seed), "--data.seed", str(a.pt_seed),
    ]  # fmt: skip
    if a.mask_patches:
        args += ["--data.num_masking_patches", str(a.mask_patches)]
    # the codebook's tokenizer view is the patch view: 32 px at patch 8 (grid 4)
    args += ["--data.image_size", str(size), "--data.patch_size", str(patch)]
    secs += run_child("pretrain.py", args, os.path.join(out, "pretrain.log"))
    return os.path.join(out, "runs", "pretrain"), secs


# ----------------------------------------------------------------------------- main


def spread(v: list[float]) -> str:
    v = [x for x in v if x == x]  # NaN: an arm not run
    if not v:
        return "— (not run)"
    m = statistics.mean(v)
    s = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{m:.4f} ± {s:.4f} (n={len(v)}, min {min(v):.4f}, max {max(v):.4f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs (job and reference)")
    p.add_argument("--seeds", type=int, default=3, help="reference and few-label seeds")
    p.add_argument("--first-seed", type=int, default=0, help="few-label seeds start here")
    p.add_argument("--job-seeds", type=int, default=1, help="full-data job runs (seeds 0..n-1)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--flip", type=float, default=0.5, help="flip probability (both sides)")
    p.add_argument(
        "--crop-pct", type=float, default=1.0, help="job's eval crop (data.crop_pct, if a field)"
    )
    p.add_argument("--skip-job", action="store_true", help="reference loop only")
    p.add_argument("--skip-label", action="store_true")
    p.add_argument("--skip-pretrain", action="store_true")
    p.add_argument("--skip-compare", action="store_true", help="skip part 1 (reference vs job)")
    p.add_argument("--pt-epochs", type=int, default=20)
    p.add_argument("--pt-lr", type=float, default=1e-3)
    p.add_argument("--pt-crop-scale", default="0.5,1")
    p.add_argument(
        "--pt-seed", type=int, default=0, help="pretraining seed (init, order, crops, masks)"
    )
    p.add_argument("--mask-patches", type=int, default=0, help="of 16; 0: the default (6)")
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--few-epochs", type=int, default=30)
    p.add_argument("--few-micro-batch", type=int, default=8)
    p.add_argument("--few-job", action="store_true", help="also fine-tune few-label via the job")
    p.add_argument(
        "--few-job-arms", default="scratch,pt", help="the job's few-label arms: scratch, pt or both"
    )
    p.add_argument("--few-plain-arms", default="scratch,pt", help="the plain loop's few-label arms")
    p.add_argument("--pretrained", default=None, help="reuse this pretraining run")
    p.add_argument(
        "--replay",
        action="store_true",
        help="with --few-job: the job records what it trains on (debug.record_rows) and the "
        "plain loop replays those steps from the same weights (the fixed-order comparison)",
    )
    p.add_argument("--out", default=None, help="work folder (kept); default: a temp dir")
    p.add_argument(
        "--dataset",
        default="digits",
        choices=("digits", "patches"),
        help="digits (the set the recipe was tuned on) or patches of 10 scikit-image photos",
    )
    p.add_argument(
        "--order-stats",
        metavar="OUT",
        default=None,
        help="print how random the job orders recorded by a --replay run in OUT are, next to "
        "the plain loop's permutations (no training)",
    )
    a = p.parse_args()
    if a.order_stats:
        return print_order_stats(a.order_stats)
    out = os.path.abspath(a.out or tempfile.mkdtemp(prefix="learning_"))
    os.makedirs(out, exist_ok=True)
    write = write_digits if a.dataset == "digits" else write_patches
    dirs = write(os.path.join(out, a.dataset))
    runs = os.path.join(out, "runs")
    res: dict = {"args": vars(a)}
    rows: list[tuple[str, str]] = []
    sizes = {k: sum(len(f) for _, _, f in os.walk(v)) for k, v in dirs.items()}
    print(f"work folder {out}; {a.dataset} {sizes}", flush=True)

    # 1. reference vs job, same flags, same epochs
    if not a.skip_compare:
        compare(a, dirs, runs, out, res, rows)
    # 2. pretraining pays?
    if not a.skip_pretrain:
        pays(a, dirs, runs, out, res, rows)
    width = max(len(k) for k, _ in rows)
    print("\n| measurement | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |")
    with open(os.path.join(out, "learning.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"\nresults: {os.path.join(out, 'learning.json')}")


def compare(a: argparse.Namespace, dirs: dict, runs: str, out: str, res: dict, rows: list) -> None:
    """Part 1: the plain loop and the job on the same data, flags and epochs; then label.py."""
    base = finetune_args(a, dirs["train"], dirs["val"], runs, "ft-s0", 0, a.epochs)
    cfg = resolved(base)
    print(f"recipe: peak lr {cfg.peak_lr:g}, global batch {cfg.global_batch}, betas {cfg.optim.betas}, "
          f"wd {cfg.optim.weight_decay}, min lr {cfg.optim.min_lr}, clip {cfg.optim.clip_grad}, "
          f"label smoothing {cfg.optim.label_smoothing}, drop path {cfg.model.drop_path}", flush=True)  # fmt: skip
    refs = [reference(cfg, dirs["train"], dirs["val"], a.epochs, s) for s in range(a.seeds)]
    res["reference"] = refs
    ref_top1 = [r["top1"] for r in refs]
    rows.append(("reference loop top-1", spread(ref_top1)))
    jv = [r["top1_job_view"] for r in refs if r["top1_job_view"] is not None]
    if jv:
        rows.append(("reference loop top-1, job's eval transform", spread(jv)))
    rows.append(("reference loop seconds", spread([r["secs"] for r in refs])))
    print(f"RESULT reference_top1 {statistics.mean(ref_top1):.4f}", flush=True)
    if not a.skip_job:
        jobs = []
        for s in range(a.job_seeds):
            name = f"ft-s{s}"
            args = finetune_args(a, dirs["train"], dirs["val"], runs, name, s, a.epochs)
            secs = run_child("finetune.py", args, os.path.join(out, f"{name}.log"))
            evals = eval_records(os.path.join(runs, name))
            best = max(evals, key=lambda r: r["top1"])
            j = {"seed": s, "secs": secs, "last_top1": evals[-1]["top1"], "best_top1": best["top1"],
                 "curve": [r["top1"] for r in evals]}  # fmt: skip
            if not a.skip_label:
                j["label_top1"], j["label_secs"] = label_top1(
                    a, os.path.join(runs, name), dirs["val"], os.path.join(out, f"label-{name}")
                )
            jobs.append(j)
            print(f"job seed {s}: {j}", flush=True)
        res["job"] = jobs
        last = [j["last_top1"] for j in jobs]
        ratio = statistics.mean(last) / statistics.mean(ref_top1)
        rows += [("job top-1 (last eval)", spread(last)),
                 ("job seconds (Ray start-up included)", spread([j["secs"] for j in jobs])),
                 ("job / reference top-1", f"{ratio:.3f} (goal ≥ 0.98)")]  # fmt: skip
        print(f"RESULT job_top1 {statistics.mean(last):.4f}")
        print(f"RESULT job_over_reference {ratio:.3f}")
        if not a.skip_label:
            lab = [j["label_top1"] for j in jobs]
            best = [j["best_top1"] for j in jobs]
            gap = max(abs(x - y) for x, y in zip(lab, best, strict=True))
            rows += [("label.py top-1 (exported = best checkpoint)", spread(lab)),
                     ("the run's eval top-1 of that checkpoint", spread(best)),
                     ("|label - eval|, points", f"{100 * gap:.2f} (goal ≤ 0.5)")]  # fmt: skip
            print(f"RESULT label_top1 {statistics.mean(lab):.4f}")
            print(f"RESULT label_minus_eval_points {100 * gap:.2f}")


def pays(a: argparse.Namespace, dirs: dict, runs: str, out: str, res: dict, rows: list) -> None:
    """Part 2: MIM pretraining on the unlabelled train images, then 10% of the labels."""
    if a.pretrained:
        pt, pt_secs = a.pretrained, 0.0
    else:
        pt, pt_secs = pretrain(a, dirs["train"], out)
    res["pretrain"] = {"run": pt, "secs": pt_secs}
    few = dict(a.__dict__, micro_batch=a.few_micro_batch)
    fa = argparse.Namespace(**few)
    fcfg = resolved(finetune_args(fa, dirs["few"], dirs["val"], runs, "few", 0, a.few_epochs))
    diffs, sc, pr = [], [], []
    plain, nan = a.few_plain_arms.split(","), {"top1": float("nan")}
    for s in range(a.first_seed, a.first_seed + a.seeds):
        r0 = (
            reference(fcfg, dirs["few"], dirs["val"], a.few_epochs, s)
            if "scratch" in plain
            else nan
        )
        r1 = (reference(fcfg, dirs["few"], dirs["val"], a.few_epochs, s, init_from=pt)
              if "pt" in plain else nan)  # fmt: skip
        sc.append(r0["top1"])
        pr.append(r1["top1"])
        diffs.append(r1["top1"] - r0["top1"])
        print(
            f"few-label seed {s}: scratch {r0['top1']:.4f} pretrained {r1['top1']:.4f}", flush=True
        )
    res["few_plain"] = {"scratch": sc, "pretrained": pr}
    rows += [(f"pretraining seconds ({a.pt_epochs} epochs, + codebook fit unless reused)", f"{pt_secs:.0f}"),
             ("10% labels, plain loop: scratch top-1", spread(sc)),
             ("10% labels, plain loop: pretrained top-1", spread(pr)),
             ("10% labels, plain loop: pretrained - scratch", spread(diffs))]  # fmt: skip
    print(f"RESULT few_plain_pretrained_minus_scratch {spread(diffs)}")
    if a.few_job:
        jd, js, jp, jsecs, replays = [], [], [], [], []
        arms = a.few_job_arms.split(",")
        for s in range(a.first_seed, a.first_seed + a.seeds):
            top = []
            for init in (None, pt):
                name = f"few-{'pt' if init else 'scratch'}-s{s}"
                if name.split("-")[1] not in arms:
                    top.append(float("nan"))
                    continue
                args = finetune_args(fa, dirs["few"], dirs["val"], runs, name, s, a.few_epochs)
                args += ["--model.init_from", init] if init else []
                rows_dir = os.path.join(out, "rows", name)
                if a.replay:
                    shutil.rmtree(rows_dir, ignore_errors=True)
                    args += ["--debug.record_rows", rows_dir, "--run.log_every", "1"]
                jsecs.append(run_child("finetune.py", args, os.path.join(out, f"{name}.log")))
                top.append(eval_records(os.path.join(runs, name))[-1]["top1"])
                if a.replay:
                    replays.append(replayed(fcfg, dirs, runs, name, rows_dir, s, init, a, top[-1]))
            js.append(top[0])
            jp.append(top[1])
            jd.append(top[1] - top[0])
            print(
                f"few-label job seed {s}: scratch {top[0]:.4f} pretrained {top[1]:.4f}", flush=True
            )
        res["few_job"] = {"scratch": js, "pretrained": jp, "secs": jsecs}
        if replays:
            res["replay"] = replays
            fixed_order_rows(replays, rows)
        rows += [("10% labels, job seconds per run (Ray start-up included)", spread(jsecs)),
                 ("10% labels, job: scratch top-1", spread(js)),
                 ("10% labels, job: pretrained top-1", spread(jp)),
                 ("10% labels, job: pretrained - scratch", spread(jd))]  # fmt: skip
        print(f"RESULT few_job_pretrained_minus_scratch {statistics.mean(jd):.4f}")
        for arm, job, loop in (("scratch", js, sc), ("pretrained", jp, pr)):
            ok = [(j, r) for j, r in zip(job, loop, strict=True) if j == j]  # NaN: arm not run
            if ok:
                ratio = statistics.mean(j for j, _ in ok) / statistics.mean(r for _, r in ok)
                rows.append(
                    (f"10% labels, {arm}: job / plain loop ({len(ok)} seeds)", f"{ratio:.3f}")
                )
                print(f"RESULT few_{arm}_job_over_loop {ratio:.4f}")


def replayed(fcfg, dirs: dict, runs: str, name: str, rows_dir: str, seed: int,  # noqa: ANN001
             init: str | None, a: argparse.Namespace, job_top1: float) -> dict:  # fmt: skip
    """The plain loop on the job run's own steps (its images, order, split and flips), from
    the same initial weights: its top-1 and how far its per-step loss and gradient norm are
    from what the job logged (rank 0's micro-batch loss; the global norm before clipping)."""
    order = job_order(os.path.join(runs, name), dirs["few"], rows_dir)
    r = reference(fcfg, dirs["few"], dirs["val"], a.few_epochs, seed, init_from=init, replay=order)
    with open(os.path.join(runs, name, "logs", "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f if line.strip()]
    train = {x["step"]: x for x in logged if x.get("kind") == "train"}
    dl = [abs(train[k + 1]["loss"] - v) for k, v in enumerate(r["losses"]) if k + 1 in train]
    dn = [
        abs(train[k + 1]["grad_norm"] - v) / v for k, v in enumerate(r["norms"]) if k + 1 in train
    ]
    out = {"seed": seed, "arm": "pt" if init else "scratch", "steps": len(order),
           "job_top1": job_top1, "loop_on_job_order_top1": r["top1"],
           "loss_diff_step1": dl[0], "loss_diff_max_first10": max(dl[:10]), "loss_diff_max": max(dl),
           "norm_rel_diff_step1": dn[0], "norm_rel_diff_max_first10": max(dn[:10])}  # fmt: skip
    print(f"replay {name}: {out}", flush=True)
    return out


def fixed_order_rows(replays: list[dict], rows: list) -> None:
    """The fixed-order comparison: the job and the plain loop on the job's own steps."""
    job = [r["job_top1"] for r in replays]
    loop = [r["loop_on_job_order_top1"] for r in replays]
    rows += [("fixed order: job top-1", spread(job)),
             ("fixed order: plain loop on the job's steps, top-1", spread(loop)),
             ("fixed order: job / loop", f"{statistics.mean(job) / statistics.mean(loop):.3f}"),
             ("fixed order: |loss diff| at step 1, max over runs",
              f"{max(r['loss_diff_step1'] for r in replays):.2e}"),
             ("fixed order: |loss diff| steps 1-10, max over runs",
              f"{max(r['loss_diff_max_first10'] for r in replays):.2e}"),
             ("fixed order: grad-norm rel. diff steps 1-10, max",
              f"{max(r['norm_rel_diff_max_first10'] for r in replays):.2e}")]  # fmt: skip
    print(f"RESULT fixed_order_job_over_loop {statistics.mean(job) / statistics.mean(loop):.4f}")


if __name__ == "__main__":
    main()
