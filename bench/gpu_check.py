"""One-GPU check of the GPU paths, without Ray (the lent GPU machines have torch, transformers,
safetensors, pyarrow and Pillow; no Ray, no DeepSpeed, no network).

Prints, each on its own line (and as JSON with --json):
  - the bf16 matmul rate of this GPU (8192^3, measured here: the roof for the fractions below)
  - the attention kernel the fast path's SDPA runs (4-D q/k/v, the relative-position bias as
    its mask): asserted to be a fused one (CUDA: memory-efficient or flash; CPU: flash, which
    takes a bias only when it needs no gradient, so the CPU check runs without one)
  - the MIM train step (BEiT-base 224, bf16 autocast, fused AdamW): images/s, and its FLOP/s
    (FlopCounterMode) as a fraction of that roof; the fast path with SDPA, with bmm + softmax,
    and transformers' own encoder; optionally the torch.compile'd block (--compile)
  - the DALL-E tokenizer (full encoder, 112 px, fp16 autocast, random weights) in images/s,
    through the same load_tokenizer the Ray Data actors use, and its FLOPs per image
  - the predictor's forward (BEiT-base classification, bf16 weights, batch 64) in images/s
  - the data feed: BEiT's pretraining transform (decode, crop, two views, mask) of ImageNet-
    sized JPEGs in images/s on one CPU core, and the cores one GPU's step needs at that rate
  - with DeepSpeed (importable, or unpacked from the wheels ``make deepspeed-wheels`` writes to
    wheels/deepspeed, carried to the machine): the job's own MIM step (build_engine + micro_step,
    engine(...)) at ZeRO-2 bf16 on one rank, in images/s; and ZeRO-3 with 2 accumulation steps
    against a plain torch loop on the same batches (beit_ray.train.equivalence, fp32), with the
    step that bypasses the engine as the control the check must tell apart

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


def ensure_deepspeed(folder: str) -> str:
    """Import DeepSpeed, unpacking the wheels in ``folder`` first when it is not installed.
    Returns where it came from; raises ImportError when neither works."""
    try:
        import deepspeed

        return f"installed {deepspeed.__version__}"
    except ImportError:
        if not os.path.isdir(folder):
            raise
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from deepspeed_wheels import unpack

    target = tempfile.mkdtemp(prefix="deepspeed_wheels_")
    unpack(folder, target)
    sys.path.append(target)  # after the machine's own packages: they win where both exist
    import deepspeed

    return f"unpacked {deepspeed.__version__} from {folder}"


def _mim_batch(cfg: Any, batch: int, vocab: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """A batch as the data pipeline gives it: uint8 pixels, exactly K masked patches each."""
    size, n = cfg.data.image_size, cfg.data.grid**2
    k = cfg.data.masking_patches
    return {
        "pixel_values": torch.randint(0, 256, (batch, 3, size, size), generator=g).byte(),
        "bool_masked_pos": torch.rand(batch, n, generator=g).argsort(1) < k,
        "visual_token_ids": torch.randint(0, vocab, (batch, n), generator=g),
    }


def deepspeed_checks(a: argparse.Namespace, device: torch.device, out: dict) -> None:
    """The job's step under DeepSpeed (timed) and ZeRO-3 + accumulation equivalence."""
    try:
        where = ensure_deepspeed(a.wheels)
    except Exception as e:  # noqa: BLE001 - any import failure means "not here"
        print(f"DeepSpeed: SKIPPED (not importable and no usable wheels in {a.wheels}: {e})")
        out["deepspeed"] = None
        return
    import deepspeed

    from beit_ray.config import build
    from beit_ray.train.config import PretrainConfig
    from beit_ray.train.equivalence import TOLERANCE, Cell, run_cell
    from beit_ray.train.loop import build_engine, micro_step
    from beit_ray.train.tasks import make_task

    print(f"DeepSpeed: {where}", flush=True)
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    gpu = device.type == "cuda"
    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")
    tmp = tempfile.mkdtemp(prefix="gpu_check_")
    cfg = build(
        PretrainConfig,
        {
            "model": {"flavour": a.flavour},
            "data": {"source": "unused", "tokenizer": "none"},
            "scaling": {"num_workers": 1, "use_gpu": gpu},
            "deepspeed": {"micro_batch_size": a.batch, "zero_stage": 2, "precision": "bf16"},
            "run": {"max_steps": 1000},
            "checkpoint": {"storage_path": tmp, "name": "gpu-check"},
        },
    )
    task = make_task(cfg, {})
    engine = build_engine(cfg, task)
    vocab = engine.module.config.vocab_size
    batch = _mim_batch(cfg, a.batch, vocab, torch.Generator().manual_seed(0))
    s = timed(lambda: micro_step(engine, task, batch, 1e-4, 0, 0), a.iters, device)
    out["deepspeed"] = {"images_per_s": a.batch / s, "source": where}
    print(
        f"DeepSpeed ZeRO-2 bf16 job step (build_engine + micro_step, engine(...)), 1 rank, "
        f"batch {a.batch}: {a.batch / s:8.1f} images/s",
        flush=True,
    )
    rows = [
        run_cell(Cell("mim", 3, 2, bypass=bypass), 0, 1, None, tmp, use_gpu=gpu)
        for bypass in (False, True)
    ]
    ok, control = rows
    out["zero3_accum_equivalence"] = {"step": ok, "bypass_control": control}
    print(
        f"ZeRO-3, 2 accumulation steps vs a plain loop ({device.type}, fp32): max relative "
        f"parameter difference {ok['rel_diff']:.1e} (tolerance {TOLERANCE:.0e}; initial "
        f"weights {ok['init_diff']:.1e}); the engine-bypassing step: {control['rel_diff']:.1e}",
        flush=True,
    )
    assert ok["init_diff"] == 0.0 and ok["rel_diff"] < TOLERANCE, ok
    assert control["rel_diff"] > 10 * TOLERANCE, control


