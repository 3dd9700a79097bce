"""From-scratch init as unilm's: trunc-normal std 0.02 (pretraining truncates at +-1 std), block
l's output projections divided by sqrt(2 l), tokens drawn rather than zero."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import BeitConfig

from beit_ray.models.build import build_from_config, build_model

# std of a normal truncated at +-1 sigma: sqrt(1 - 2 phi(1) / (2 Phi(1) - 1)) = 0.5396
TRUNC1 = math.sqrt(1 - 2 * math.exp(-0.5) / math.sqrt(2 * math.pi) / math.erf(1 / math.sqrt(2)))


def _deep(task: str):
    """12 narrow blocks: per-layer rescales up to l = 12, enough samples per matrix."""
    cfg = BeitConfig(
        hidden_size=64,
        num_hidden_layers=12,
        num_attention_heads=4,
        intermediate_size=256,
        image_size=32,
        patch_size=8,
        vocab_size=256,
        use_mask_token=task == "mim",
        use_shared_relative_position_bias=task == "mim",
        use_relative_position_bias=task != "mim",
        use_mean_pooling=task != "mim",
        num_labels=3,
    )
    return build_from_config(cfg, task, seed=0)


@pytest.mark.parametrize(("task", "expected"), [("mim", 0.02 * TRUNC1), ("classification", 0.02)])
def test_trunc_normal_std_and_per_block_rescale(task, expected):
    model = _deep(task)
    layers = model.beit.layers
    fc1 = torch.cat([layer.mlp.fc1.weight.flatten() for layer in layers])  # 196k samples
    assert fc1.std().item() == pytest.approx(expected, rel=0.02)
    qkv = torch.cat(
        [getattr(layers[0].attention, n).weight.flatten() for n in ("q_proj", "k_proj")]
    )
    assert qkv.std().item() == pytest.approx(expected, rel=0.05)
    if task == "mim":  # unilm's pretraining trunc_normal_ cuts at +-std
        assert fc1.abs().max().item() <= 0.02
        assert model.lm_head.weight.std().item() == pytest.approx(expected, rel=0.05)
    for i, layer in enumerate(layers):
        scale = math.sqrt(2.0 * (i + 1))
        for w in (layer.attention.o_proj.weight, layer.mlp.fc2.weight):
            assert (w.std() * scale).item() == pytest.approx(expected, rel=0.1), (i, w.shape)
        assert layer.mlp.fc1.bias.abs().max() == 0 and layer.attention.q_proj.bias.abs().max() == 0
        # the table starts at zero and lambda at layer_scale_init_value, as in unilm
        table = (
            layer.relative_position_bias or model.beit.shared_position_bias
        ).relative_position_bias_table
        assert table.abs().max() == 0
        assert torch.all(layer.lambda_1 == model.config.layer_scale_init_value)
    assert model.beit.embeddings.cls_token.std().item() > 0.005  # transformers' init: zeros


def test_seeded_init_is_reproducible():
    a, b = build_model("debug", "mim", seed=3), build_model("debug", "mim", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    c = build_model("debug", "mim", seed=4)
    assert not torch.equal(a.beit.layers[0].mlp.fc1.weight, c.beit.layers[0].mlp.fc1.weight)


def test_seed_defaults_to_torch_global_rng():
    torch.manual_seed(11)
    a = build_model("debug", "classification", num_labels=2)
    torch.manual_seed(11)
    b = build_model("debug", "classification", num_labels=2)
    assert torch.equal(a.beit.layers[2].mlp.fc2.weight, b.beit.layers[2].mlp.fc2.weight)


def test_transformers_init_is_still_available():
    model = build_model("debug", "mim")
    plain = build_from_config(model.config, "mim", init="transformers")
    assert plain.beit.embeddings.cls_token.abs().max() == 0  # transformers zeroes the tokens


@pytest.mark.parametrize("source", ["scratch", "checkpoint"])
def test_every_weight_comes_from_the_seed_not_the_order_of_draws(tmp_path, source):
    """Every new tensor, UperNet's heads included, is drawn from the seed: whatever transformers'
    own init draws from the global RNG first (it orders draws otherwise under ZeRO-3), the
    model is the same. From a checkpoint, the new heads likewise."""
    from beit_ray.models.load import build_or_load, export_hf

    init_from = None
    if source == "checkpoint":
        init_from = str(tmp_path / "mim")
        export_hf(build_model("debug", "mim", seed=1), init_from)

    def build(global_seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(global_seed)  # stands in for another order of transformers' draws
        model = build_or_load("debug", "segmentation", init_from=init_from, seed=5, num_labels=4)
        return {k: v.clone() for k, v in model.state_dict().items()}

    a, b = build(0), build(1)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    heads = [k for k in a if k.startswith(("decode_head.", "auxiliary_head.", "fpn."))]
    assert heads and any(a[k].std() > 0 for k in heads if k.endswith("weight"))
