"""Layer-wise lr decay groups: unilm's layer ids and the no-weight-decay set."""

from __future__ import annotations

import pytest
import torch

from beit_ray.models.build import build_model
from beit_ray.models.layer_decay import layer_id, param_groups


def _by_name(groups: list[dict]) -> dict[str, dict]:
    return {n: g for g in groups for n in g["param_names"]}


@pytest.mark.parametrize(
    ("flavour", "task"),
    [
        ("debug", "mim"),
        ("debug", "classification"),
        ("debug", "segmentation"),
        ("vit-debug", "classification"),
        ("vit-debug", "features"),
    ],
)
def test_groups_cover_every_parameter_once(flavour, task):
    model = build_model(
        flavour, task, **({"num_labels": 3} if task != "mim" and task != "features" else {})
    )
    groups = param_groups(model, lr=1e-3, weight_decay=0.05, layer_decay=0.65)
    names = [n for g in groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert sum(len(g["params"]) for g in groups) == len(names)
    for g in groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])
        assert g["lr_scale"] == pytest.approx(0.65 ** (4 + 1 - g["layer_id"]))


def test_beit_classification_layers_and_decay():
    model = build_model("debug", "classification", num_labels=3)
    by = _by_name(param_groups(model, lr=1.0, weight_decay=0.05, layer_decay=0.5))
    L = 4
    assert by["beit.embeddings.cls_token"]["layer_id"] == 0
    assert by["beit.embeddings.patch_embeddings.projection.weight"]["layer_id"] == 0
    assert by["beit.layers.0.attention.q_proj.weight"]["layer_id"] == 1
    assert by["beit.layers.3.mlp.fc2.weight"]["layer_id"] == L
    assert (
        by["classifier.weight"]["layer_id"] == L + 1 and by["classifier.weight"]["lr_scale"] == 1.0
    )
    assert by["beit.pooler.layernorm.weight"]["layer_id"] == L + 1
    assert by["beit.embeddings.cls_token"]["lr_scale"] == pytest.approx(0.5**5)
    # weight decay only on matrices / kernels
    for name in (
        "beit.layers.0.attention.q_proj.weight",
        "beit.layers.2.mlp.fc1.weight",
        "classifier.weight",
    ):
        assert by[name]["weight_decay"] == 0.05
    for name in (
        "beit.embeddings.cls_token",
        "beit.layers.0.attention.q_proj.bias",
        "beit.layers.0.layernorm_before.weight",
        "beit.layers.1.lambda_1",
        "classifier.bias",
    ):
        assert by[name]["weight_decay"] == 0.0, name
    # unilm fine-tuning decays the per-block tables unless --disable_weight_decay_on_rel_pos_bias
    table = "beit.layers.1.relative_position_bias.relative_position_bias_table"
    assert by[table]["weight_decay"] == 0.05
    off = _by_name(
        param_groups(model, lr=1.0, weight_decay=0.05, layer_decay=0.5, decay_rel_pos=False)
    )
    assert off[table]["weight_decay"] == 0.0
    assert off["beit.layers.0.attention.q_proj.weight"]["weight_decay"] == 0.05


def test_mim_shared_bias_on_top_and_mask_token_at_bottom():
    model = build_model("debug", "mim")
    by = _by_name(param_groups(model, lr=1.0, weight_decay=0.05, layer_decay=0.9))
    assert by["beit.embeddings.mask_token"]["layer_id"] == 0
    # unilm pretraining: no_weight_decay() = {pos_embed, cls_token}; mask token and the shared
    # relative position table are decayed
    assert by["beit.embeddings.mask_token"]["weight_decay"] == 0.05
    assert by["beit.embeddings.cls_token"]["weight_decay"] == 0.0
    # unilm's get_num_layer_for_vit puts rel_pos_bias with the top layer
    assert by["beit.shared_position_bias.relative_position_bias_table"]["layer_id"] == 5
    assert by["beit.shared_position_bias.relative_position_bias_table"]["weight_decay"] == 0.05
    assert by["lm_head.weight"]["layer_id"] == 5


def test_segmentation_decoder_and_vit_position_embeddings():
    seg = _by_name(
        param_groups(
            build_model("debug", "segmentation", num_labels=5),
            lr=1.0,
            weight_decay=0.1,
            layer_decay=0.9,
        )
    )
    assert seg["decode_head.psp_modules.blocks.0.conv.convolution.weight"]["layer_id"] == 5
    assert seg["fpn.fpn1.conv_transpose1.weight"]["layer_id"] == 5
    assert seg["decode_head.classifier.weight"]["weight_decay"] == 0.1
    vit = _by_name(
        param_groups(
            build_model("vit-debug", "classification", num_labels=2),
            lr=1.0,
            weight_decay=0.1,
            layer_decay=0.9,
        )
    )
    assert vit["vit.embeddings.position_embeddings"]["layer_id"] == 0
    assert vit["vit.embeddings.position_embeddings"]["weight_decay"] == 0.0
    assert vit["vit.layernorm.weight"]["layer_id"] == 5


def test_frozen_params_and_extra_no_decay():
    model = build_model("debug", "classification", num_labels=3)
    model.beit.embeddings.patch_embeddings.projection.weight.requires_grad_(False)
    groups = param_groups(
        model, lr=1.0, weight_decay=0.05, layer_decay=1.0, no_decay_extra=("fc1",)
    )
    by = _by_name(groups)
    assert "beit.embeddings.patch_embeddings.projection.weight" not in by
    assert by["beit.layers.0.mlp.fc1.weight"]["weight_decay"] == 0.0
    assert all(g["lr_scale"] == 1.0 for g in groups)
    assert layer_id("beit.encoder.layer.2.attention.attention.query.weight", 4) == 3  # v4 names


def test_zero3_partition_shapes_decide_weight_decay():
    """A ZeRO-3 partition is a flat [0] tensor; ds_shape (its real shape) decides, not ndim."""
    model = build_model("debug", "classification", num_labels=3)
    weight = model.beit.layers[0].mlp.fc1.weight
    bias = model.beit.layers[0].mlp.fc1.bias
    weight.ds_shape, bias.ds_shape = weight.shape, bias.shape
    weight.data, bias.data = torch.empty(0), torch.empty(0)  # as deepspeed leaves them
    by = _by_name(param_groups(model, lr=1.0, weight_decay=0.05, layer_decay=1.0))
    assert by["beit.layers.0.mlp.fc1.weight"]["weight_decay"] == 0.05
    assert by["beit.layers.0.mlp.fc1.bias"]["weight_decay"] == 0.0
