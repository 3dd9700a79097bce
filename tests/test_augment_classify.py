"""Fine-tuning augmentations: RandAugment (data stage, PIL) and random erasing (worker, normalized).

No Ray: the transforms, the pipeline's batch function and the task's loss are called directly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import jpeg_bytes
from PIL import Image

from beit_ray.config import ConfigError, parse_args
from beit_ray.data.augment import ClassifyTransform, mean_fill
from beit_ray.data.config import DataConfig
from beit_ray.data.pipeline import labelled_batch
from beit_ray.data.randaugment import (
    OPS,
    RAND_INCREASING_TRANSFORMS,
    RAND_TRANSFORMS,
    apply_op,
    parse_rand_augment,
    rand_augment,
)
from beit_ray.train.config import FinetuneConfig, OptimConfig
from beit_ray.train.tasks import ClassificationTask, mix, random_erase

SPEC = "rand-m9-mstd0.5-inc1"
FILL = (124, 116, 104)


@pytest.fixture(scope="module")
def photo(photos: dict[str, np.ndarray]) -> Image.Image:
    return Image.fromarray(photos["chelsea"]).resize((64, 64), Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def dull(photo: Image.Image) -> Image.Image:
    """The photo squeezed into [40, 200]: AutoContrast/Equalize have something to do."""
    a = np.asarray(photo).astype(np.float32)
    return Image.fromarray(np.rint(40 + a * 160 / 255).astype(np.uint8))


def arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(np.int32)


def mad(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(arr(a) - arr(b)).mean())


# --------------------------------------------------------------------------- spec and config


def test_spec_parsing_and_config_validation():
    s = parse_rand_augment(SPEC)
    assert (s.magnitude, s.mstd, s.increasing, s.num_ops, s.prob, s.mmax) == (
        9, 0.5, True, 2, 0.5, 10
    )  # fmt: skip
    s = parse_rand_augment("rand-m7-n3-p0.7-mmax12-inc0")
    assert (s.magnitude, s.num_ops, s.prob, s.mmax, s.increasing) == (7, 3, 0.7, 12, False)
    assert parse_rand_augment("rand-m9-mstd101").mstd == math.inf  # timm: uniform [0, m]
    assert parse_rand_augment("") is None
    for bad in ("augmix-m5", "rand-m", "rand-x9", "rand-n0", "rand-m9-p2", "rand-m9-w0x"):
        with pytest.raises(ValueError):
            parse_rand_augment(bad)
    assert DataConfig().rand_augment == SPEC  # BEiT's --aa default
    assert DataConfig(rand_augment="").rand_augment == ""
    assert parse_rand_augment(None) is None
    cli = parse_args(FinetuneConfig, ["--data.rand_augment", "", "--optim.reprob", "0"])
    assert cli.data.rand_augment is None and cli.optim.reprob == 0  # disabled from the CLI
    with pytest.raises(ConfigError, match=r"^data\.rand_augment: .*'foo'"):
        parse_args(FinetuneConfig, ["--data.rand_augment", "rand-m9-foo"])
    with pytest.raises(ConfigError, match=r"^data\.rand_augment: .*'rand-q9'"):
        DataConfig(rand_augment="rand-q9")
    assert OptimConfig().reprob == 0.25  # BEiT's --reprob default
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match=r"^optim\.reprob"):
            OptimConfig(reprob=bad)


# --------------------------------------------------------------------------- the ops


def test_invert_posterize_solarize(photo: Image.Image):
    rng = np.random.default_rng(0)
    x = arr(photo)
    assert (arr(apply_op(photo, "Invert", 5, rng, FILL)) == 255 - x).all()
    distinct = [
        max(
            len(np.unique(arr(apply_op(photo, "PosterizeIncreasing", m, rng, FILL))[..., c]))
            for c in range(3)
        )
        for m in (0, 3, 6, 9)
    ]
    assert distinct[0] <= 16 and distinct[-1] <= 2  # 4 bits kept at m 0, 1 bit at m 9
    assert distinct == sorted(distinct, reverse=True) and distinct[0] > distinct[-1]
    assert len(np.unique(x[..., 0])) > 16
    # m 10 (which m9 + mstd 0.5 reaches) keeps 0 bits: black, not Pillow's ValueError
    assert (arr(apply_op(photo, "PosterizeIncreasing", 10, rng, FILL)) == 0).all()
    assert (arr(apply_op(photo, "Posterize", 1, rng, FILL)) == 0).all()
    # Solarize (increasing): threshold 256 at m 0 (nothing), 0 at m 10 (everything inverted).
    assert (arr(apply_op(photo, "SolarizeIncreasing", 0, rng, FILL)) == x).all()
    assert (arr(apply_op(photo, "SolarizeIncreasing", 10, rng, FILL)) == 255 - x).all()
    # SolarizeAdd: +min(128, int(m * 11)) below 128, the rest untouched.
    y = arr(apply_op(photo, "SolarizeAdd", 5, rng, FILL))
    assert (y == np.where(x < 128, np.minimum(255, x + 55), x)).all()


def test_autocontrast_and_equalize_spread_a_dull_image(dull: Image.Image):
    rng = np.random.default_rng(0)
    x = arr(dull)
    assert x.min() >= 40 and x.max() <= 200
    y = arr(apply_op(dull, "AutoContrast", 5, rng, FILL))
    assert all(y[..., c].min() == 0 and y[..., c].max() == 255 for c in range(3))
    e = arr(apply_op(dull, "Equalize", 5, rng, FILL))

    def cdf_gap(a: np.ndarray) -> float:  # distance of the value CDF from a flat histogram's
        cdf = np.cumsum(np.bincount(a.ravel(), minlength=256)) / a.size
        return float(np.abs(cdf - np.linspace(0, 1, 256)).mean())

    assert all(cdf_gap(e[..., c]) < 0.5 * cdf_gap(x[..., c]) for c in range(3))


@pytest.mark.parametrize("name", ["Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"])
def test_geometric_ops_keep_size_and_fill_with_the_mean(photo: Image.Image, name: str):
    x = arr(photo)
    for seed in range(4):  # both signs
        out = apply_op(photo, name, 10, np.random.default_rng(seed), FILL)
        assert out.size == photo.size and out.mode == "RGB"
        y = arr(out)
        filled = (y == FILL).all(-1).mean()
        assert filled > 0.05, f"{name}: {filled:.3f} of the pixels carry the fill colour"
        assert (x == FILL).all(-1).mean() < 0.01
        assert mad(out, photo) > 10


def test_enhance_ops_go_both_ways_and_m0_is_identity(photo: Image.Image):
    x = arr(photo)
    gray = x.mean(-1)
    for name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing"):
        assert (arr(apply_op(photo, name, 0, np.random.default_rng(0), FILL)) == x).all()
    stats = {"down": set(), "up": set()}
    for seed in range(8):
        b = arr(apply_op(photo, "BrightnessIncreasing", 10, np.random.default_rng(seed), FILL))
        r = b.mean() / x.mean()  # factor 0.1 or 1.9 (clipped at 255)
        assert r < 0.15 or r > 1.3
        stats["down" if r < 1 else "up"].add(seed)
        c = arr(apply_op(photo, "ContrastIncreasing", 10, np.random.default_rng(seed), FILL))
        s = c.mean(-1).std() / gray.std()
        assert s < 0.2 or s > 1.3
        col = arr(apply_op(photo, "ColorIncreasing", 10, np.random.default_rng(seed), FILL))
        sat = np.abs(col - col.mean(-1, keepdims=True)).mean()
        sat0 = np.abs(x - x.mean(-1, keepdims=True)).mean()
        assert sat < 0.2 * sat0 or sat > 1.3 * sat0
    assert stats["down"] and stats["up"]  # the sign is random
    sharp = apply_op(photo, "SharpnessIncreasing", 10, np.random.default_rng(0), FILL)
    assert mad(sharp, photo) > 0.5


def test_increasing_magnitude_means_a_stronger_effect(photo: Image.Image):
    graded = [n for n in RAND_INCREASING_TRANSFORMS if OPS[n][0] is not None]
    assert len(graded) == 12
    for name in graded:
        effect = [
            mad(apply_op(photo, name, m, np.random.default_rng(1), FILL), photo) for m in (2, 5, 9)
        ]
        assert effect[0] < effect[1] < effect[2], f"{name}: {effect}"
    # Without inc, timm's Posterize keeps MORE bits as m grows (hence inc1 in BEiT's recipe).
    assert "Posterize" in RAND_TRANSFORMS and "Posterize" not in RAND_INCREASING_TRANSFORMS
    rng = np.random.default_rng(0)
    weak, strong = (mad(apply_op(photo, "Posterize", m, rng, FILL), photo) for m in (3, 9))
    assert weak > strong


def test_op_probability_and_number(dull: Image.Image):
    rng = np.random.default_rng(0)
    every = parse_rand_augment("rand-m9-n1-p1-inc1")
    assert all(mad(rand_augment(dull, every, rng, FILL), dull) > 0 for _ in range(60))
    never = parse_rand_augment("rand-m9-p0-inc1")
    assert all(rand_augment(dull, never, rng, FILL) is dull for _ in range(20))
    # 2 ops at p 0.5: the image is left alone with probability 0.25.
    spec = parse_rand_augment(SPEC)
    same = np.mean([mad(rand_augment(dull, spec, rng, FILL), dull) == 0 for _ in range(400)])
    assert 0.17 < same < 0.33


# --------------------------------------------------------------------------- the transform


def test_classify_transform_randaugment_is_seeded_per_image(photos: dict[str, np.ndarray]):
    data = {k: jpeg_bytes(photos[k]) for k in ("chelsea", "coffee", "astronaut")}
    keys = [f"{k}/{i}" for k in data for i in range(4)]
    tf = ClassifyTransform(48, rand_augment=SPEC)
    plain = ClassifyTransform(48)
    first = {k: tf(data[k.split("/")[0]], k, 3) for k in keys}
    again = ClassifyTransform(48, rand_augment=SPEC)  # a fresh worker, reversed order
    for k in reversed(keys):
        assert (again(data[k.split("/")[0]], k, 3) == first[k]).all()
    # RandAugment draws after the crop and flip: with no op applied (p0) nothing changes.
    no_op = ClassifyTransform(48, rand_augment="rand-m9-p0")
    ra_changed = 0
    for k in keys:
        d = data[k.split("/")[0]]
        base = plain(d, k, 3)
        assert (no_op(d, k, 3) == base).all()
        ra_changed += not (first[k] == base).all()
        assert not (tf(d, k, 4) == first[k]).all()  # another epoch, another draw
    assert ra_changed >= len(keys) // 2  # ~75% of images get at least one op
    c = data["coffee"]
    assert not (tf(c, "coffee/0", 3) == tf(c, "coffee/1", 3)).all()


def test_empty_spec_and_eval_are_unchanged(photos: dict[str, np.ndarray]):
    data = jpeg_bytes(photos["rocket"])
    for key in ("a", "b", "c"):
        ref = ClassifyTransform(48)(data, key, 1)
        for off in ("", None):
            assert (ClassifyTransform(48, rand_augment=off)(data, key, 1) == ref).all()
        ev = ClassifyTransform(48, train=False)(data, key)
        assert (ClassifyTransform(48, train=False, rand_augment=SPEC)(data, key) == ev).all()


def test_pipeline_batch_uses_the_config(photos: dict[str, np.ndarray]):
    keys = ["chelsea", "coffee", "astronaut"]
    batch = {
        "key": np.array(keys, dtype=object),
        "image": np.array([jpeg_bytes(photos[k]) for k in keys], dtype=object),
        "error": np.array(["", "", ""], dtype=object),
        "epoch": np.array([2, 2, 2]),
        "label": np.array([0, 1, 2]),
    }
    for spec in (SPEC, "", None):
        for norm in ("beit", "imagenet"):
            cfg = DataConfig(
                image_size=32, patch_size=8, tokenizer="none", rand_augment=spec, normalization=norm
            )
            out = labelled_batch(batch, cfg, True, None, None)["pixel_values"]
            tf = ClassifyTransform(32, rand_augment=spec, fill=mean_fill(norm))
            want = np.stack([tf(batch["image"][i], k, 2) for i, k in enumerate(keys)])
            assert (out == want).all()
    assert mean_fill("imagenet") == FILL and mean_fill("beit") == (128, 128, 128)


# --------------------------------------------------------------------------- random erasing


def boxes(erased: torch.Tensor, const: float) -> list[tuple[int, int, int, int] | None]:
    """Per image: the bounding box (top, left, h, w) of pixels that differ from ``const``."""
    out = []
    for img in erased:
        changed = (img != const).any(0)  # [H, W]
        if not changed.any():
            out.append(None)
            continue
        rows, cols = changed.any(1).nonzero()[:, 0], changed.any(0).nonzero()[:, 0]
        t, lft = int(rows[0]), int(cols[0])
        h, w = int(rows[-1]) - t + 1, int(cols[-1]) - lft + 1
        assert changed[t : t + h, lft : lft + w].all()  # one solid box, nothing outside it
        assert changed.sum() == h * w
        out.append((t, lft, h, w))
    return out


def test_random_erasing_one_noise_box_per_image():
    b, hw = 24, 48
    x = torch.full((b, 3, hw, hw), 7.0)
    y = random_erase(x.clone(), 1.0, torch.Generator().manual_seed(0))
    found = boxes(y, 7.0)
    noise = []
    for img, box in zip(y, found, strict=True):
        assert box is not None
        t, lft, h, w = box
        assert h < hw and w < hw
        assert 0.02 * hw * hw * 0.7 <= h * w <= hw * hw / 3 * 1.3  # sides are rounded
        assert 0.3 / 1.5 <= h / w <= 1.5 / 0.3
        noise.append(img[:, t : t + h, lft : lft + w].flatten())
    z = torch.cat(noise)
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.05
    sizes = [h * w for _, _, h, w in found]
    assert len(set(sizes)) > b // 2  # boxes vary


def test_random_erasing_probability_and_seeding():
    x = torch.zeros(200, 3, 16, 16) + 3.0
    gen = torch.Generator().manual_seed(5)
    state = gen.get_state()
    same = random_erase(x.clone(), 0.0, gen)
    assert torch.equal(same, x) and torch.equal(gen.get_state(), state)  # reprob 0: untouched
    a = random_erase(x.clone(), 0.5, torch.Generator().manual_seed(1))
    b = random_erase(x.clone(), 0.5, torch.Generator().manual_seed(1))
    c = random_erase(x.clone(), 0.5, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    erased = np.mean([box is not None for box in boxes(a, 3.0)])
    assert 0.4 < erased < 0.6


def test_classification_loss_erases_in_training_only(photos: dict[str, np.ndarray]):
    from beit_ray.models.build import build_model

    labels = {0: "a", 1: "b", 2: "c"}
    model = build_model("debug", "classification", num_labels=3, id2label=labels).eval()
    tf = ClassifyTransform(32)
    keys = ["chelsea", "coffee", "rocket", "astronaut"]
    pix = torch.from_numpy(np.stack([tf(jpeg_bytes(photos[k]), k) for k in keys]))
    batch = {"pixel_values": pix, "label": torch.tensor([0, 1, 2, 0])}

    def optim(reprob: float) -> OptimConfig:
        return OptimConfig(reprob=reprob, mixup=0.0, cutmix=0.0)  # the recipe's mixup: off here

    def loss(reprob: float, seed: int) -> float:
        task = ClassificationTask(FinetuneConfig(optim=optim(reprob)), {"id2label": labels})
        with torch.no_grad():
            return task.loss(model, batch, torch.Generator().manual_seed(seed))[0].item()

    task = ClassificationTask(FinetuneConfig(optim=optim(0.0)), {"id2label": labels})
    with torch.no_grad():
        logits = model(pixel_values=task.pixels(pix, torch.device("cpu"))).logits
    target = torch.nn.functional.one_hot(batch["label"], 3) * 0.9 + 0.1 / 3
    plain = torch.sum(-target * logits.log_softmax(-1), -1).mean().item()
    assert loss(0.0, 0) == pytest.approx(plain, rel=1e-6)
    assert loss(1.0, 0) == loss(1.0, 0) != pytest.approx(plain, rel=1e-6)
    assert loss(1.0, 0) != loss(1.0, 1)


def test_mixup_and_cutmix_targets_combine_with_label_smoothing_as_timm():
    """timm's Mixup(label_smoothing=s) mixes two smoothed one-hots (off s/n, on 1 - s + s/n)
    with the batch's reverse; ClassificationTask smooths first, then mixes: the same targets.
    BEiT's recipe turns both on (mixup 0.8, cutmix 1.0, smoothing 0.1)."""
    o = FinetuneConfig().optim
    assert (o.mixup, o.cutmix, o.label_smoothing) == (0.8, 1.0, 0.1)
    n, b, s = 5, 4, o.label_smoothing
    y = torch.tensor([0, 3, 1, 4])
    smooth = torch.nn.functional.one_hot(y, n).float() * (1 - s) + s / n  # as the task does
    x = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, 8, 8)  # image i = i

    def timm_target(lam: float) -> torch.Tensor:  # timm.data.mixup.mixup_target
        off, on = s / n, 1 - s + s / n
        y1 = torch.full((b, n), off).scatter_(1, y.view(-1, 1), on)
        y2 = torch.full((b, n), off).scatter_(1, y.flip(0).view(-1, 1), on)
        return y1 * lam + y2 * (1 - lam)

    kinds = set()
    for seed in range(12):
        xm, target = mix(x, smooth, o.mixup, o.cutmix, torch.Generator().manual_seed(seed))
        first = xm[0]  # image 0 (value 0) mixed with image b - 1 (value b - 1)
        if torch.all((first == 0) | (first == b - 1)):  # cutmix: lam = the area kept
            kinds.add("cutmix")
            lam = float((first == 0).float().mean())
        else:  # mixup: 0 · lam + (b - 1) · (1 - lam)
            kinds.add("mixup")
            lam = 1 - float(first.mean()) / (b - 1)
        assert torch.allclose(target, timm_target(lam), atol=1e-6)
        assert torch.allclose(target.sum(-1), torch.ones(b))
    assert kinds == {"mixup", "cutmix"}  # one or the other per batch, even odds
