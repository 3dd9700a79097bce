"""Segmentation data as mmseg's UperNet pipeline: scale from the crop, PhotoMetricDistortion,
padding after normalisation, and the slide test at the training scale (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from beit_ray.data.segmentation import (
    IGNORE,
    pad_normalized,
    photo_metric_distortion,
    rescale_size,
    resize_pair,
    seg_transform,
    segment_logits,
    train_scale,
)


def _pair(h: int = 90, w: int = 120) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    labels = np.zeros((h, w), np.uint8)
    labels[:, w // 2 :] = 1
    labels[: h // 3, : w // 4] = 2
    return image, labels


def test_scale_derives_from_the_crop() -> None:
    assert train_scale(512) == (2048, 512)  # ADE20k's mmseg scale
    assert train_scale(64) == (256, 64)
    assert train_scale(64, (100, 300)) == (300, 100)  # a field, in either order
    # Ratio kept, as large as fits both edge limits (mmcv.rescale_size).
    assert rescale_size(120, 160, (256, 64)) == (64, 85)
    assert rescale_size(100, 1000, (256, 64)) == (26, 256)


def test_training_rescale_follows_the_scale() -> None:
    """With ratio 1 and no crop limit, the rescaled image is exactly the scale's fit."""
    image, labels = _pair(90, 120)
    rng = np.random.default_rng(1)
    _, lab, hw = seg_transform(image, labels, rng, 200, scale=(160, 40), ratio_range=(1, 1))
    assert hw == rescale_size(90, 120, (160, 40)) == (40, 53)
    assert lab.shape == (200, 200) and (lab[40:] == IGNORE).all() and (lab[:, 53:] == IGNORE).all()
    # Ratios 0.5-2.0 of the scale: the short side spans 20-80 (the crop, 200, cuts nothing).
    shorts = []
    for seed in range(30):
        rng = np.random.default_rng(seed)
        _, _, hw = seg_transform(image, labels, rng, 200, scale=(160, 40), photometric=False)
        shorts.append(min(hw))
    assert 20 <= min(shorts) < 30 and 60 < max(shorts) <= 80


def test_photometric_distortion_is_seeded_and_stays_uint8() -> None:
    image, _ = _pair()
    outs = [photo_metric_distortion(image, np.random.default_rng(s)) for s in (3, 3, 4)]
    assert all(o.dtype == np.uint8 and o.shape == image.shape for o in outs)
    np.testing.assert_array_equal(outs[0], outs[1])  # same seed, same pixels
    changed = [
        not np.array_equal(photo_metric_distortion(image, np.random.default_rng(s)), image)
        for s in range(20)
    ]
    assert sum(changed) >= 15  # 1 - 0.5**4 of draws touch something
    assert not np.array_equal(outs[0], outs[2])


def test_photometric_hue_and_saturation_round_trip() -> None:
    """The HSV round trip alone (saturation 1, hue 0) returns the pixels it was given."""
    from beit_ray.data.segmentation import _hsv_to_rgb, _rgb_to_hsv

    image, _ = _pair()
    np.testing.assert_array_equal(_hsv_to_rgb(_rgb_to_hsv(image)), image)
    red = np.array([[[200, 0, 0]]], np.uint8)
    hsv = _rgb_to_hsv(red)
    hsv[..., 0] += 120  # red → green
    np.testing.assert_array_equal(_hsv_to_rgb(hsv), [[[0, 200, 0]]])


def test_padding_after_normalisation() -> None:
    image, labels = _pair(30, 40)  # smaller than the crop at any ratio ≤ 2 of (48, 12)
    pix, lab, hw = seg_transform(
        image, labels, np.random.default_rng(5), 64, scale=(48, 12), ratio_range=(1.5, 1.5)
    )
    h, w = hw
    assert (h, w) == rescale_size(30, 40, (72, 18)) and h < 64 and w < 64
    assert (lab[h:] == IGNORE).all() and (lab[:, w:] == IGNORE).all()
    assert (lab[:h, :w] != IGNORE).all()
    mean = torch.full((1, 3, 1, 1), 127.5)
    x = (torch.from_numpy(pix)[None].float() - mean) / mean  # [1, 3, 64, 64] normalised
    out = pad_normalized(x, torch.tensor([[h, w]], dtype=torch.int32))
    assert (out[..., h:, :] == 0).all() and (out[..., :, w:] == 0).all()  # mmseg's pad_val 0
    torch.testing.assert_close(out[..., :h, :w], x[..., :h, :w])
    # uint8 zeros alone would have normalised to -1 (black), not the mean.
    assert (x[..., h:, :] == -1).all()


