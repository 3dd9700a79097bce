"""``data.flip``: the horizontal flip probability of every training view (no Ray).

p 0 never flips, p 1 always does, 0.5 about half; the flip is one draw whatever p, so the
crop, jitter and mask around it do not change with it; a bad value names ``data.flip``.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from beit_ray.config import ConfigError, parse_args
from beit_ray.data.augment import ClassifyTransform, PretrainTransform, draw_flip
from beit_ray.data.config import DataConfig
from beit_ray.data.pipeline import labelled_batch
from beit_ray.data.segmentation import seg_transform
from beit_ray.train.config import FinetuneConfig

S = 32


@pytest.fixture(scope="module")
def png() -> bytes:
    """An S×S image whose left and right differ everywhere: a horizontal ramp + noise."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 200, S, dtype=np.float32)[None, :, None]  # [1, S, 1]
    img = ramp + rng.uniform(0, 40, size=(S, S, 3))  # [S, S, 3]
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def flips(n: int, p: float) -> int:
    rng = np.random.default_rng(1234)
    return sum(draw_flip(rng, p) for _ in range(n))


def test_draw_flip_probability():
    n = 4000
    assert flips(n, 0.0) == 0
    assert flips(n, 1.0) == n
    half = flips(n, 0.5)
    assert abs(half / n - 0.5) < 0.03, half  # binomial sd 0.008: 0.03 is ~4 sd
    assert abs(flips(n, 0.2) / n - 0.2) < 0.03


def test_flip_is_one_draw_whatever_p():
    """What is drawn after the flip is the same for p 0 and p 1: only the mirror changes."""
    after = []
    for p in (0.0, 1.0):
        rng = np.random.default_rng(7)
        draw_flip(rng, p)
        after.append(rng.random())
    assert after[0] == after[1]


def test_classify_transform_flip(png: bytes):
    """The whole-image view (crop scale and ratio 1): p 0 gives the image, p 1 its mirror,
    p 0.5 mirrors about half of the keys."""
    whole = {"crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0), "image_size": S}
    ref = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).transpose(2, 0, 1)  # [3, S, S]
    never = ClassifyTransform(flip=0.0, **whole)
    always = ClassifyTransform(flip=1.0, **whole)
    half = ClassifyTransform(flip=0.5, **whole)
    n, mirrored = 200, 0
    for i in range(n):
        key = f"img{i}"
        np.testing.assert_array_equal(never(png, key, epoch=i % 3), ref)
        np.testing.assert_array_equal(always(png, key, epoch=i % 3), ref[:, :, ::-1])
        x = half(png, key, epoch=i % 3)
        is_mirror = np.array_equal(x, ref[:, :, ::-1])
        assert is_mirror or np.array_equal(x, ref)
        mirrored += is_mirror
    assert 0.35 < mirrored / n < 0.65, mirrored  # binomial sd 0.035


def test_pretrain_transform_flip(png: bytes):
    """Flip, then crop (unilm's order): with p 1 the views are p 0's views of the mirrored
    image, with the same crop box and mask."""
    mirror = io.BytesIO()
    Image.open(io.BytesIO(png)).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirror, "PNG")
    kw = dict(image_size=S, tokenizer_size=16, grid=4, num_masking_patches=6, min_num_patches=1)
    kw |= dict(crop_scale=(0.3, 1.0), color_jitter=0.0, seed=3)
    never, always = PretrainTransform(flip=0.0, **kw), PretrainTransform(flip=1.0, **kw)
    for i in range(20):
        p0, t0, m0 = never(mirror.getvalue(), f"k{i}", epoch=1)
        p1, t1, m1 = always(png, f"k{i}", epoch=1)
        np.testing.assert_array_equal(m0, m1)
        assert np.abs(p1.astype(int) - p0).max() <= 1  # [3, S, S]
        assert np.abs(t1.astype(int) - t0).max() <= 1  # [3, 16, 16]
        p_unflipped, _, _ = never(png, f"k{i}", epoch=1)
        assert not np.array_equal(p_unflipped, p1)
    cfg = DataConfig(image_size=S, patch_size=8, tokenizer_image_size=16, flip=0.0)
    assert PretrainTransform.from_config(cfg).flip == 0.0


def test_labelled_batch_honours_data_flip(png: bytes):
    """The pipeline's classification stage builds its transform with data.flip."""
    n = 8
    batch = {
        "image": np.array([png] * n, dtype=object),
        "key": np.array([f"k{i}" for i in range(n)], dtype=object),
        "path": np.array([f"p{i}" for i in range(n)], dtype=object),
        "label": np.zeros(n, np.int64),
        "epoch": np.zeros(n, np.int64),
        "error": np.array([""] * n, dtype=object),
    }
    ref = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).transpose(2, 0, 1)
    out = {}
    for p in (0.0, 1.0):
        cfg = DataConfig(image_size=S, patch_size=8, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
                         rand_augment="", flip=p)  # fmt: skip
        out[p] = labelled_batch(batch, cfg, True, None, None)["pixel_values"]  # [n, 3, S, S]
    assert (out[0.0] == ref).all()
    assert (out[1.0] == ref[:, :, ::-1]).all()


def test_seg_transform_flip():
    """Image and labels mirror together; p 0 and p 1 cut the same crop."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
    labels = np.tile(np.arange(60, dtype=np.uint8) // 6, (40, 1))  # [40, 60], varies along x
    outs = []
    for p in (0.0, 1.0):
        outs.append(
            seg_transform(
                image,
                labels,
                np.random.default_rng(9),
                32,
                scale=(60, 40),
                ratio_range=(1, 1),
                photometric=False,
                flip=p,
            )  # fmt: skip
        )
    (x0, l0, hw0), (x1, l1, hw1) = outs
    assert hw0 == hw1 == (32, 32)
    np.testing.assert_array_equal(l1, l0[:, ::-1])
    np.testing.assert_array_equal(x1, x0[:, :, ::-1])
    assert not np.array_equal(l0, l1)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_bad_flip_names_the_field(bad: float):
    with pytest.raises(ConfigError, match=r"data\.flip"):
        DataConfig(flip=bad)
    with pytest.raises(ConfigError, match=r"data\.flip"):
        parse_args(FinetuneConfig, ["--data.source", "x", "--data.flip", str(bad)])


def test_flip_default_and_cli():
    assert DataConfig().flip == 0.5
    cfg = parse_args(FinetuneConfig, ["--data.source", "x", "--data.flip", "0"])
    assert cfg.data.flip == 0.0
