"""Segmentation at the training scale: a run exports a keep-ratio processor, and the run's eval,
labelling and serving rescale and slide windows with that one definition (mmseg's test)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import jpeg_bytes
from PIL import Image

from beit_ray.data.decode import decode_image

CROP = 32  # the debug flavour's image size: training scale (128, 32)
NAMES = {0: "sky", 1: "cat", 2: "rest"}


def _sizes() -> dict[str, tuple[int, int]]:
    """Landscape, portrait, long strip (the long edge limit binds), small, and two of one size."""
    return {"wide": (300, 451), "tall": (200, 90), "strip": (40, 400), "small": (20, 25),
            "same_a": (64, 96), "same_b": (64, 96)}  # fmt: skip


def _images(photos: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    src = photos["chelsea"]
    return {k: np.ascontiguousarray(src[:h, -w:]) for k, (h, w) in _sizes().items()}


@pytest.fixture(scope="module")
def run_export(tmp_path_factory) -> str:
    """A debug segmentation run's model/ folder written by the trainer's own ``export`` (the
    weights come from a fresh model instead of a DeepSpeed checkpoint)."""
    from beit_ray.config import build
    from beit_ray.train import checkpoint, trainer
    from beit_ray.train.config import FinetuneConfig
    from beit_ray.train.tasks import make_task

    cfg = build(FinetuneConfig, {"task": "segmentation", "model": {"flavour": "debug"}})
    extra = {"id2label": NAMES}
    task = make_task(cfg, extra)
    with torch.random.fork_rng():
        torch.manual_seed(7)  # not the run's seed: the export must load these weights
        state = task.build(None).state_dict()
    out = str(tmp_path_factory.mktemp("seg_run") / "model")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint, "consolidate", lambda _: state)
        trainer.export(cfg, task, "unused", out, extra)
    return out


def test_segmentation_export_is_the_runs_keep_ratio_eval(run_export, photos) -> None:
    """size {shortest_edge: crop, longest_edge: 4 crop}, no crop; equal to the eval's processor;
    transformers' BeitImageProcessor loads it and resizes to the same sizes."""
    from transformers import AutoImageProcessor

    from beit_ray.config import build
    from beit_ray.data.segmentation import eval_preprocessor
    from beit_ray.models.preprocess import Preprocessor
    from beit_ray.train.config import FinetuneConfig
    from beit_ray.train.trainer import export_preprocessor

    with open(os.path.join(run_export, "preprocessor_config.json")) as f:
        raw = json.load(f)
    assert raw["size"] == {"shortest_edge": CROP, "longest_edge": 4 * CROP}
    assert raw["do_center_crop"] is False and raw["image_processor_type"] == "BeitImageProcessor"
    ours = Preprocessor.from_pretrained(run_export)
    assert ours == eval_preprocessor(CROP) and not ours.fixed_size
    hf = AutoImageProcessor.from_pretrained(run_export)
    assert type(hf).__name__.startswith("BeitImageProcessor")
    for name, image in _images(photos).items():
        mine = ours.to_uint8(image)  # [3, h, w]
        theirs = hf(Image.fromarray(image), return_tensors="pt")["pixel_values"][0]
        assert tuple(theirs.shape) == mine.shape, name
        h, w = image.shape[:2]
        assert min(mine.shape[1:]) == CROP or max(mine.shape[1:]) == 4 * CROP, name
        assert abs(mine.shape[1] / mine.shape[2] - h / w) < 0.05 * h / w + 1 / CROP, name
    assert ours.to_uint8(_images(photos)["strip"]).shape == (3, 13, 128)  # long edge limit binds
    # a run's own seg_scale is exported, in either order
    cfg = build(
        FinetuneConfig,
        {"task": "segmentation", "model": {"flavour": "debug"}, "seg_scale": [40, 100]},
    )
    assert export_preprocessor(cfg)["seg_scale"] == (100, 40)  # type: ignore[index]
    # classification exports keep their fixed eval crop
    cls = build(FinetuneConfig, {"model": {"flavour": "debug"}, "data": {"crop_pct": 0.9}})
    assert export_preprocessor(cls) == {"crop_pct": 0.9}


