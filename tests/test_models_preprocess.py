"""Preprocessor against transformers' own image processors on real photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from beit_ray.models.preprocess import Preprocessor

# preprocessor_config.json of the hub models (values as published), in transformers' 4.x spelling
BEIT_224 = {  # microsoft/beit-base-patch16-224
    "crop_size": 224,
    "do_center_crop": False,
    "do_normalize": True,
    "do_resize": True,
    "image_processor_type": "BeitImageProcessor",
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "resample": 2,
    "size": 224,
}
BEIT_ADE_640 = {  # microsoft/beit-base-finetuned-ade-640-640
    "do_center_crop": False,
    "do_normalize": True,
    "do_resize": True,
    "do_reduce_labels": True,
    "image_processor_type": "BeitImageProcessor",
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "resample": 2,
    "size": 640,
}
VIT_IN21K = {  # google/vit-base-patch16-224-in21k
    "do_normalize": True,
    "do_resize": True,
    "image_processor_type": "ViTImageProcessor",
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "resample": 2,
    "size": 224,
}
IMAGENET_CROP = {  # BeitImageProcessor with shortest-edge resize, bicubic, center crop, ImageNet stats
    "image_processor_type": "BeitImageProcessor",
    "size": {"shortest_edge": 256},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
}


def _hf(cfg: dict):
    from transformers import BeitImageProcessorPil, ViTImageProcessorPil

    cls = (
        ViTImageProcessorPil
        if cfg["image_processor_type"].startswith("ViT")
        else BeitImageProcessorPil
    )
    return cls(**{k: v for k, v in cfg.items() if k != "image_processor_type"})


@pytest.mark.parametrize(
    "cfg",
    [BEIT_224, BEIT_ADE_640, VIT_IN21K, IMAGENET_CROP],
    ids=["beit224", "ade640", "vit21k", "crop"],
)
def test_matches_transformers_processor(photos, cfg):
    ours = Preprocessor.from_dict(cfg)
    theirs = _hf(cfg)
    images = list(photos.values())
    a = ours(images)
    b = theirs(images=images, return_tensors="pt")["pixel_values"]
    assert a.dtype == torch.float32 and a.shape == b.shape
    std = torch.tensor(ours.image_std).view(1, 3, 1, 1)
    assert ((a - b).abs() * std).max() <= 1 / 255 + 1e-6  # ≤ one grey level in pixel units
    assert ((a - b).abs() * std).mean() < 1e-5


def test_uint8_path_and_late_normalisation(photos):
    proc = Preprocessor.from_dict(IMAGENET_CROP)
    img = photos["rocket"]
    u8 = proc.to_uint8(img)
    assert u8.dtype == np.uint8 and u8.shape == (3, 224, 224)
    u8 = torch.from_numpy(u8)
    assert torch.equal(proc.normalize(u8[None])[0], proc([img])[0])
    assert torch.allclose(proc.normalize(u8), proc([img])[0])
    gray = proc.to_uint8(img[..., 0])  # HxW → replicated channels
    assert np.array_equal(gray[0], gray[1])
    with pytest.raises(TypeError):
        proc.to_uint8(img.astype(np.float32))


def test_round_trip_and_from_pretrained(tmp_path):
    proc = Preprocessor.for_model("beit", 64, segmentation=True)
    proc.save(str(tmp_path))
    again = Preprocessor.from_pretrained(str(tmp_path))
    assert again == proc and again.do_reduce_labels
    from transformers import AutoImageProcessor

    hf = AutoImageProcessor.from_pretrained(str(tmp_path))
    assert hf.do_reduce_labels and hf.size["height"] == 64


def test_label_maps():
    seg = np.array([[0, 1, 2], [150, 255, 3]], dtype=np.uint8)
    red = Preprocessor.reduce_labels(seg)
    assert red.tolist() == [[255, 0, 1], [149, 255, 2]]
    theirs = _hf(BEIT_ADE_640).reduce_label(seg.copy())
    assert np.array_equal(red, theirs)
    proc = Preprocessor.from_dict({**BEIT_ADE_640, "size": 4})
    big = np.kron(
        np.arange(4, dtype=np.uint8).reshape(2, 2), np.ones((5, 5), dtype=np.uint8)
    )  # 10x10 blocks
    small = proc.resize_label_map(big)
    assert small.shape == (4, 4) and set(np.unique(small)) <= {
        0,
        1,
        2,
        3,
    }  # nearest: no new classes
    target = proc.label_map(big)
    assert target.dtype == torch.int64 and target.shape == (4, 4)
    assert set(target.unique().tolist()) <= {255, 0, 1, 2}
    assert proc.resize_label_map(big, (20, 20)).shape == (20, 20)
