"""DeepSpeed precisions and offload on CPU, and fine-tuning from an HF MIM folder (pt22k-style).

The engine cases run in one child process (a world-size-1 gloo group), so the test session's
own process never joins a process group; the fine-tuning case is the whole Ray Train path.
"""

from __future__ import annotations

import os
import textwrap

import numpy as np
import pytest
import torch
from conftest import free_port, run_child

from beit_ray.config import build
from beit_ray.train.config import FinetuneConfig
from beit_ray.train.observe import read_metrics
from beit_ray.train.trainer import run_finetuning

pytestmark = pytest.mark.integration

ENGINE_CASES = textwrap.dedent(
    """
    import json, os, sys, torch
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from beit_ray.config import build
    from beit_ray.train.config import PretrainConfig
    from beit_ray.train.loop import build_engine
    from beit_ray.train.tasks import make_task

    deepspeed.init_distributed(dist_backend="gloo")
    from beit_ray.train.checkpoint import consolidate

    cases = [
        {"precision": "bf16", "zero_stage": 0},
        {"precision": "bf16", "zero_stage": 2},
        {"precision": "bf16", "zero_stage": 3},
        # DeepSpeed runs fp16 on a CPU only where oneDNN has fp16 kernels (not on every x86)
        *([{"precision": "fp16", "zero_stage": 2, "initial_scale_power": 8}]
          if get_accelerator().is_fp16_supported() else []),
        {"precision": "fp32", "zero_stage": 2, "offload_optimizer": True},
        {"precision": "fp32", "zero_stage": 3, "offload_optimizer": True, "offload_params": True},
    ]
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (8, 3, 32, 32), dtype=torch.uint8, generator=gen)
    batch = {"pixel_values": x, "bool_masked_pos": torch.rand(8, 16, generator=gen).argsort(1) < 6,  # 6 of 16
             "visual_token_ids": torch.randint(0, 256, (8, 16), generator=gen)}
    out = []
    for case in cases:
        cfg = build(PretrainConfig, {
            "data": {"source": "unused", "tokenizer": "none"}, "scaling": {"num_workers": 1},
            "deepspeed": {"micro_batch_size": 8, **case}, "optim": {"lr": 1e-3},
            "checkpoint": {"storage_path": sys.argv[2], "name": "p"}})
        task = make_task(cfg, {})
        engine = build_engine(cfg, task)
        seen = []  # the dtype the vocabulary head computes in
        engine.module.lm_head.register_forward_hook(lambda m, a, o: seen.append(str(o.dtype)))
        losses = []
        for _ in range(15):
            loss, _ = task.loss(engine, batch, gen)
            engine.backward(loss)
            grad_dtypes = {str(p.grad.dtype) for p in engine.module.parameters() if p.grad is not None}
            engine.step()
            losses.append(loss.item())
        extra = {"compute_dtype": seen[-1], "grad_dtypes": sorted(grad_dtypes)}
        if case["zero_stage"] == 0:  # what a ZeRO-0 run exports: the fp32 master weights
            folder = os.path.join(sys.argv[2], "z0")
            engine.save_checkpoint(folder, tag="state")
            saved = consolidate(folder)
            live = {k: v for k, v in engine.module.state_dict().items() if k in saved}
            extra["export_equal"] = all(torch.equal(saved[k], v) for k, v in live.items())
            extra["export_dtypes"] = sorted({str(v.dtype) for v in saved.values()})
            w = saved["beit.layers.0.mlp.fc1.weight"]
            extra["export_not_bf16"] = bool((w != w.bfloat16().float()).any())
        opt = engine.optimizer
        inner = getattr(opt, "optimizer", opt)
        out.append({**case, "first": losses[0], "last": losses[-1],
                    "module_dtype": str(next(engine.module.parameters()).dtype),
                    "optimizer": type(inner).__name__, **extra,
                    "loss_scale": float(getattr(opt, "cur_scale", getattr(opt, "loss_scale", 0)) or 0)})
        del engine, opt, inner
    print("RESULT " + json.dumps(out))
    """
)