def test_label_path_equals_the_runs_eval(run_export, photos, tmp_path, monkeypatch) -> None:
    """The same image through the run's evaluation (data rows + SegmentationTask.evaluate) and
    through labelling's predictor: the same rescaled pixels, the same logits, the same mIoU."""
    import torch.nn.functional as F

    from beit_ray.config import build
    from beit_ray.data.segmentation import _read_pair, segment_logits
    from beit_ray.infer.predictor import Predictor
    from beit_ray.models.load import load_model
    from beit_ray.train import tasks
    from beit_ray.train.config import FinetuneConfig

    images = _images(photos)
    keys = ["wide", "tall", "strip"]
    rng = np.random.default_rng(0)
    for k in keys:  # ADE-style annotations: 0 ignored, 1..3 → classes 0..2
        h, w = images[k].shape[:2]
        (tmp_path / f"{k}.jpg").write_bytes(jpeg_bytes(images[k]))
        Image.fromarray(rng.integers(0, 4, (h, w), dtype=np.uint8)).save(tmp_path / f"{k}.png")
    rows = _read_pair(
        {
            "key": np.array(keys, dtype=object),
            "image": np.array([str(tmp_path / f"{k}.jpg") for k in keys], dtype=object),
            "annotation": np.array([str(tmp_path / f"{k}.png") for k in keys], dtype=object),
        },
        train=False, crop_size=CROP, scale=None, reduce_zero_label=True, seed=0, epoch=0,
        max_pixels=10**8, errors_uri=None, st=None,
    )  # fmt: skip
    pred = Predictor(run_export, "segment")
    model = load_model(run_export).eval()
    cfg = build(FinetuneConfig, {"task": "segmentation", "model": {"flavour": "debug"}})
    task = tasks.make_task(cfg, {"id2label": NAMES})
    conf = torch.zeros(3, 3, dtype=torch.float64)
    for k, pixels, labels in zip(keys, rows["pixel_values"], rows["labels"], strict=True):
        image = decode_image((tmp_path / f"{k}.jpg").read_bytes())
        prepared = pred.prepare(image)
        assert np.array_equal(prepared, pixels), k  # one rescale: identical pixels
        with torch.no_grad():
            run_logits = segment_logits(  # as SegmentationTask.evaluate calls it
                lambda v: model(pixel_values=v).logits.float(),
                task.pixels(torch.from_numpy(pixels)[None], torch.device("cpu")),
                CROP,
                3,
                labels.shape,
            )[0]  # [C, H, W]
            ours = pred._segment_logits(prepared[None])[0]  # [C, h', w'] at the test scale
            ours = F.interpolate(ours[None], size=labels.shape, mode="bilinear")[0]
        torch.testing.assert_close(ours, run_logits, atol=1e-4, rtol=1e-4)
        mask = pred.predict([image])[0]["mask"].astype(np.int64)
        assert mask.shape == labels.shape
        agree = (mask == run_logits.argmax(0).numpy()).mean()
        assert agree > 0.999, (k, agree)
        ok = labels != 255
        conf += (
            torch.bincount(
                torch.from_numpy(labels[ok].astype(np.int64) * 3 + mask[ok]), minlength=9
            )
            .view(3, 3)
            .double()
        )

    class Engine:  # what evaluate reads of a DeepSpeed engine
        module, device = model, torch.device("cpu")

        def __call__(self, **kw: torch.Tensor):  # noqa: ANN204
            return model(**kw)

    class Shard:  # one validation row a batch, as Ray Data hands it
        def iter_batches(self, **_: object):  # noqa: ANN202
            for p, lab in zip(rows["pixel_values"], rows["labels"], strict=True):
                yield {"pixel_values": [p], "labels": [lab]}

    monkeypatch.setattr(tasks, "all_reduce_on", lambda t, _: t)  # one rank
    with torch.no_grad():
        run = task.evaluate(Engine(), Shard(), 1)
    labelled = tasks.segmentation_metrics(conf)
    assert abs(run["miou"] - labelled["miou"]) < 1e-3 and run["miou"] > 0
    assert abs(run["pixel_acc"] - labelled["pixel_acc"]) < 1e-3


