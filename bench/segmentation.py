"""Does segmentation fine-tuning learn on real masks, against non-learned baselines?

    .venv/bin/python bench/segmentation.py --epochs 15 --out /tmp/seg-bench

Data: the 3 PASCAL VOC photos with class masks that labelme's source distribution ships
(examples/semantic_segmentation/data_dataset_voc; found under --labelme, else fetched with
``pip download --no-binary :all: --no-deps labelme`` into --out). Each photo is split by
columns: the left ``--train-share`` trains (written ``--copies`` times under different keys,
so each copy gets its own random rescale/crop/flip/photometric draw), the right part
validates. Classes are the VOC ids present, renumbered (background 0; VOC's 255 border stays
ignored). ADE20k layout, so the run goes through ``jobs/finetune.py --task segmentation``:
mmseg's pipeline (scale (4c, c), ratio 0.5-2.0, crop, flip, PhotoMetricDistortion) and its
slide test at that scale, logits resized to the original label maps.

Printed from the same run, all on the validation parts at their original size with the same
mIoU (classes present in labels or predictions): the run's eval mIoU (last and best epoch),
the majority class of the training pixels everywhere, and an Otsu threshold of the grey
image whose dark and bright sides take the training pixels' majority class on that side.
Starts a local Ray (~30 s on 2 cores). Never run by the test suite.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tarfile
import time

import numpy as np
import torch
from PIL import Image

from beit_ray.train.tasks import segmentation_metrics

VOC = "examples/semantic_segmentation/data_dataset_voc"


def labelme_voc(out: str, given: str | None) -> str:
    """The folder holding JPEGImages/ and SegmentationClass/ from labelme's sdist."""
    if given and os.path.isdir(os.path.join(given, "JPEGImages")):
        return given
    sdists = glob.glob(os.path.join(given or out, "labelme-*.tar.gz"))
    if not sdists:
        # The build step of pip download is not needed (and slow): stop once the file is here.
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
             "--no-build-isolation", "-d", out, "labelme"],
            check=False, capture_output=True,
        )  # fmt: skip
        sdists = glob.glob(os.path.join(out, "labelme-*.tar.gz"))
    if not sdists:
        raise SystemExit("no labelme sdist: pass --labelme <folder with labelme-*.tar.gz>")
    with tarfile.open(sdists[0]) as tar:
        top = tar.getnames()[0].split("/")[0]
        members = [m for m in tar.getmembers() if m.name.startswith(f"{top}/{VOC}/")]
        tar.extractall(out, members=members, filter="data")
    return os.path.join(out, top, VOC)


def load_pairs(voc: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    pairs = []
    for path in sorted(glob.glob(os.path.join(voc, "SegmentationClass", "*.png"))):
        stem = os.path.splitext(os.path.basename(path))[0]
        image = np.asarray(
            Image.open(os.path.join(voc, "JPEGImages", stem + ".jpg")).convert("RGB")
        )
        pairs.append((stem, image, np.asarray(Image.open(path), dtype=np.uint8)))
    return pairs


def write_ade(root: str, pairs: list, share: float, copies: int) -> tuple[list[str], dict]:
    """ADE20k layout of the column split; returns class names and the split arrays."""
    present = sorted({int(c) for _, _, lab in pairs for c in np.unique(lab) if c != 255})
    remap = np.full(256, 255, np.uint8)
    remap[present] = np.arange(len(present))
    split: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"training": [], "validation": []}
    for stem, image, lab in pairs:
        cut = int(image.shape[1] * share)
        lab = remap[lab]
        for name, sl in (("training", slice(0, cut)), ("validation", slice(cut, None))):
            split[name].append((image[:, sl], lab[:, sl]))
            n = copies if name == "training" else 1
            for k in range(n):
                for kind, arr in (("images", image[:, sl]), ("annotations", lab[:, sl])):
                    d = os.path.join(root, kind, name)
                    os.makedirs(d, exist_ok=True)
                    ext = ".jpg" if kind == "images" else ".png"
                    Image.fromarray(np.ascontiguousarray(arr)).save(
                        os.path.join(d, f"{stem}_{k:03d}{ext}"), quality=95
                    )
    with open(os.path.join(os.path.dirname(root), "class_names.txt")) as f:
        names = f.read().splitlines()
    classes = [names[c] if c < len(names) else str(c) for c in present]
    with open(os.path.join(root, "id2label.json"), "w") as f:
        json.dump({str(i): c for i, c in enumerate(classes)}, f)
    return classes, split


