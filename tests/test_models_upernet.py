"""Segmentation exports are transformers' UperNetForSemanticSegmentation over a BeitBackbone:
``AutoModelForSemanticSegmentation`` on an export gives this project's logits (debug, base and
large shapes), transformers' own ``pipeline`` runs on it, and ``load_model`` reads it back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from beit_ray.models.build import build_from_config
from beit_ray.models.flavours import model_config
from beit_ray.models.load import export_hf, load_model
from beit_ray.models.preprocess import Preprocessor
from beit_ray.models.segmentation import set_block_taps

REL_TOL = 1e-4  # of the logits' range


def _randomised(flavour: str, image_size: int, num_labels: int = 5) -> torch.nn.Module:
    """A segmentation model of ``flavour``'s shape (width, heads, MLP, depth, taps), random
    weights made non-trivial: layer-scale lambdas, biases, norms and relative-position tables
    moved off their init (large's 1e-5 lambdas would make every block's output nearly the same,
    and a wrong tap undetectable), BatchNorm running statistics drawn."""
    cfg = model_config(flavour, "segmentation", num_labels=num_labels, image_size=image_size)
    torch.manual_seed(0)
    model = build_from_config(cfg, "segmentation", init="transformers")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim <= 1 or "relative_position" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    return model.eval()


def _upsampled(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Our logits at the input's size (bilinear, align_corners=False: the predictor's upsampling,
    and what transformers' UperNet does inside its forward)."""
    logits = model(pixel_values=x).logits  # [B, C, H/4, W/4]
    return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / (b.max() - b.min()))


# Full shapes (every block, real widths, heads and MLPs), random weights, one forward of two
# 64-pixel images (16 patches of 16 px; debug: 32 px, 16 patches of 8 px): ~5 s for base, ~16 s
# for large (24 × 1024 blocks and a 1024-wide UperNet head, a 1.5 GB export) on 2 cores.
SHAPES = {
    "debug": (32, [1, 2, 3, 4]),
    "base": (64, [4, 6, 8, 12]),
    "large": (64, [8, 12, 16, 24]),
}


@pytest.mark.parametrize("flavour", list(SHAPES))
def test_automodel_on_export_gives_our_logits(tmp_path, flavour):
    from transformers import AutoModelForSemanticSegmentation

    size, taps = SHAPES[flavour]
    ours = _randomised(flavour, size)
    export_hf(ours, str(tmp_path), id2label={i: f"c{i}" for i in range(5)})
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["UperNetForSemanticSegmentation"]
    assert cfg["backbone_config"]["out_features"] == [f"stage{t}" for t in taps]  # block t
    assert cfg["backbone_config"]["add_fpn"] is True

    theirs = AutoModelForSemanticSegmentation.from_pretrained(str(tmp_path)).eval()
    assert type(theirs).__name__ == "UperNetForSemanticSegmentation"
    assert theirs.config.id2label[3] == "c3"
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = _upsampled(ours, x), theirs(pixel_values=x).logits
    assert got.shape == want.shape == (2, 5, size, size)
    rel = _rel(got, want)
    print(f"{flavour}: UperNet export vs ours, max |diff| / range = {rel:.2e}")
    assert rel <= REL_TOL

    again = load_model(str(tmp_path))  # load_model reads the UperNet folder back, exactly
    assert type(again) is type(ours) and again.config.out_indices == taps
    assert again.beit_ray_load_report["newly_initialised"] == []
    with torch.no_grad():
        assert torch.equal(again(pixel_values=x).logits, ours(pixel_values=x).logits)

    # The comparison can tell taps apart: feeding each map from one block earlier (what
    # transformers' BeitForSemanticSegmentation reads) moves the logits beyond the tolerance.
    set_block_taps(again.config, [t - 1 for t in taps])
    with torch.no_grad():
        off = _rel(_upsampled(again, x), want)
    print(f"{flavour}: taps one block earlier, max |diff| / range = {off:.2e}")
    assert off > 10 * REL_TOL


def test_pipeline_runs_on_export(tmp_path, photos):
    """transformers' image-segmentation pipeline with the processor saved beside the model:
    its masks are our model's argmax on transformers' pixels. transformers upsamples twice
    (UperNet to the input, 32 px here, then the processor to the photo), our predictor once,
    from the logits to the photo: a few boundary pixels differ (printed)."""
    from PIL import Image
    from transformers import AutoImageProcessor, pipeline

    from beit_ray.infer.predictor import Predictor

    ours = _randomised("debug", 32)
    export_hf(ours, str(tmp_path), id2label={i: f"c{i}" for i in range(5)})
    image = photos["chelsea"]  # 300 x 451
    out = pipeline("image-segmentation", model=str(tmp_path))(Image.fromarray(image))
    assert out and {o["label"] for o in out} <= {f"c{i}" for i in range(5)}
    theirs = np.full(image.shape[:2], -1, dtype=np.int64)
    for o in out:
        m = np.asarray(o["mask"]) > 0  # a PIL L mask at the photo's size, 255 on the class
        assert m.shape == image.shape[:2]
        theirs[m] = int(o["label"][1:])
    assert (theirs >= 0).all()  # every pixel has one class

    pixels = AutoImageProcessor.from_pretrained(str(tmp_path))(image, return_tensors="pt")
    with torch.no_grad():
        up = _upsampled(ours, pixels["pixel_values"])  # [1, 5, 32, 32]
    ref = F.interpolate(up, size=image.shape[:2], mode="bilinear", align_corners=False)
    assert (theirs == ref[0].argmax(0).numpy()).mean() >= 0.9999

    mine = Predictor(str(tmp_path), "segment").predict([image])[0]["mask"]
    print(f"pipeline vs our predictor on chelsea: {(mine == theirs).mean():.4f} of pixels agree")
    assert (mine == theirs).mean() >= 0.95


def test_keep_ratio_export_runs_in_pipeline(tmp_path, photos):
    """A run's keep-ratio export (size {shortest_edge, longest_edge}) also runs in transformers:
    one forward over the rescaled photo, relative-position tables resized by transformers,
    where our predictor slides training-size windows instead (so masks are close, not equal)."""
    from PIL import Image
    from transformers import pipeline

    ours = _randomised("debug", 32)
    export_hf(ours, str(tmp_path), preprocessor={"seg_scale": (128, 32)})
    proc = Preprocessor.from_pretrained(str(tmp_path))
    assert "shortest_edge" in proc.size
    out = pipeline("image-segmentation", model=str(tmp_path))(Image.fromarray(photos["coffee"]))
    assert out and all(np.asarray(o["mask"]).shape == photos["coffee"].shape[:2] for o in out)


def test_other_upernet_backbones_are_refused(tmp_path):
    from transformers import ConvNextConfig, UperNetConfig

    cfg = UperNetConfig(
        backbone_config=ConvNextConfig(out_features=["stage1", "stage2", "stage3", "stage4"])
    )
    cfg.architectures = ["UperNetForSemanticSegmentation"]
    cfg.save_pretrained(str(tmp_path))
    from safetensors.torch import save_file

    save_file(
        {"decode_head.classifier.weight": torch.zeros(1)}, str(tmp_path / "model.safetensors")
    )
    with pytest.raises(ValueError, match="only BEiT backbones"):
        load_model(str(tmp_path))