def test_forward_prepared_runs_one_forward_per_shape(run_export, photos, monkeypatch) -> None:
    """Prepared images of mixed shapes: grouped by shape, results back in input order."""
    from beit_ray.infer.predictor import Predictor

    pred = Predictor(run_export, "segment")
    images = list(_images(photos).values())
    prepared = [pred.prepare(img) for img in images]
    sizes = [img.shape[:2] for img in images]
    calls: list[tuple[int, ...]] = []
    forward = pred.forward
    monkeypatch.setattr(
        pred, "forward", lambda p, s, k=None: calls.append(p.shape) or forward(p, s, k)
    )
    out = pred.forward_prepared(prepared, sizes)
    assert len(calls) == len({p.shape for p in prepared}) == 4 < len(images)
    assert (3, 3, 32, 48) in calls  # 300x451 and both 64x96 images rescale to 32x48: one batch
    for img, res in zip(images, out, strict=True):
        assert res["mask"].shape == img.shape[:2]


def test_classify_still_needs_a_fixed_size(run_export, tmp_path) -> None:
    """Only segment slides over images of any size; classify/embed keep one fixed shape."""
    from beit_ray.config import ConfigError, parse_args
    from beit_ray.infer.config import LabelConfig
    from beit_ray.infer.label import check_checkpoint

    def cfg(task: str) -> LabelConfig:
        argv = ["--input", str(tmp_path), "--output", str(tmp_path / "o")]
        return parse_args(LabelConfig, [*argv, "--checkpoint", run_export, "--task", task])

    assert not check_checkpoint(cfg("segment")).fixed_size
    with pytest.raises(ConfigError, match="fixed size"):
        check_checkpoint(cfg("embed"))


@pytest.mark.integration
def test_labelling_keeps_each_images_size(ray_session, run_export, photos, tmp_path) -> None:
    """A folder of images of different sizes and ratios (two of one size, one unreadable):
    masks at each original size, equal to the predictor's per-image result."""
    from beit_ray.config import parse_args
    from beit_ray.infer.config import LabelConfig
    from beit_ray.infer.label import label, read_parts
    from beit_ray.infer.predictor import Predictor

    src = tmp_path / "in"
    src.mkdir()
    images = _images(photos)
    for k, img in images.items():
        (src / f"{k}.png").write_bytes(_png(img))  # lossless: the test decodes the same pixels
    (src / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    out = tmp_path / "out"
    argv = ["--input", str(src), "--output", str(out), "--checkpoint", run_export]
    argv += ["--task", "segment", "--actors.num_cpus", "0.5", "--predict.batch_size", "4"]
    summary = label(parse_args(LabelConfig, argv))
    assert summary["ok"] == len(images) and summary["errors"] == 1
    table = read_parts(str(out)).to_pandas().set_index("path")
    pred = Predictor(run_export, "segment")
    for k, img in images.items():
        row = table.loc[str(src / f"{k}.png")]
        mask = np.asarray(Image.open(row["mask_uri"]))
        assert mask.shape == img.shape[:2] == (row["height"], row["width"]), k
        want = pred.predict([img])[0]["mask"]
        assert (mask == want).mean() > 0.999, k  # same-size images share a forward
        counts = np.bincount(mask.ravel())
        assert list(row["pixel_counts"]) == counts[counts > 0].tolist()
    assert table.loc[str(src / "broken.jpg"), "error"]


def _png(img: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()