def confusion(pred: np.ndarray, lab: np.ndarray, n: int) -> torch.Tensor:
    ok = lab != 255
    idx = lab[ok].astype(np.int64) * n + pred[ok].astype(np.int64)
    return torch.from_numpy(np.bincount(idx, minlength=n * n).reshape(n, n)).double()


def baselines(split: dict, n: int) -> dict[str, float]:
    """Majority class everywhere; Otsu dark/bright sides → the training majority on each side."""
    from skimage.filters import threshold_otsu

    def grey(img: np.ndarray) -> np.ndarray:
        return img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)

    counts = np.zeros(n, np.int64)
    side = np.zeros((2, n), np.int64)  # [dark/bright, class]
    for img, lab in split["training"]:
        g, ok = grey(img), lab != 255
        counts += np.bincount(lab[ok], minlength=n)
        bright = g > threshold_otsu(g)
        for s, m in ((0, ~bright & ok), (1, bright & ok)):
            side[s] += np.bincount(lab[m], minlength=n)
    major, per_side = int(counts.argmax()), side.argmax(1)
    conf_major = torch.zeros(n, n, dtype=torch.float64)
    conf_otsu = torch.zeros(n, n, dtype=torch.float64)
    for img, lab in split["validation"]:
        g = grey(img)
        conf_major += confusion(np.full(lab.shape, major), lab, n)
        conf_otsu += confusion(per_side[(g > threshold_otsu(g)).astype(np.int64)], lab, n)
    return {
        "majority": segmentation_metrics(conf_major)["miou"],
        "otsu": segmentation_metrics(conf_otsu)["miou"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/seg-bench")
    ap.add_argument("--labelme", default=None, help="folder with labelme-*.tar.gz or the VOC dir")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--image-size", type=int, default=64, help="model input = crop size")
    ap.add_argument("--copies", type=int, default=32)
    ap.add_argument("--train-share", type=float, default=0.6)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--flavour", default="debug")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    voc = labelme_voc(a.out, a.labelme)
    root = os.path.join(voc, "ade")
    classes, split = write_ade(root, load_pairs(voc), a.train_share, a.copies)
    n = len(classes)
    print(f"classes ({n}): {classes}; train rows {3 * a.copies}, val images 3", flush=True)
    base = baselines(split, n)
    name = f"seg-{int(time.time())}"
    cmd = [
        sys.executable, "jobs/finetune.py", "--task", "segmentation", "--data.source", root,
        "--num_labels", str(n), "--reduce_labels", "false", "--model.flavour", a.flavour,
        "--model.image_size", str(a.image_size), "--data.image_size", str(a.image_size),
        "--optim.lr", str(a.lr), "--run.epochs", str(a.epochs), "--ray.num_cpus", "4",
        "--deepspeed.micro_batch_size", "8", "--checkpoint.storage_path", os.path.join(a.out, "runs"),
        "--checkpoint.name", name, "--checkpoint.keep_last", "1",
    ]  # fmt: skip
    print("$ " + " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    wall = time.time() - t0
    metrics = os.path.join(a.out, "runs", name, "logs", "metrics.jsonl")
    with open(metrics) as f:
        evals = [r for r in map(json.loads, f) if r.get("kind") == "eval"]
    last, best = evals[-1]["miou"], max(r["miou"] for r in evals)
    print(
        f"\nvalidation mIoU ({n} classes, right {1 - a.train_share:.0%} of each photo, "
        f"original size):\n"
        f"  fine-tuned {a.flavour} @ {a.image_size} px, {a.epochs} epochs: last {last:.3f}, "
        f"best {best:.3f} (pixel acc {evals[-1]['pixel_acc']:.3f}; run {wall:.0f} s)\n"
        f"  majority class everywhere: {base['majority']:.3f}\n"
        f"  Otsu threshold → per-side majority: {base['otsu']:.3f}"
    )


if __name__ == "__main__":
    main()
