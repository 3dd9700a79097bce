"""The masked-only MIM step and the fused encoder equal transformers' own model."""

from __future__ import annotations

import torch

from beit_ray.models.build import build_model
from beit_ray.models.mim import mim_forward, mlm_accuracy
from beit_ray.models.speed import beit_encoder, fast_path_ok


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    """Equal up to fp32 summation order: |a - b| <= rel * max|b|."""
    return bool((a - b).abs().max() <= rel * max(b.abs().max().item(), 1e-6))


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every parameter off its init (zero biases, layer scale) so all paths matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


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
    ours = _grads(model)
    model(pixels, bool_masked_pos=mask, labels=tokens[mask]).loss.backward()
    ref = _grads(model)
    assert ours.keys() == ref.keys()
    for n in ref:
        assert _close(ours[n], ref[n]), n


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


def test_fused_step_with_drop_path_matches_transformers():
    """Training mode with drop path: same seed, same draws, same loss and gradients."""
    model = build_model("debug", "mim", drop_path=0.5).train()
    _perturb(model, 3)
    pixels, mask, tokens = _batch(3)
    mask[1, 5:] = True  # images with different masked counts
    assert fast_path_ok(model.beit, pixels)
    torch.manual_seed(7)
    loss, _, _ = mim_forward(model, pixels, mask, tokens)
    loss.backward()
    ours = _grads(model)
    torch.manual_seed(7)
    ref_loss = model(pixels, bool_masked_pos=mask, labels=tokens[mask]).loss
    ref_loss.backward()
    ref = _grads(model)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    assert ours.keys() == ref.keys()
    for n in ref:
        assert _close(ours[n], ref[n]), n
    torch.manual_seed(8)  # other draws drop other samples: the loss changes
    assert mim_forward(model, pixels, mask, tokens)[0].item() != loss.item()


def test_fused_encoder_per_block_bias_and_rows():
    """Fine-tuning layout (a bias per block, no layer scale) and the row-pruned last block."""
    model = build_model("debug", "features", layer_scale=0.0).train()
    _perturb(model, 4)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    ours = beit_encoder(model, pixels)
    ours.square().mean().backward()
    ours_grads = _grads(model)
    ref = model(pixels).last_hidden_state  # [B, 17, D]
    ref.square().mean().backward()
    ref_grads = _grads(model)
    assert _close(ours, ref)
    assert ours_grads.keys() == ref_grads.keys()
    for n in ref_grads:
        assert _close(ours_grads[n], ref_grads[n]), n
    rows = torch.zeros(2, 17, dtype=torch.bool)
    rows[0, [0, 3]] = rows[1, 16] = True
    with torch.no_grad():
        assert _close(beit_encoder(model, pixels, rows=rows), ref.detach()[rows])


def test_falls_back_where_the_fused_path_does_not_apply():
    model = build_model("debug", "mim").train()
    pixels, mask, tokens = _batch(5)
    assert not fast_path_ok(model.beit, torch.randn(3, 3, 48, 48))  # other image size
    model.activation_checkpointing_enable()
    assert fast_path_ok(model.beit, pixels)  # the fused path checkpoints per block too
    loss, _, _ = mim_forward(model, pixels, mask, tokens)
    ref = model(pixels, bool_masked_pos=mask, labels=tokens[mask]).loss
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    dropout = build_model("debug", "mim", hidden_dropout_prob=0.1)
    assert not fast_path_ok(dropout.beit, pixels)