def attention_kernel(a: argparse.Namespace, device: torch.device, out: dict) -> None:
    """Assert that the fast path's SDPA runs a fused kernel, not the math one."""
    from torch.profiler import profile

    model = build_model(a.flavour, "mim").to(device).train()
    size = model.config.image_size
    x = torch.randn(2, 3, size, size, device=device)
    grad = device.type == "cuda"  # CPU: flash takes the bias only without its gradient
    with torch.set_grad_enabled(grad), profile() as prof:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=grad):
            h = beit_encoder(model.beit, x)
        if grad:
            h.float().square().mean().backward()
    ops = {e.name for e in prof.events() if "scaled_dot_product" in e.name}
    fused = sorted(op for op in ops if "flash" in op or "efficient" in op or "cudnn" in op)
    out["attention_kernel"] = fused
    print(f"attention kernel (4-D SDPA, bias as mask): {', '.join(fused) or 'NONE'}", flush=True)
    assert fused and not any("math" in op for op in ops), sorted(ops)


def data_feed(a: argparse.Namespace, out: dict) -> None:
    """BEiT's pretraining transform on one core, beside the step's rate."""
    import io

    import numpy as np
    from PIL import Image

    from beit_ray.data.augment import PretrainTransform
    from beit_ray.data.config import DataConfig

    cfg = DataConfig(source="unused", tokenizer="none").fit_model(
        32 if a.tiny else 224, 8 if a.tiny else 16
    )
    rng = np.random.default_rng(0)
    images = []
    for _ in range(8 if a.tiny else 32):  # ImageNet-sized photos: smooth fields plus noise
        yy, xx = np.mgrid[0:375, 0:500]
        base = np.stack([np.sin(xx / rng.uniform(20, 80)), np.cos(yy / rng.uniform(20, 80)),
                         np.sin((xx + yy) / rng.uniform(30, 90))], -1)  # fmt: skip
        arr = np.clip(127 + 100 * base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        images.append(buf.getvalue())
    tf = PretrainTransform.from_config(cfg)
    s, t, n = cfg.image_size, cfg.tokenizer_image_size, cfg.grid**2
    bufs = (np.empty((3, s, s), np.uint8), np.empty((3, t, t), np.uint8), np.empty(n, bool))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    reps = 1 if a.tiny else 4
    for r in range(reps):
        for i, img in enumerate(images):
            tf(img, f"img{i}", r, out=bufs)
    per_core = reps * len(images) / (time.perf_counter() - t0)
    torch.set_num_threads(threads)
    step = max(
        (v["images_per_s"] for k, v in out.items() if k.startswith("mim_") and isinstance(v, dict)),
        default=0.0,
    )
    out["data_feed"] = {"images_per_s_per_core": per_core, "cores_per_gpu_step": step / per_core}
    print(
        f"data feed (BEiT pretraining transform, {s}px + {t}px views + mask, 500x375 JPEGs): "
        f"{per_core:.0f} images/s per CPU core; the fastest MIM step here ({step:.0f} images/s) "
        f"needs {step / per_core:.1f} cores",
        flush=True,
    )


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="debug flavour, small batches (CPU / CI)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="also time the torch.compile'd block")
    p.add_argument("--skip-deepspeed", action="store_true")
    p.add_argument("--wheels", default="wheels/deepspeed", help="DeepSpeed wheels to unpack")
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
    attention_kernel(a, device, out)
    mim_step(a, device, roof, out)
    tokenizer(a, device, out)
    predictor(a, device, out)
    data_feed(a, out)
    if a.skip_deepspeed:
        print("DeepSpeed: SKIPPED (--skip-deepspeed)")
    else:
        deepspeed_checks(a, device, out)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
