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
    k = int(mask.sum(1).max())  # a fixed count per image; shorter images pad with -100
    assert logits.shape == (3 * k, 256) and labels.shape == (3 * k,)
    valid = labels != -100
    assert int(valid.sum()) == int(mask.sum()) and torch.equal(labels[valid], tokens[mask])
    assert (logits[valid] - ref.logits[mask]).abs().max() <= 1e-5
    # A larger fixed count (the data's masking count) changes nothing but the padding.
    loss2, logits2, labels2 = mim_forward(model, pixels, mask, tokens, num_masked=k + 3)
    assert labels2.shape == (3 * (k + 3),) and int((labels2 != -100).sum()) == int(mask.sum())
    assert abs(loss2.item() - loss.item()) <= 1e-6


def test_masked_only_forward_goes_through_the_call():
    """A wrapper calls the model: ``model(..., token_ids=)`` is the masked-only step, and the
    model stays transformers' class (plain checkpoints) with its own forward without tokens."""
    from transformers import BeitForMaskedImageModeling

    from beit_ray.models.mim import masked_only

    model = masked_only(build_model("debug", "mim").eval())
    assert type(model) is BeitForMaskedImageModeling
    pixels, mask, tokens = _batch(6)
    calls = []
    model.register_forward_pre_hook(lambda m, a, kw: calls.append(1), with_kwargs=True)
    loss, logits, labels = model(pixel_values=pixels, bool_masked_pos=mask, token_ids=tokens)
    assert calls == [1]  # the module's own call: hooks (DeepSpeed's) run
    assert torch.equal(loss, mim_forward(model, pixels, mask, tokens)[0])
    ref = model(pixel_values=pixels, bool_masked_pos=mask)  # transformers' forward
    assert ref.logits.shape == (3, 16, 256)
    assert "forward" not in "".join(model.state_dict())


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
    valid = labels != -100  # padding slots of images with fewer masked patches
    hits = (logits.argmax(-1) == labels)[valid].float().mean().item()
    assert abs(mlm_accuracy(logits, labels).item() - hits) < 1e-7
    assert mlm_accuracy(logits, logits.argmax(-1).masked_fill(~valid, -100)).item() == 1.0
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
    rows = torch.tensor([[0, 3], [16, 5]])  # token positions per image, a fixed count
    with torch.no_grad():
        picked = torch.stack([ref.detach()[i, rows[i]] for i in range(2)])  # [2, 2, D]
        assert _close(beit_encoder(model, pixels, rows=rows), picked)


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


def test_sdpa_runs_the_fused_cpu_kernel_with_the_bias_as_mask():
    """4-D q/k/v and the relative-position bias as the mask: the CPU flash kernel runs (only
    the flash kernel allowed, and seen in the profile), equal to the bmm + softmax path. A bias
    that needs a gradient has no fused CPU kernel: training on CPU keeps bmm by default."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import profile

    from beit_ray.models.speed import use_sdpa

    model = build_model("debug", "features").eval()  # a bias table per block
    _perturb(model, 9)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = beit_encoder(model, pixels, sdpa=False)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), profile() as prof:
            out = beit_encoder(model, pixels)  # default: SDPA, as no gradient is needed
    ops = {e.name for e in prof.events()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops, sorted(ops)
    assert "aten::_scaled_dot_product_attention_math" not in ops
    assert _close(out, ref)
    bias = torch.zeros(1, 4, 17, 17, requires_grad=True)
    assert not use_sdpa(pixels, bias) and use_sdpa(pixels, bias.detach())


def test_fixed_size_gather_compiles_once_without_graph_breaks():
    """Masked counts that vary from batch to batch (up to the fixed K) give one graph: no
    data-dependent shape, no host read (fullgraph would fail on either), no recompilation."""
    from torch._dynamo.testing import CompileCounter

    model = build_model("debug", "mim").train()
    counter = CompileCounter()
    step = torch.compile(mim_forward, backend=counter, fullgraph=True, dynamic=False)
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        mask = torch.zeros(4, 16, dtype=torch.bool)
        for b in range(4):
            mask[b, torch.randperm(16, generator=g)[: 6 - (b + i) % 3]] = True
        pixels, tokens = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 256, (4, 16))
        loss, _, labels = step(model, pixels, mask, tokens, 6)
        assert int((labels != -100).sum()) == int(mask.sum())
        assert abs(loss.item() - mim_forward(model, pixels, mask, tokens)[0].item()) < 1e-5
    assert counter.frame_count == 1
