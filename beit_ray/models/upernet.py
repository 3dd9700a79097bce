"""Segmentation exports as transformers' ``UperNetForSemanticSegmentation`` over a ``BeitBackbone``.

transformers' ``BeitForSemanticSegmentation`` feeds UperNet ``hidden_states[i - 1]``, one block
earlier than this project trains (:mod:`beit_ray.models.segmentation`), so a folder saved as that
class gives a transformers user other masks. transformers' UperNet reads a backbone's stages by
name: a ``BeitBackbone``'s ``stage{i}`` is the output of block ``i``, and with ``add_fpn`` it runs
the same neck (``BeitFPNNeck``). Its head is the same UperNet as BEiT's (PSP + FPN, bilinear,
``align_corners=False``) under other module names, and it upsamples the logits to the input's
size, as our predictor does before the argmax. So the export is that class, taps at the trained
blocks, and the same tensors renamed:

    ours (BeitForSemanticSegmentation)          UperNetForSemanticSegmentation
    beit.* / fpn.*                              backbone.beit.* / backbone.fpn.*
    decode_head.psp_modules.blocks.i.conv.*     decode_head.psp_modules.i.1.*
    decode_head.psp_bottleneck.*                decode_head.bottleneck.*
    *_head...convolution / normalization        *_head...conv / batch_norm

In memory, models stay this project's class (training, layer decay and the predictor read
``model.beit``); the conversion happens on export and on load only.
"""

from __future__ import annotations

import copy
import re

import torch
from transformers import BeitConfig, PretrainedConfig, UperNetConfig

from beit_ray.models.segmentation import TAPS_KEY, has_block_taps, set_block_taps

ARCHITECTURE = "UperNetForSemanticSegmentation"

# (ours, transformers' UperNet) name patterns, applied in order; conv / norm renames touch
# only the tensor's own module (``[^.]+$``), not a parent called ``conv``.
_RENAMES: list[tuple[str, str]] = [
    (r"^beit\.", "backbone.beit."),
    (r"^fpn\.", "backbone.fpn."),
    (r"^decode_head\.psp_modules\.blocks\.(\d+)\.conv\.", r"decode_head.psp_modules.\1.1."),
    (r"^decode_head\.psp_bottleneck\.", "decode_head.bottleneck."),
    (r"^((?:decode|auxiliary)_head\..*)\.convolution\.([^.]+)$", r"\1.conv.\2"),
    (r"^((?:decode|auxiliary)_head\..*)\.normalization\.([^.]+)$", r"\1.batch_norm.\2"),
]
_BACK: list[tuple[str, str]] = [
    (r"^backbone\.beit\.", "beit."),
    (r"^backbone\.fpn\.", "fpn."),
    (r"^decode_head\.psp_modules\.(\d+)\.1\.", r"decode_head.psp_modules.blocks.\1.conv."),
    (r"^decode_head\.bottleneck\.", "decode_head.psp_bottleneck."),
    (r"^((?:decode|auxiliary)_head\..*)\.conv\.([^.]+)$", r"\1.convolution.\2"),
    (r"^((?:decode|auxiliary)_head\..*)\.batch_norm\.([^.]+)$", r"\1.normalization.\2"),
]
# Head settings both configs hold under the same name.
_HEAD_KEYS = (
    "pool_scales",
    "use_auxiliary_head",
    "auxiliary_loss_weight",
    "auxiliary_channels",
    "auxiliary_num_convs",
    "auxiliary_concat_input",
)


def _rename(key: str, table: list[tuple[str, str]]) -> str:
    for pattern, repl in table:
        key = re.sub(pattern, repl, key)
    return key


def is_upernet(config: PretrainedConfig) -> bool:
    return getattr(config, "model_type", None) == "upernet"


def to_upernet(
    config: PretrainedConfig, state: dict[str, torch.Tensor]
) -> tuple[UperNetConfig, dict[str, torch.Tensor]]:
    """(UperNet config, its state dict) of one of our segmentation models' (config, state)."""
    if not has_block_taps(config):
        raise ValueError("expected a config whose out_indices are block numbers (beit_ray_taps)")
    backbone = copy.deepcopy(config)
    if hasattr(backbone, TAPS_KEY):
        delattr(backbone, TAPS_KEY)  # a BeitBackbone's stage i *is* block i: nothing to mark
    backbone.add_fpn, backbone.reshape_hidden_states = True, True
    backbone.architectures = None
    backbone.set_output_features_output_indices(
        out_features=None, out_indices=list(config.out_indices)
    )
    upernet = UperNetConfig(
        backbone_config=backbone,
        hidden_size=config.hidden_size,  # BEiT's UperNet head is as wide as the encoder
        auxiliary_in_channels=None,  # the neck's third map (in_index 2), as BEiT's FCN head
        loss_ignore_index=config.semantic_loss_ignore_index,
        initializer_range=config.initializer_range,
        id2label=dict(config.id2label),
        label2id=dict(config.label2id),
        **{k: copy.deepcopy(getattr(config, k)) for k in _HEAD_KEYS},
    )
    upernet.pool_scales = list(upernet.pool_scales)
    upernet.architectures = [ARCHITECTURE]
    return upernet, {_rename(k, _RENAMES): v for k, v in state.items()}


def from_upernet(
    config: PretrainedConfig, state: dict[str, torch.Tensor]
) -> tuple[BeitConfig, dict[str, torch.Tensor]]:
    """(our segmentation config with block taps, state in our names) of a BEiT UperNet folder."""
    backbone = config.backbone_config
    if backbone is None or backbone.model_type != "beit":
        kind = getattr(backbone, "model_type", None)
        raise ValueError(f"UperNet over a {kind} backbone: only BEiT backbones load here")
    if not backbone.add_fpn or len(backbone.out_indices or []) != 4:
        raise ValueError(
            "UperNet over a BeitBackbone without add_fpn and 4 out_features is not BEiT's "
            f"UperNet (add_fpn={backbone.add_fpn}, out_features={backbone.out_features})"
        )
    if config.hidden_size != backbone.hidden_size:
        raise ValueError(
            f"UperNet head width {config.hidden_size} != BEiT width {backbone.hidden_size}: "
            "BEiT's UperNet head is as wide as the encoder"
        )
    aux_in = config.auxiliary_in_channels
    if config.use_auxiliary_head and aux_in not in (None, backbone.hidden_size):
        raise ValueError(f"auxiliary_in_channels {aux_in} != BEiT width {backbone.hidden_size}")
    beit = copy.deepcopy(backbone)
    beit.add_fpn = False
    for key in _HEAD_KEYS:
        setattr(beit, key, copy.deepcopy(getattr(config, key)))
    beit.semantic_loss_ignore_index = config.loss_ignore_index
    beit.id2label = {int(k): v for k, v in config.id2label.items()}
    beit.label2id = {v: k for k, v in beit.id2label.items()}
    set_block_taps(beit, list(backbone.out_indices))  # stage i = hidden_states[i] = block i
    beit.architectures = ["BeitForSemanticSegmentation"]
    return beit, {_rename(k, _BACK): v for k, v in state.items()}
