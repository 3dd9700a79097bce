"""Fast checks of the training layer's pure parts: config validation, the DeepSpeed config,
the lr schedule, mixup/cutmix, sliding-window inference and the segmentation metrics."""

from __future__ import annotations

import json

import pytest
import torch

from beit_ray.config import ConfigError, build
from beit_ray.train.config import FinetuneConfig, PretrainConfig
from beit_ray.train.deepspeed import build_optimizer, deepspeed_config
from beit_ray.train.loop import lr_at
from beit_ray.train.tasks import mix, segmentation_metrics, slide_logits


def pretrain(**tree: dict) -> PretrainConfig:
    return build(PretrainConfig, tree)


def test_data_sizes_follow_the_model_and_bad_values_name_the_field() -> None:
    cfg = pretrain(data={"source": "x"})
    assert (cfg.data.image_size, cfg.data.patch_size, cfg.data.grid) == (32, 8, 4)
    base = pretrain(model={"flavour": "base"}, data={"source": "x", "tokenizer": "dalle"})
    assert (base.data.image_size, base.data.tokenizer_image_size) == (224, 112)
    with pytest.raises(ConfigError, match="data.image_size"):
        pretrain(
            data={"source": "x", "image_size": 64, "patch_size": 8, "tokenizer_image_size": 64}
        )
    with pytest.raises(ConfigError, match="deepspeed.offload_params"):
        pretrain(deepspeed={"zero_stage": 2, "offload_params": True})
    with pytest.raises(ConfigError, match="scaling.cpus_per_worker"):
        pretrain(scaling={"cpus_per_worker": 0})
    with pytest.raises(ConfigError, match="model.flavour"):
        build(FinetuneConfig, {"task": "segmentation", "model": {"flavour": "vit-debug"}})


def test_the_data_seed_follows_the_run_seed_unless_set(tmp_path) -> None:
    """One --run.seed changes every draw of a run (listing shuffle, read order, crops, flips,
    masks), as the HF Trainer's unset data_seed; data.seed set keeps the data fixed."""
    from beit_ray.config import replace, save_config
    from beit_ray.data.config import TokenizeConfig

    assert pretrain(data={"source": "x"}, run={"seed": 4}).data.seed == 4
    fixed = pretrain(data={"source": "x", "seed": 2}, run={"seed": 4})
    assert fixed.data.seed == 2
    ft = build(FinetuneConfig, {"data": {"source": "x"}, "run": {"seed": 7}})
    assert ft.data.seed == 7
    # resolved once: the saved config and a copy say the seed the run used, explicitly
    save_config(ft, str(tmp_path / "config.yaml"))
    assert "seed: 7" in (tmp_path / "config.yaml").read_text().split("data:")[1]
    assert replace(ft, run__log_every=5).data.seed == 7
    assert build(TokenizeConfig, {"input": "x", "output": "y"}).data.seed == 0


def test_every_rank_micro_batch_and_seed_draws_its_own_drop_path() -> None:
    """Stochastic depth draws from torch's global generator: seeded per (run seed, step, rank,
    micro-batch), so a run's seed fixes it too (unseeded, each worker started from OS entropy)."""
    from beit_ray.models.build import build_model
    from beit_ray.train.loop import seed_micro_step

    model = build_model("debug", "classification", num_labels=3, seed=0, drop_path=0.5).train()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def out(*at: int) -> torch.Tensor:
        seed_micro_step(*at)
        with torch.no_grad():
            return model(pixel_values=x).logits

    ref = out(0, 3, 0, 0)
    assert torch.equal(ref, out(0, 3, 0, 0))  # a resumed run draws the same
    for other in ((0, 3, 1, 0), (0, 3, 0, 1), (0, 4, 0, 0), (1, 3, 0, 0)):
        assert not torch.allclose(ref, out(*other)), other
    a, b = seed_micro_step(0, 3, 0, 0), seed_micro_step(0, 3, 0, 1)
    assert not torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


def test_deepspeed_config_from_the_dataclass_with_raw_override(tmp_path) -> None:
    cfg = pretrain(
        deepspeed={
            "micro_batch_size": 4,
            "grad_accum_steps": 3,
            "zero_stage": 3,
            "offload_params": True,
            "precision": "fp16",
        },
        scaling={"num_workers": 2},
    )
    ds = deepspeed_config(cfg)
    assert ds["train_batch_size"] == 24 and ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 3.0
    assert (
        ds["zero_optimization"]["stage"] == 3
        and ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    )
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0 and not ds["bf16"]["enabled"]
    assert "optimizer" not in ds and "scheduler" not in ds  # ours: layer-decay AdamW, lr per step
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"overlap_comm": True}, "steps_per_print": 7}))
    over = deepspeed_config(pretrain(deepspeed={"override": str(path), "zero_stage": 2}))
    zero = over["zero_optimization"]
    assert (
        zero["stage"] == 2
        and zero["overlap_comm"] is True
        and zero["reduce_bucket_size"] == 50_000_000
    )
    assert over["steps_per_print"] == 7


