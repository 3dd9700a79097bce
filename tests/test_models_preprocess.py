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


# --------------------------------------------------------------------------- eval = inference


def test_export_processor_is_beits_eval_transform():
    p = Preprocessor.for_model("beit", 224)  # unilm build_transform: Resize(256, bicubic) + crop
    assert p.size == {"shortest_edge": 256} and p.crop_size == {"height": 224, "width": 224}
    assert p.do_center_crop and p.resample == 3
    assert Preprocessor.for_model("beit", 32).size == {"shortest_edge": 36}  # int(32 / 0.875)
    assert Preprocessor.for_model("beit", 384).size == {"shortest_edge": 384}  # crop_pct 1.0
    assert Preprocessor.for_model("beit", 224, crop_pct=1.0).size == {"shortest_edge": 224}
    seg = Preprocessor.for_model("beit", 64, segmentation=True, crop_pct=0.5)
    assert seg.size == {"height": 64, "width": 64} and not seg.do_center_crop
    with pytest.raises(ValueError, match="crop_pct"):
        Preprocessor.for_model("beit", 224, crop_pct=1.5)


@pytest.mark.parametrize(
    "family, size, crop_pct",
    [("beit", 224, None), ("beit", 384, None), ("beit", 32, None), ("vit", 224, 0.9)],
)
def test_run_eval_labelling_and_transformers_see_the_same_pixels(
    photos, tmp_path, family, size, crop_pct
):
    """The run's eval transform, the labelling job's decode stage (serving calls the same
    ``to_uint8``) and transformers' own processor read from the exported
    preprocessor_config.json give the same pixels, within one level, on real JPEG photos."""
    from conftest import jpeg_bytes
    from PIL import Image
    from transformers import AutoImageProcessor

    from beit_ray.data.augment import ClassifyTransform
    from beit_ray.data.decode import decode_image
    from beit_ray.infer.label import decode_batch

    Preprocessor.for_model(family, size, crop_pct=crop_pct).save(str(tmp_path))
    exported = Preprocessor.from_pretrained(str(tmp_path))
    hf = AutoImageProcessor.from_pretrained(str(tmp_path))
    assert hf.do_center_crop and hf.crop_size["height"] == size
    run_eval = ClassifyTransform(size, train=False, crop_pct=crop_pct)
    mean = torch.tensor(exported.image_mean).view(3, 1, 1)
    std = torch.tensor(exported.image_std).view(3, 1, 1)
    for name in ("chelsea", "coffee", "rocket", "astronaut"):  # portrait, landscape, square
        data = jpeg_bytes(photos[name])
        ours = run_eval(data, name).astype(np.int32)  # [3, S, S]
        labelled = decode_batch([data], [""], exported, 10**8)["pixels"][0].astype(np.int32)
        pv = hf(Image.fromarray(decode_image(data)), return_tensors="pt")["pixel_values"][0]
        theirs = ((pv * std + mean) * 255).round().numpy().astype(np.int32)  # [3, S, S]
        assert ours.shape == labelled.shape == theirs.shape == (3, size, size)
        assert np.array_equal(ours, labelled), name  # one code path: identical
        assert np.abs(ours - theirs).max() <= 1, name
