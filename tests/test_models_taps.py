"""UperNet taps: every flavour feeds the blocks the recipe means, the last one included; foreign
(unilm-converted) segmentation folders load with the taps their weights were trained on."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from beit_ray.models.build import build_from_config
from beit_ray.models.flavours import FLAVOURS, model_config
from beit_ray.models.load import load_model


def _narrow(cfg, image_size: int = 64):
    """The flavour's depth and taps at a CPU-test width (the taps depend on depth only)."""
    cfg = copy.deepcopy(cfg)
    cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads = 32, 64, 2
    cfg.image_size, cfg.auxiliary_channels, cfg.pool_scales = image_size, 16, [1, 2]
    cfg.drop_path_rate = 0.0  # a dropped last block would have no gradient by chance
    return cfg


def _block_outputs_and_maps(model, x):
    """(output of each block, the 4 maps UperNet's neck received) for one forward."""
    blocks, maps = [], []
    hooks = [
        layer.register_forward_hook(lambda m, i, o: blocks.append(o)) for layer in model.beit.layers
    ]
    hooks.append(model.fpn.register_forward_pre_hook(lambda m, args: maps.extend(args[0])))
    out = model(pixel_values=x, labels=torch.zeros(x.shape[0], *x.shape[2:], dtype=torch.long))
    for h in hooks:
        h.remove()
    blocks = [b[0] if isinstance(b, tuple) else b for b in blocks]  # [B, 1 + N, D]
    return out, blocks, maps


def _as_map(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    return tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], -1, grid, grid)


RECIPE = {"debug": [1, 2, 3, 4], "base": [4, 6, 8, 12], "large": [8, 12, 16, 24]}


@pytest.mark.parametrize("flavour", [f for f, v in FLAVOURS.items() if v.family == "beit"])
def test_each_flavour_taps_its_recipe_blocks_and_trains_the_last(flavour):
    cfg = _narrow(model_config(flavour, "segmentation", num_labels=3))
    assert cfg.out_indices == RECIPE[flavour]  # unilm's 0-based [3, 5, 7, 11] → blocks 4/6/8/12
    model = build_from_config(cfg, "segmentation", seed=0).train()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    out, blocks, maps = _block_outputs_and_maps(model, x)
    grid = 64 // cfg.patch_size
    for tap, fmap in zip(cfg.out_indices, maps, strict=True):
        assert torch.equal(fmap, _as_map(blocks[tap - 1], grid)), tap  # block `tap` (1-based)
    out.loss.backward()
    last = model.beit.layers[-1]
    for name, p in last.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"block {len(blocks)} {name}"


def _foreign_ade_folder(tmp_path, out_indices):
    """A folder as microsoft/beit-*-finetuned-ade-* has it: transformers' class, unilm indices."""
    from transformers import BeitConfig
    from transformers import BeitForSemanticSegmentation as HFSeg

    cfg = BeitConfig(
        hidden_size=32,
        num_hidden_layers=12,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=64,
        patch_size=16,
        use_relative_position_bias=True,
        use_mean_pooling=True,
        out_indices=out_indices,
        auxiliary_channels=16,
        pool_scales=[1, 2],
        num_labels=3,
        layer_scale_init_value=0.1,
    )
    hf = HFSeg(cfg).eval()
    hf.save_pretrained(str(tmp_path))
    return hf


def test_unilm_converted_ade_folder_loads_with_its_trained_taps(tmp_path):
    hf = _foreign_ade_folder(tmp_path, [3, 5, 7, 11])
    ours = load_model(str(tmp_path))
    assert ours.config.out_indices == [4, 6, 8, 12]  # unilm's blocks 4/6/8/12 (0-based 3..11)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, blocks, maps = _block_outputs_and_maps(ours, x)
    for tap, fmap in zip([4, 6, 8, 12], maps, strict=True):
        assert torch.equal(fmap, _as_map(blocks[tap - 1], 4))
    # transformers' class on the same folder reads blocks 2/4/6/10 instead (documented)
    with torch.no_grad():
        _, blocks_hf, maps_hf = _block_outputs_and_maps(hf, x)
    for tap, fmap in zip([2, 4, 6, 10], maps_hf, strict=True):
        assert torch.equal(fmap, _as_map(blocks_hf[tap - 1], 4))


def test_transformers_trained_folder_can_keep_its_taps(tmp_path):
    hf = _foreign_ade_folder(tmp_path, [3, 5, 7, 11])
    ours = load_model(str(tmp_path), foreign_taps="transformers")
    assert ours.config.out_indices == [2, 4, 6, 10]
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(pixel_values=x).logits - hf(pixel_values=x).logits).abs().max() <= 1e-5


def test_folders_written_here_keep_their_block_taps(tmp_path):
    from beit_ray.models.build import build_model
    from beit_ray.models.load import export_hf

    model = build_model("debug", "segmentation", num_labels=3).eval()
    export_hf(model, str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["backbone_config"][
        "out_features"
    ] == [
        "stage1",
        "stage2",
        "stage3",
        "stage4",
    ]  # a BeitBackbone's stage i is block i (tests/test_models_upernet.py)
    again = load_model(str(tmp_path))
    assert again.config.out_indices == [1, 2, 3, 4] and again.config.beit_ray_taps == "blocks"
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(pixel_values=x).logits, model(pixel_values=x).logits)
