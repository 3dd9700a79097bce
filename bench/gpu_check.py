"""One-GPU check of the GPU paths, without Ray (the lent GPU machines have torch, transformers,
safetensors, pyarrow and Pillow; no Ray, no DeepSpeed unless brought along, no network).

Prints, each on its own line (and as JSON with --json):
  - the bf16 matmul rate of this GPU (8192^3, measured here: the roof for the fractions below)
  - the MIM train step (BEiT-base 224, bf16 autocast, fused AdamW): images/s, and its FLOP/s
    (FlopCounterMode) as a fraction of that roof; the fast path with SDPA, with bmm + softmax,
    and transformers' own encoder; optionally the torch.compile'd block (--compile)
  - the DALL-E tokenizer (full encoder, 112 px, fp16 autocast, random weights) in images/s,
    through the same load_tokenizer the Ray Data actors use, and its FLOPs per image
  - the predictor's forward (BEiT-base classification, bf16 weights, batch 64) in images/s
  - a one-rank DeepSpeed ZeRO-2 bf16 engine step, built by beit_ray.train.deepspeed (skipped,
    with a line saying so, when deepspeed is not importable)

    python bench/gpu_check.py                    # on the GPU machine
    .venv/bin/python bench/gpu_check.py --tiny   # anywhere, CPU: tiny flavour, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout

from beit_ray.models.build import build_model  # noqa: E402
from beit_ray.models.mim import masked_slots  # noqa: E402
from beit_ray.models.speed import beit_encoder  # noqa: E402


def timed(fn: Callable[[], Any], iters: int, device: torch.device) -> float:
    """Seconds per call after 2 warm-up calls (synchronised on CUDA)."""
    for _ in range(2):
        fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t0) / iters


def flops_of(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_rate(device: torch.device, n: int, dtype: torch.dtype, iters: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, iters, device)


def mim_step(a: argparse.Namespace, device: torch.device, roof: float, out: dict) -> None:
    model = build_model(a.flavour, "mim").to(device).train()
    cfg = model.config
    n = (cfg.image_size // cfg.patch_size) ** 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, 3, cfg.image_size, cfg.image_size, generator=g).to(device)
    mask = torch.zeros(a.batch, n, dtype=torch.bool)
    mask.scatter_(1, torch.rand(a.batch, n, generator=g).topk(int(0.4 * n), 1).indices, True)
    mask = mask.to(device)
    tokens = torch.randint(0, cfg.vocab_size, (a.batch, n), generator=g).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
    index, _ = masked_slots(mask, int(0.4 * n))  # [B, K]: every image masks exactly K
    rows, labels = index + 1, tokens.gather(1, index).flatten()  # tokens 1.. are the patches

    def step(path: str) -> Callable[[], None]:
        def run() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                if path == "transformers":
                    h = model.beit(x, bool_masked_pos=mask).last_hidden_state[:, 1:][mask]
                else:
                    h = beit_encoder(model.beit, x, mask, rows, sdpa=path == "sdpa").flatten(0, 1)
                logits = model.lm_head(model.layernorm(h))  # [B*K, V]
            loss = torch.nn.functional.cross_entropy(logits.float(), labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return run

    flops = flops_of(step("bmm"))
    paths = ["sdpa", "bmm", "transformers"]
    if a.compile:
        model.beit.beit_ray_compile = True
        paths.append("compiled")
    for path in paths:
        s = timed(step("sdpa" if path == "compiled" else path), a.iters, device)
        out[f"mim_{path}"] = {
            "images_per_s": a.batch / s,
            "fraction_of_bf16_matmul": flops / s / roof,
        }
        print(
            f"MIM train step {a.flavour} {cfg.image_size}px bf16, {path:12s}: "
            f"{a.batch / s:8.1f} images/s, {flops / s / 1e12:7.2f} TFLOP/s = "
            f"{flops / s / roof:.3f} of the bf16 matmul rate",
            flush=True,
        )
    model.beit.beit_ray_compile = False
    out["mim_flops_per_image"] = flops / a.batch


def tokenizer(a: argparse.Namespace, device: torch.device, out: dict) -> None:
    from safetensors.torch import save_file

    from beit_ray.data.tokenizers import load_tokenizer
    from beit_ray.data.tokenizers.dalle import DalleEncoder

    shape = {"group_count": 2, "n_hid": 16, "vocab_size": 64} if a.tiny else {}
    enc = DalleEncoder(**shape)
    size = 16 if a.tiny else 112  # 14 x 14 tokens for BEiT at 224 px
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "dalle.safetensors")
        save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, path)
        tok = load_tokenizer("dalle", path, device=str(device))
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (a.tok_batch, 3, size, size), generator=g, dtype=torch.uint8)
    pixels = pixels.numpy()
    s = timed(lambda: tok(pixels), a.iters, device)
    per_image = flops_of(lambda: enc(torch.rand(1, 3, size, size))) if not a.tiny else 0
    out["dalle"] = {"images_per_s": a.tok_batch / s, "flops_per_image": per_image}
    print(
        f"DALL-E tokenizer {size}px (fp16 autocast on CUDA), batch {a.tok_batch}: "
        f"{a.tok_batch / s:8.1f} images/s, {per_image / 1e9:.1f} GFLOP per image",
        flush=True,
    )


def predictor(a: argparse.Namespace, device: torch.device, out: dict) -> None:
    model = build_model(a.flavour, "classification", num_labels=1000).eval()
    model = model.to(device, torch.bfloat16)
    size = model.config.image_size
    x = torch.randn(a.pred_batch, 3, size, size, device=device, dtype=torch.bfloat16)

    @torch.inference_mode()
    def fwd() -> None:
        model(pixel_values=x).logits.float().softmax(-1).topk(5)

    s = timed(fwd, a.iters, device)
    out["predictor"] = {"images_per_s": a.pred_batch / s}
    print(f"predictor forward bf16, batch {a.pred_batch}: {a.pred_batch / s:8.1f} images/s")


def deepspeed_step(a: argparse.Namespace, device: torch.device, out: dict) -> None:
    try:
        import deepspeed
    except Exception as e:  # noqa: BLE001 - any import failure means "not here"
        print(f"DeepSpeed ZeRO-2 bf16 step: SKIPPED (deepspeed not importable: {e})")
        out["deepspeed"] = None
        return
    from beit_ray.models.layer_decay import param_groups
    from beit_ray.train.config import DeepSpeedConfig, PretrainConfig, ScalingSection
    from beit_ray.train.deepspeed import build_optimizer, deepspeed_config

    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    gpu = device.type == "cuda"
    cfg = PretrainConfig(
        scaling=ScalingSection(num_workers=1, use_gpu=gpu),
        deepspeed=DeepSpeedConfig(micro_batch_size=a.batch, zero_stage=2, precision="bf16"),
    )
    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")
    model = build_model(a.flavour, "mim").to(device).train()
    groups = param_groups(model, lr=1e-4, weight_decay=0.05, layer_decay=1.0)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=build_optimizer(groups, cfg), config=deepspeed_config(cfg)
    )
    from beit_ray.models.mim import mim_forward

    c = model.config
    n = (c.image_size // c.patch_size) ** 2
    x = torch.randn(a.batch, 3, c.image_size, c.image_size, device=device, dtype=torch.bfloat16)
    mask = torch.rand(a.batch, n, device=device) < 0.4
    tokens = torch.randint(0, c.vocab_size, (a.batch, n), device=device)

    def step() -> None:
        loss, _, _ = mim_forward(engine, x, mask, tokens)
        engine.backward(loss)
        engine.step()

    s = timed(step, a.iters, device)
    out["deepspeed"] = {"images_per_s": a.batch / s}
    print(
        f"DeepSpeed ZeRO-2 bf16 engine step (1 rank), batch {a.batch}: {a.batch / s:8.1f} images/s"
    )


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="debug flavour, small batches (CPU / CI)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="also time the torch.compile'd block")
    p.add_argument("--skip-deepspeed", action="store_true")
    p.add_argument("--json", default=None, help="write the figures here")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    a.flavour = "debug" if a.tiny else "base"
    a.batch, a.tok_batch, a.pred_batch = (4, 8, 8) if a.tiny else (64, 256, 64)
    a.iters = min(a.iters, 2) if a.tiny else a.iters
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    }
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    print(f"device: {out['device']}, torch {torch.__version__}", flush=True)
    n = 256 if a.tiny else 8192
    roof = matmul_rate(device, n, torch.bfloat16, a.iters)
    out["bf16_matmul_tflops"] = roof / 1e12
    print(f"bf16 matmul {n}^3: {roof / 1e12:.1f} TFLOP/s", flush=True)
    mim_step(a, device, roof, out)
    tokenizer(a, device, out)
    predictor(a, device, out)
    if a.skip_deepspeed:
        print("DeepSpeed ZeRO-2 bf16 step: SKIPPED (--skip-deepspeed)")
    else:
        deepspeed_step(a, device, out)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
