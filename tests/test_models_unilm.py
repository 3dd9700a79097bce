"""unilm checkpoints (the BEiT paper's .pth layout) load with equal outputs; loads that would
leave the encoder random are refused in every format."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from beit_ray.models.build import build_model
from beit_ray.models.load import export_hf, load_model


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def to_unilm(state: dict[str, torch.Tensor], mim: bool) -> dict[str, torch.Tensor]:
    """transformers 5 names → unilm's (the inverse of transformers' conversion script)."""
    out: dict[str, torch.Tensor] = {}
    top = {
        "beit.embeddings.cls_token": "cls_token",
        "beit.embeddings.mask_token": "mask_token",
        "beit.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "beit.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "beit.shared_position_bias.relative_position_bias_table": (
            "rel_pos_bias.relative_position_bias_table"
        ),
        "beit.pooler.layernorm.weight": "fc_norm.weight",
        "beit.pooler.layernorm.bias": "fc_norm.bias",
        "classifier.weight": "head.weight",
        "classifier.bias": "head.bias",
        "lm_head.weight": "lm_head.weight",
        "lm_head.bias": "lm_head.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    block = {
        "layernorm_before": "norm1",
        "layernorm_after": "norm2",
        "lambda_1": "gamma_1",
        "lambda_2": "gamma_2",
        "attention.q_proj.bias": "attn.q_bias",
        "attention.v_proj.bias": "attn.v_bias",
        "attention.o_proj": "attn.proj",
        "relative_position_bias.relative_position_bias_table": "attn.relative_position_bias_table",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = re.match(r"^beit\.layers\.(\d+)\.(.+)$", key)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            if rest.endswith("_proj.weight") and rest[10] in "qkv" and "o_proj" not in rest:
                qkv.setdefault(i, {})[rest[10]] = value
                continue
            for src, dst in block.items():
                if rest.startswith(src):
                    out[f"blocks.{i}.{dst}{rest[len(src) :]}"] = value.clone()
                    break
            else:
                raise AssertionError(key)
        elif key in top:
            out[top[key]] = value.clone()
        elif key == "beit.layernorm.weight" or key == "beit.layernorm.bias":
            assert mim, key  # unilm's pretraining model has one final norm: the head's
        else:
            raise AssertionError(key)
    for i, parts in qkv.items():
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([parts["q"], parts["k"], parts["v"]])
        out[f"blocks.{i}.attn.relative_position_index"] = torch.zeros(17, 17, dtype=torch.long)
    return out


def _mim():
    model = _randomise(build_model("debug", "mim"))
    with torch.no_grad():  # unilm has no second norm inside the encoder: keep it the identity
        model.beit.layernorm.weight.fill_(1.0)
        model.beit.layernorm.bias.zero_()
    return model


def test_unilm_pretraining_pth_loads_with_equal_outputs(tmp_path):
    model = _mim()
    path = tmp_path / "beit_debug_pt.pth"
    torch.save({"model": to_unilm(model.state_dict(), mim=True), "epoch": 3}, path)
    ours = load_model(str(path))
    assert type(ours).__name__ == "BeitForMaskedImageModeling"
    assert ours.config.num_hidden_layers == 4 and ours.config.image_size == 32
    report = ours.beit_ray_load_report
    # transformers' MIM model normalises twice (encoder + head); unilm's norm is the head's, the
    # encoder's stays at weight 1 / bias 0, where a second LayerNorm is the identity (up to eps)
    assert report["unused"] == []
    assert report["newly_initialised"] == ["beit.layernorm.bias", "beit.layernorm.weight"]
    g = torch.Generator().manual_seed(0)
    x, mask = torch.randn(2, 3, 32, 32, generator=g), torch.rand(2, 16, generator=g) < 0.4
    with torch.no_grad():
        a = ours(x, bool_masked_pos=mask).logits
        b = model(x, bool_masked_pos=mask).logits
    assert (a - b).abs().max() <= 1e-6
    # fine-tuning from it, as unilm: shared table copied into every block
    clf = load_model(str(path), "classification", num_labels=5)
    assert len(clf.beit_ray_load_report["copied"]) == 4
    assert clf.beit_ray_load_report["encoder_missing_share"] < 0.01  # only the pooler norm


def test_unilm_finetuned_pth_under_module_key(tmp_path):
    model = _randomise(build_model("debug", "classification", num_labels=6))
    path = tmp_path / "beit_debug_ft.pth"
    torch.save({"module": to_unilm(model.state_dict(), mim=False)}, path)
    ours = load_model(str(path))
    assert type(ours).__name__ == "BeitForImageClassification" and ours.config.num_labels == 6
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(x).logits - model(x).logits).abs().max() <= 1e-6


def test_unilm_weights_beside_an_hf_config(tmp_path):
    """A .pth saved as pytorch_model.bin next to a config.json is converted, not ignored."""
    model = _mim()
    export_hf(model, str(tmp_path))
    (tmp_path / "model.safetensors").unlink()
    torch.save({"model": to_unilm(model.state_dict(), mim=True)}, tmp_path / "pytorch_model.bin")
    ours = load_model(str(tmp_path))
    x = torch.randn(1, 3, 32, 32)
    mask = torch.zeros(1, 16, dtype=torch.bool)
    with torch.no_grad():
        assert (
            ours(x, bool_masked_pos=mask).logits - model(x, bool_masked_pos=mask).logits
        ).abs().max() <= 1e-6


def test_load_that_leaves_the_encoder_random_raises(tmp_path):
    model = build_model("debug", "classification", num_labels=3)
    export_hf(model, str(tmp_path / "hf"))
    # HF folder whose tensors carry names nothing maps (another library's layout)
    state = {f"model.encoder.{k}": v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(ValueError, match="holds only 0% of the encoder"):
        load_model(str(tmp_path / "hf"))
    # a unilm-layout file missing most blocks
    partial = {
        k: v
        for k, v in to_unilm(model.state_dict(), mim=False).items()
        if not k.startswith(("blocks.1.", "blocks.2.", "blocks.3."))
    }
    partial["blocks.3.mlp.fc1.weight"] = torch.zeros(128, 64)  # depth still reads as 4
    torch.save({"model": partial}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="mostly random"):
        load_model(str(tmp_path / "partial.pth"))
    # a bare file in transformers' names has no config to build from
    torch.save(model.state_dict(), tmp_path / "hf_names.pth")
    with pytest.raises(ValueError, match="config.json"):
        load_model(str(tmp_path / "hf_names.pth"))
    # mmseg's {"state_dict": {"backbone.…"}} is not a unilm classification/MIM checkpoint
    torch.save({"state_dict": {"backbone.cls_token": torch.zeros(1, 1, 64)}}, tmp_path / "seg.pth")
    with pytest.raises(ValueError, match="not a state dict"):
        load_model(str(tmp_path / "seg.pth"))