def test_slide_test_returns_logits_at_the_original_size() -> None:
    """Rescale to the training scale, slide windows, logits resized to the label map's size."""
    image, labels = _pair(90, 120)
    crop = 16
    size = rescale_size(90, 120, train_scale(crop))  # (48, 64) for (64, 16)
    assert size == (16, 21)
    small, _ = resize_pair(image, None, size)
    x = torch.from_numpy(small.transpose(2, 0, 1).copy())[None].float() / 255  # [1, 3, 16, 21]
    calls: list[tuple[int, ...]] = []

    def forward(v: torch.Tensor) -> torch.Tensor:  # a "model" at 1/4 resolution: 2 classes
        calls.append(tuple(v.shape))
        g = v.mean(1, keepdim=True)[:, :, ::4, ::4]  # [W, 1, 4, 4]
        return torch.cat([g, 1 - g], 1)

    logits = segment_logits(forward, x, crop, 2, labels.shape)
    assert logits.shape == (1, 2, 90, 120)
    assert calls == [(2, 3, 16, 16)]  # two windows (stride 10) in one call
    # A constant image gives constant logits at every original pixel.
    flat = segment_logits(forward, torch.full((1, 3, 16, 21), 0.25), crop, 2, (90, 120))
    torch.testing.assert_close(flat[0, 0], torch.full((90, 120), 0.25))


@pytest.mark.parametrize("hw", [(7, 9), (16, 16)])
def test_slide_test_small_images(hw: tuple[int, int]) -> None:
    x = torch.rand(1, 3, *hw)
    out = segment_logits(lambda v: v[:, :2], x, 16, 2, (hw[0] * 2, hw[1] * 2))
    assert out.shape == (1, 2, hw[0] * 2, hw[1] * 2)


def test_predictor_segments_at_the_training_scale(tmp_path) -> None:
    """A keep-ratio export (size {shortest_edge, longest_edge} = the training scale): the shared
    predictor slides model windows over the rescaled image and masks at the original size,
    as the run's eval (segment_logits) does; a square export still runs one window."""
    from beit_ray.infer.predictor import Predictor
    from beit_ray.models.build import build_model
    from beit_ray.models.load import export_hf
    from beit_ray.models.preprocess import Preprocessor

    torch.manual_seed(0)
    model = build_model("debug", "segmentation", num_labels=3).eval()
    crop = int(model.config.image_size)
    long, short = train_scale(crop)
    keep = str(tmp_path / "keep")
    export_hf(
        model,
        keep,
        id2label={i: str(i) for i in range(3)},
        preprocessor={"size": {"shortest_edge": short, "longest_edge": long}},
    )
    image, _ = _pair(45, 150)
    pred = Predictor(keep, "segment")
    mask = pred.predict([image])[0]["mask"]
    assert mask.shape == (45, 150)

    proc = Preprocessor.from_pretrained(keep)
    small = proc.to_uint8(image)  # [3, h, w]: ratio kept, within the scale
    assert small.shape[1] == short and small.shape[2] > crop  # several windows
    with torch.no_grad():
        ref = segment_logits(
            lambda v: model(pixel_values=v).logits, proc.normalize(small[None]), crop, 3, (45, 150)
        )
    np.testing.assert_array_equal(mask, ref[0].argmax(0).numpy())
    # Images of different sizes in one call (labelling / serving batches).
    other, _ = _pair(60, 40)
    masks = pred.forward([proc.to_uint8(image), proc.to_uint8(other)], [(45, 150), (60, 40)])
    assert [m["mask"].shape for m in masks] == [(45, 150), (60, 40)]
    np.testing.assert_array_equal(masks[0]["mask"], mask)
