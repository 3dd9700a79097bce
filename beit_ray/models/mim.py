"""The masked-image-modelling step: the vocabulary head runs on masked positions only.

transformers' ``BeitForMaskedImageModeling`` projects every patch onto the visual vocabulary and
then keeps the masked ones; BEiT masks ~40% of patches, so gathering first saves ~60% of the
head's work (and its [B, N, V] logits). The loss is the same cross-entropy over masked patches.
The encoder runs through :func:`beit_ray.models.speed.beit_encoder` (same function, fewer passes)
whenever :func:`~beit_ray.models.speed.fast_path_ok` allows, else through transformers' module.

Masked patches are gathered at a fixed count per image (BEiT masks a fixed number, 75 of 196;
the block generator may fall short, never over): shapes never depend on the mask, so nothing
waits on the device for a count and a compiled graph is not rebuilt as counts vary. Slots past an
image's own count carry the label -100 and are left out of the loss and the accuracy.

A wrapper (DeepSpeed's engine) must call the model itself, so that its hooks run (ZeRO-3 gathers
parameters, records its prefetch trace and counts micro-steps in them): :func:`masked_only` makes
``model(pixel_values, bool_masked_pos, token_ids=..., num_masked=...)`` this step, keeping the
class, parameters and names transformers' own.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from transformers import BeitForMaskedImageModeling

from beit_ray.models.speed import beit_encoder, fast_path_ok

IGNORE = -100
"""Label of a gathered slot that is not a masked patch (``F.cross_entropy``'s ignore_index)."""


def masked_slots(
    bool_masked_pos: torch.Tensor, num_masked: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(patch index [B, K], is-masked [B, K]): each image's masked patches first, in patch order.

    ``num_masked`` = K, the most any image has (the data's masking count); None reads it from
    the mask (one device-to-host wait). An image with fewer fills its last slots with unmasked
    patches, flagged False.
    """
    if num_masked is None:
        num_masked = int(bool_masked_pos.sum(1).max())
    # A stable sort of 1/0 keys keeps patch order within the masked and the unmasked.
    order = torch.sort(bool_masked_pos.to(torch.uint8), stable=True, dim=1, descending=True).indices
    index = order[:, :num_masked]  # [B, K]
    return index, bool_masked_pos.gather(1, index)


def mim_forward(
    model: BeitForMaskedImageModeling,
    pixel_values: torch.Tensor,
    bool_masked_pos: torch.Tensor,
    token_ids: torch.Tensor,
    num_masked: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, logits [B*K, V], labels [B*K]) for pixels [B, 3, H, W], mask [B, N], tokens [B, N].

    K = ``num_masked`` (see :func:`masked_slots`); labels are -100 on slots that are not masked.
    Call the parts of the model directly only outside a training wrapper; under one, call the
    wrapper (see :func:`masked_only`).
    """
    core = getattr(model, "module", model)
    bool_masked_pos = bool_masked_pos.to(torch.bool)
    index, real = masked_slots(bool_masked_pos, num_masked)  # [B, K]
    if fast_path_ok(core.beit, pixel_values):
        # The loss reads masked patches only, so the last block computes only those rows.
        masked = beit_encoder(core.beit, pixel_values, bool_masked_pos, rows=index + 1)
    else:
        hidden = core.beit(pixel_values, bool_masked_pos=bool_masked_pos).last_hidden_state
        hidden = hidden[:, 1:]  # [B, N, D], CLS dropped
        masked = hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    logits = core.lm_head(core.layernorm(masked)).flatten(0, 1)  # [B*K, V]
    labels = token_ids.gather(1, index).long().masked_fill(~real, IGNORE).flatten()  # [B*K]
    loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE)
    return loss, logits, labels


def masked_only(model: BeitForMaskedImageModeling) -> BeitForMaskedImageModeling:
    """Make ``model(..., token_ids=...)`` run :func:`mim_forward`; returns ``model``.

    Without ``token_ids`` the call is transformers' own forward. Only this instance changes (its
    ``forward`` attribute): checkpoints, ``save_pretrained`` and exports are the plain model.
    """

    def forward(
        self: BeitForMaskedImageModeling,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        token_ids: torch.Tensor | None = None,
        num_masked: int | None = None,
        **kwargs: object,
    ) -> object:
        if token_ids is None:
            return type(self).forward(self, pixel_values, bool_masked_pos, **kwargs)
        return mim_forward(self, pixel_values, bool_masked_pos, token_ids, num_masked)

    model.forward = types.MethodType(forward, model)
    return model


@torch.no_grad()
def mlm_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of masked patches whose visual token is predicted exactly (0-d tensor);
    slots labelled -100 are not counted."""
    valid = labels != IGNORE
    hits = ((logits.argmax(-1) == labels) & valid).sum()
    return hits.float() / valid.sum().clamp(min=1)