def test_bf16_fp16_and_offload_train_on_cpu(tmp_path) -> None:
    script = tmp_path / "cases.py"
    script.write_text(ENGINE_CASES)
    results = run_child([str(script), str(free_port()), str(tmp_path / "ck")])
    by = {(r["precision"], r["zero_stage"], r.get("offload_params", False)): r for r in results}
    for r in results:
        assert np.isfinite(r["last"]) and r["last"] < r["first"] - 0.5, r  # it learns
    # bf16 is autocast: bf16 matmuls over fp32 parameters, gradients and master weights
    for stage in (0, 2, 3):
        r = by[("bf16", stage, False)]
        assert r["module_dtype"] == "torch.float32" and r["compute_dtype"] == "torch.bfloat16", r
    assert by[("bf16", 0, False)]["grad_dtypes"] == ["torch.float32"]
    z0 = by[("bf16", 0, False)]  # ZeRO-0 exports the fp32 master weights, not bf16-rounded ones
    assert z0["export_equal"] and z0["export_dtypes"] == ["torch.float32"], z0
    assert z0["export_not_bf16"], z0
    fp16 = by.get(("fp16", 2, False))
    if fp16 is not None:  # absent where the CPU has no fp16 kernels (DeepSpeed refuses it)
        assert (
            fp16["module_dtype"] == "torch.float16" and fp16["loss_scale"] >= 1
        )  # dynamic scaling
    for key in (("fp32", 2, False), ("fp32", 3, True)):  # offloaded: DeepSpeed's CPU Adam
        assert by[key]["optimizer"] == "DeepSpeedCPUAdam", by[key]


def save_hf_mim_folder(folder: str) -> dict[str, torch.Tensor]:
    """A pt22k-style folder as transformers writes it: BeitForMaskedImageModeling + processor."""
    from transformers import BeitForMaskedImageModeling

    from beit_ray.models.flavours import model_config
    from beit_ray.models.preprocess import Preprocessor

    torch.manual_seed(1)
    model = BeitForMaskedImageModeling(model_config("debug", "mim"))
    model.save_pretrained(folder)
    Preprocessor.for_model("beit", 32).save(folder)
    return {k: v.clone() for k, v in model.beit.state_dict().items()}


def test_finetune_from_hf_mim_folder_in_bf16(ray_session, tmp_path) -> None:
    """A transformers-written MIM folder → classification fine-tuning in bf16 → HF export."""
    from test_train_finetune import write_digits
    from transformers import BeitForImageClassification

    pretrained = save_hf_mim_folder(str(tmp_path / "beit-debug-pt"))
    cfg = build(
        FinetuneConfig,
        {
            "model": {"init_from": str(tmp_path / "beit-debug-pt")},
            "data": {"source": write_digits(str(tmp_path / "digits")), "rand_augment": ""},
            "val_fraction": 0.2,
            # A tiny layer decay keeps the encoder near the folder's weights (embeddings' lr
            # x 0.05**5), so the test can tell they were loaded; the head learns at full lr.
            "optim": {"lr": 1e-2, "layer_decay": 0.05, "warmup_steps": 5, "reprob": 0.0},
            "deepspeed": {"micro_batch_size": 16, "zero_stage": 2, "precision": "bf16"},
            "run": {"epochs": 2, "log_every": 10},
            "checkpoint": {"storage_path": str(tmp_path / "runs"), "name": "ft-hf", "keep_last": 1},
        },
    )
    result = run_finetuning(cfg)
    records = read_metrics(os.path.join(result.logs_uri, "metrics.jsonl"))
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) >= 4 and all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses  # bf16 training makes progress
    model = BeitForImageClassification.from_pretrained(result.model_uri)
    assert model.config.num_labels == 10 and model.config.id2label[3] == "3"
    # The encoder came from the folder (a fresh init would correlate ~0 with it).
    for name in (
        "embeddings.patch_embeddings.projection.weight",
        "layers.0.attention.q_proj.weight",
    ):
        a = pretrained[name].flatten().float()
        b = model.beit.state_dict()[name].flatten().float()
        assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.95, name
