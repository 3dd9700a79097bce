"""The masked-image-modelling step: the vocabulary head runs on masked positions only.

transformers' ``BeitForMaskedImageModeling`` projects every patch onto the visual vocabulary and
then keeps the masked ones; BEiT masks ~40% of patches, so gathering first saves ~60% of the
head's work (and its [B, N, V] logits). The loss is the same cross-entropy over masked patches.
The encoder runs through :func:`beit_ray.models.speed.beit_encoder` (same function, fewer passes)
whenever :func:`~beit_ray.models.speed.fast_path_ok` allows, else through transformers' module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import BeitForMaskedImageModeling

from beit_ray.models.speed import beit_encoder, fast_path_ok


def mim_forward(
    model: BeitForMaskedImageModeling,
    pixel_values: torch.Tensor,
    bool_masked_pos: torch.Tensor,
    token_ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, logits [M, V], labels [M]) for pixels [B, 3, H, W], mask [B, N] and tokens [B, N].

    ``model`` may be wrapped (DeepSpeed engine, DDP): its ``.module`` is used for the parts.
    """
    core = getattr(model, "module", model)
    bool_masked_pos = bool_masked_pos.to(torch.bool)
    if fast_path_ok(core.beit, pixel_values):
        # The loss reads masked patches only, so the last block computes only those rows.
        rows = F.pad(bool_masked_pos, (1, 0))  # [B, 1+N], CLS not kept
        masked = beit_encoder(core.beit, pixel_values, bool_masked_pos, rows)  # [M, D]
    else:
        hidden = core.beit(pixel_values, bool_masked_pos=bool_masked_pos).last_hidden_state
        masked = hidden[:, 1:][bool_masked_pos]  # [M, D], row-major over (batch, patch)
    logits = core.lm_head(core.layernorm(masked))  # [M, V]
    labels = token_ids[bool_masked_pos].long()  # [M]
    loss = F.cross_entropy(logits.float(), labels)
    return loss, logits, labels


@torch.no_grad()
def mlm_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of masked patches whose visual token is predicted exactly (0-d tensor)."""
    if labels.numel() == 0:
        return torch.zeros((), device=logits.device)
    return (logits.argmax(-1) == labels).float().mean()
