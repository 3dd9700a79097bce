"""The masked-only MIM step equals transformers' own loss."""

from __future__ import annotations

import torch

from beit_ray.models.build import build_model
from beit_ray.models.mim import mim_forward, mlm_accuracy


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(3, 3, 32, 32, generator=g)
    mask = torch.rand(3, 16, generator=g) < 0.4
    mask[:, 0] = True  # at least one masked patch per image
    tokens = torch.randint(0, 256, (3, 16), generator=g)
    return pixels, mask, tokens


def test_loss_equals_transformers():
    model = build_model("debug", "mim").eval()
    pixels, mask, tokens = _batch()
    loss, logits, labels = mim_forward(model, pixels, mask, tokens)
    ref = model(pixels, bool_masked_pos=mask, labels=tokens[mask])
    assert abs(loss.item() - ref.loss.item()) <= 1e-5
    assert logits.shape == (int(mask.sum()), 256) and torch.equal(labels, tokens[mask])
    assert (logits - ref.logits[mask]).abs().max() <= 1e-5


def test_gradients_equal_transformers():
    model = build_model("debug", "mim").train()
    pixels, mask, tokens = _batch(1)
    loss, _, _ = mim_forward(model, pixels, mask, tokens)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model(pixels, bool_masked_pos=mask, labels=tokens[mask]).loss.backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(ours[n], p.grad, atol=1e-6), n


def test_wrapped_model_and_accuracy():
    model = build_model("debug", "mim").eval()
    pixels, mask, tokens = _batch(2)

    class Engine(torch.nn.Module):  # what DeepSpeed / DDP look like: the model under .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    loss, logits, labels = mim_forward(Engine(model), pixels, mask, tokens)
    assert torch.isfinite(loss)
    assert (
        mlm_accuracy(logits, labels).item() == (logits.argmax(-1) == labels).float().mean().item()
    )
    assert mlm_accuracy(logits, logits.argmax(-1)).item() == 1.0
    assert mlm_accuracy(logits[:0], labels[:0]).item() == 0.0
