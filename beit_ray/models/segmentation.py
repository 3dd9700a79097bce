"""UperNet taps: which blocks feed BEiT's segmentation neck.

unilm (``beit/semantic_segmentation/backbone/beit.py``) appends the output of block ``i`` (0-based)
for ``i in out_indices = [3, 5, 7, 11]``: blocks 4/6/8/12 of 12, the last block included.
transformers 5's ``BeitForSemanticSegmentation`` reads ``hidden_states[i - 1]`` (index 0 is the
embeddings), so the same numbers feed blocks 2/4/6/10, and no ``out_indices`` transformers accepts
(at most ``num_hidden_layers``) reaches the last block. This module's class reads
``hidden_states[i]``: ``out_indices`` are 1-based block numbers, which is also what
transformers' own ``stage_names`` and ``BeitBackbone`` mean by them. Configs written here carry
``TAPS_KEY`` so a loader knows their ``out_indices`` already are block numbers.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from transformers import BeitForSemanticSegmentation as HFBeitForSemanticSegmentation
from transformers import PretrainedConfig
from transformers.modeling_outputs import SemanticSegmenterOutput
from transformers.utils.generic import can_return_tuple

TAPS_KEY = "beit_ray_taps"
"""Config attribute; ``"blocks"``: ``out_indices`` are 1-based block numbers (read as
``hidden_states[i]``)."""

ForeignTaps = Literal["unilm", "transformers"]


def mark_block_taps(config: PretrainedConfig) -> PretrainedConfig:
    setattr(config, TAPS_KEY, "blocks")
    return config


def has_block_taps(config: PretrainedConfig) -> bool:
    return getattr(config, TAPS_KEY, None) == "blocks"


def block_taps(config: PretrainedConfig, convention: ForeignTaps = "unilm") -> list[int]:
    """The 1-based blocks a config's ``out_indices`` meant when it was trained.

    Marked configs already hold block numbers. Otherwise ``convention`` says who wrote them:
    ``"unilm"``, 0-based block indices (microsoft/beit-*-finetuned-ade-*: converted from unilm
    with its ``[3, 5, 7, 11]`` / ``[7, 11, 15, 23]`` kept, weights trained on blocks 4/6/8/12 and
    8/12/16/24), or ``"transformers"``, trained with transformers' class (block ``i - 1``;
    0 is the embeddings).
    """
    idx = list(config.out_indices or [])
    if has_block_taps(config):
        return idx
    depth = config.num_hidden_layers
    if convention == "unilm":
        taps = [i + 1 for i in idx]
        if any(t > depth for t in taps):
            raise ValueError(
                f"out_indices {idx} are not 0-based block indices of a {depth}-block model; "
                "load with foreign_taps='transformers'"
            )
        return taps
    if convention == "transformers":
        return [i - 1 if i > 0 else depth for i in idx]  # transformers' 0 reads hidden_states[-1]
    raise ValueError(f"unknown taps convention {convention!r}; use 'unilm' or 'transformers'")


def set_block_taps(config: PretrainedConfig, blocks: list[int]) -> PretrainedConfig:
    config.set_output_features_output_indices(out_features=None, out_indices=list(blocks))
    return mark_block_taps(config)


class BeitForSemanticSegmentation(HFBeitForSemanticSegmentation):
    """transformers' BEiT UperNet, fed by the blocks ``config.out_indices`` name (1-based).

    Same name, weights and config as transformers' class; only the taps differ
    (``hidden_states[i]`` instead of ``hidden_states[i - 1]``), so a folder this class saves
    itself would give a transformers user each map from one block earlier. ``export_hf``
    therefore writes transformers' UperNet over a BeitBackbone instead
    (:mod:`beit_ray.models.upernet`), which taps the same blocks.
    """

    @classmethod
    def is_custom_code(cls) -> bool:
        # Same weight names as transformers' class, so the same conversion table: without this
        # transformers would skip its legacy-name renames (fpn1.0 → fpn.fpn1.conv_transpose1...)
        # for a class defined outside transformers, on load and on save.
        return False

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool | None = None,
        **kwargs: Any,
    ) -> SemanticSegmenterOutput:
        if labels is not None and self.config.num_labels == 1:
            raise ValueError("The number of labels should be greater than one")
        outputs = self.beit(
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_hidden_states=True,
            **kwargs,
        )
        hidden = outputs.hidden_states  # depth + 1 of [B, 1 + N, D]; 0 = embeddings
        b, _, h, w = pixel_values.shape
        ph, pw = h // self.config.patch_size, w // self.config.patch_size
        maps = tuple(
            hidden[i][:, 1:].transpose(1, 2).reshape(b, -1, ph, pw)  # [B, D, H/p, W/p]
            for i in self.config.out_indices
        )
        maps = self.fpn(maps)
        logits = self.decode_head(maps)
        aux = self.auxiliary_head(maps) if self.auxiliary_head is not None else None
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits,
                labels,
                ignore_index=self.config.semantic_loss_ignore_index,
                auxiliary_logits=aux,
                auxiliary_loss_weight=self.config.auxiliary_loss_weight,
            )
        want_hidden = (
            output_hidden_states
            if output_hidden_states is not None
            else getattr(self.config, "output_hidden_states", False)
        )
        return SemanticSegmenterOutput(
            loss=loss,
            logits=logits,
            hidden_states=hidden if want_hidden else None,
            attentions=outputs.attentions,
        )