def test_lr_scales_with_batch_warms_up_and_decays_to_min() -> None:
    cfg = pretrain(
        deepspeed={"micro_batch_size": 64}, scaling={"num_workers": 32}, optim={"warmup_steps": 10}
    )
    assert cfg.peak_lr == pytest.approx(1.5e-3)  # 2048 = the reference batch
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1.5e-4) and lrs[9] == pytest.approx(1.5e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lr_at(100, 100, cfg) == pytest.approx(1e-5)
    groups = [
        {
            "params": [torch.nn.Parameter(torch.ones(2))],
            "lr_scale": 0.5,
            "weight_decay": 0.0,
            "param_names": ["w"],
        }
    ]
    opt = build_optimizer(groups, cfg)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["lr_scale"] == 0.5


def test_mixup_and_cutmix_keep_target_mass_and_are_seeded() -> None:
    x = torch.arange(4 * 3 * 8 * 8, dtype=torch.float32).view(4, 3, 8, 8)
    t = torch.eye(4)
    for kw in ({"mixup": 0.8, "cutmix": 0.0}, {"mixup": 0.0, "cutmix": 1.0}):
        a = mix(x, t, gen=torch.Generator().manual_seed(1), **kw)
        b = mix(x, t, gen=torch.Generator().manual_seed(1), **kw)
        torch.testing.assert_close(a[0], b[0])
        torch.testing.assert_close(a[1].sum(-1), torch.ones(4))
        assert not torch.equal(a[0], x)


def test_sliding_windows_cover_the_image_and_miou() -> None:
    x = torch.randn(2, 3, 20, 27)
    calls = []

    def forward(w: torch.Tensor) -> torch.Tensor:  # logits = the first channel's mean per window
        calls.append(w.shape[0])
        return w[:, :1].mean((2, 3), keepdim=True).expand(-1, 2, 4, 4)

    out = slide_logits(forward, x, crop=12, num_classes=2)
    assert out.shape == (2, 2, 20, 27) and len(calls) == 1  # one call: ZeRO-3 ranks stay in step
    conf = torch.tensor([[8.0, 2.0], [0.0, 10.0]])
    m = segmentation_metrics(conf)
    assert m["pixel_acc"] == pytest.approx(0.9)
    assert m["miou"] == pytest.approx((8 / 10 + 10 / 12) / 2)


def test_progress_line_shows_once_under_ray_trains_patched_print(tmp_path, capfd) -> None:
    """Ray Train workers patch ``print``; with Ray's wrapped sys.stdout it wrote each line twice."""
    import builtins
    import io
    import logging
    import sys

    from ray.train.v2._internal.logging.patch_print import redirected_print

    from beit_ray.train.observe import Observer

    obs = Observer(str(tmp_path / "logs"), 0)
    obs.step({"loss": 2.5}, images=8, data_wait=0.0)
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.__stdout__)  # Train's console handler, in short
    root.addHandler(handler)
    old_print, old_stdout, old_level = builtins.print, sys.stdout, root.level
    root.setLevel(logging.INFO)
    wrapped = io.TextIOWrapper(open(1, "wb", closefd=False), write_through=True)  # noqa: SIM115
    builtins.print, sys.stdout = redirected_print, wrapped  # as in a worker: fd 1, another object
    try:
        obs.log(1, 0, 10)
    finally:
        builtins.print, sys.stdout = old_print, old_stdout
        root.removeHandler(handler)
        root.setLevel(old_level)
        obs.close()
    out = capfd.readouterr().out
    assert out.count("step 1/10") == 1, out
    assert "loss 2.5" in out


SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "is_nonzero")
"""aten ops that read a tensor's values on the host (.item(), bool(), data-dependent shapes);
indexing with a boolean mask (``index`` with a bool index) is one too."""


@pytest.mark.parametrize("task_name", ["mim", "classification", "segmentation"])
def test_a_training_step_reads_nothing_back_from_the_device(task_name) -> None:
    """The task's forward + loss + metrics and the backward run no op that waits for the
    device (on a GPU each would stall the step): metrics stay tensors until a logging step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from beit_ray.train.equivalence import Cell, cell_config, extra_of, make_batches
    from beit_ray.train.tasks import make_task

    class Record(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            name = func.overloadpacket.__name__
            if name == "index" and any(
                getattr(i, "dtype", None) == torch.bool for i in (args[1] if len(args) > 1 else [])
            ):
                name = "index (boolean mask)"
            self.ops.append(name)
            return func(*args, **(kwargs or {}))

    cell = Cell(task_name, 0, 1)
    cfg = cell_config(cell, 1, None, "unused")
    task = make_task(cfg, extra_of(cell))
    torch.manual_seed(0)
    model = task.build(None).train()
    batch = make_batches(cfg, task_name)[0]
    gen = torch.Generator().manual_seed(0)
    task.loss(model, batch, gen)  # MIM checks the mask count once, on its first batch
    with Record() as rec:
        loss, metrics = task.loss(model, batch, gen)
        loss.backward()
    synced = [op for op in rec.ops if op in SYNC_OPS or op == "index (boolean mask)"]
    assert not synced, synced
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in metrics.values()), metrics
