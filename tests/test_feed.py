"""The feed model (beit_ray/feed.py): its FLOP counts are FlopCounterMode's on the real modules,
and its verdicts say what the pool must be, or to tokenize ahead, as the plan prints them."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from beit_ray import feed, plan
from beit_ray.config import parse_args
from beit_ray.train.config import PretrainConfig


def counted(fn) -> int:  # noqa: ANN001
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_mim_step_flops_are_flop_counter_mode_on_the_train_step():
    """Forward + backward of mim_forward, masked rows only in the last block and the head.
    (BEiT-base 224 gives 104.09 GFLOP both ways too; it takes minutes on 2 cores.)"""
    from beit_ray.models.build import build_model
    from beit_ray.models.mim import mim_forward

    model = build_model("debug", "mim", seed=0, drop_path=0.0).train()
    c = model.config
    n = (c.image_size // c.patch_size) ** 2
    m = 6
    x = torch.randn(2, 3, c.image_size, c.image_size)
    mask = torch.zeros(2, n, dtype=torch.bool)
    mask[:, :m] = True
    tokens = torch.randint(0, c.vocab_size, (2, n))

    def step() -> None:
        loss, _, _ = mim_forward(model, x, mask, tokens)
        loss.backward()

    assert counted(step) == 2 * feed.mim_step_flops("debug", masked=m)
    # Resolution and mask count move it as the shapes say (attention grows as tokens²).
    assert feed.mim_step_flops("base", 448) > 4 * feed.mim_step_flops("base", 224)
    assert feed.mim_step_flops("base", masked=100) > feed.mim_step_flops("base", masked=75)


def test_tokenizer_flops_are_flop_counter_mode_on_the_encoders():
    from beit_ray.data.tokenizers.codebook import Codebook
    from beit_ray.data.tokenizers.dalle import DalleEncoder

    with torch.device("meta"):  # the full encoder, counted from shapes without computing
        full = DalleEncoder()
        assert counted(lambda: full(torch.rand(1, 3, 112, 112))) == feed.dalle_flops(112)
    tiny = DalleEncoder(group_count=2, n_hid=16, vocab_size=64)
    assert counted(lambda: tiny(torch.rand(3, 3, 16, 16))) == 3 * feed.dalle_flops(16, 16, 2, 2, 64)
    assert 52e9 < feed.dalle_flops(112) < 52.2e9  # the "52 GFLOP per image"

    book = Codebook(torch.randn(256, 3 * 8 * 8 + 3), grid=4)
    pixels = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    assert counted(lambda: book.tokenize(pixels)) == 5 * feed.codebook_flops(32, 4, 256)


def test_the_feed_module_imports_neither_ray_nor_torch():
    code = (
        "import sys, beit_ray.feed; print(sorted({'ray', 'torch', 'deepspeed'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def cfg(*args: str) -> PretrainConfig:
    base = ["--model.flavour", "base", "--data.source", "s3://b/in", "--data.tokenizer", "dalle"]
    return parse_args(PretrainConfig, [*base, *args])


GPU8 = ("--scaling.use_gpu", "true", "--scaling.num_workers", "8", "--scaling.gpu_kind", "H100")


def test_eight_h100_trainers_want_half_a_gpu_of_dalle_each():
    f = feed.estimate(
        cfg(*GPU8, "--data.tokenizer_num_gpus", "0.25", "--data.tokenizer_actors", "[2,8]")
    )
    step = feed.mim_step_flops("base")
    assert f.train_rate == pytest.approx(8 * 0.4 * 989e12 / step)
    assert f.decode_cores == pytest.approx(f.train_rate / feed.CPU_DECODE_IMAGES_PER_CORE)
    # DALL-E costs half a MIM step: ~4 GPUs of actors for 8 trainers, 17 quarter-GPU actors.
    assert 4.0 <= f.tokenizer_gpus_needed <= 4.25 and f.actors_needed == 17
    assert not f.ok and "data.tokenizer_actors [2,17]" in f.verdict
    ok = feed.estimate(
        cfg(*GPU8, "--data.tokenizer_num_gpus", "0.25", "--data.tokenizer_actors", "[8,20]")
    )
    assert ok.ok and ok.verdict.startswith("the pool is enough (17 of at most 20")
    # More GPUs than the cluster has: tokenize once ahead.
    short = feed.estimate(
        cfg(*GPU8, "--data.tokenizer_num_gpus", "0.25", "--data.tokenizer_actors", "[8,20]"), gpus=8
    )
    assert (
        not short.ok and "jobs/tokenize_shards.py" in short.verdict and "--shards" in short.verdict
    )
    # The card scales the rates: an A10G trains at 70/989 of an H100's images/s.
    a10 = feed.estimate(cfg(*GPU8[:-1], "A10G"))
    assert a10.train_rate / ok.train_rate == pytest.approx(70 / 989)
    assert feed.estimate(cfg(*GPU8[:4])).train_on.endswith("scaling.gpu_kind unset)")


def test_cpu_dalle_for_gpu_training_and_the_runs_without_a_tokenizer_stage():
    cpu = feed.estimate(cfg(*GPU8, "--data.tokenizer_num_gpus", "0"))
    assert not cpu.ok and cpu.tokenizer_gpus == 0 and "use GPU actors" in cpu.verdict
    assert cpu.actors_needed > 10_000  # ~1 image/s per core for 30k images/s
    shards = feed.estimate(cfg(*GPU8, "--shards", "s3://b/shards"))
    assert shards.ok and shards.actors_needed == 0 and "shards" in shards.verdict
    assert shards.decode_cores == 0  # shards hold decoded views: parquet reads only
    laptop = feed.estimate(cfg())
    assert laptop.ok and laptop.lines() == [
        "  feed     training on CPU: the model step, not the feed, sets the pace"
    ]


def test_the_dry_run_plan_says_the_feed_and_the_verdict():
    lines = plan.pretrain(
        cfg(*GPU8, "--data.tokenizer_num_gpus", "0.25", "--data.tokenizer_actors", "[2,8]",
            "--ray.address", "ray://head:10001")
    )  # fmt: skip
    text = "\n".join(lines)
    feed_line = next(x for x in lines if x.startswith("  feed "))
    assert "8 × H100" in feed_line and "30.4k images/s" in feed_line and "CPU cores" in feed_line
    tokens = next(x for x in lines if x.startswith("  tokens "))
    assert "dalle on 0.25-GPU actors" in tokens and "data.tokenizer_actors [2,17]" in tokens
    assert "tokenizer actors 2-8 × 0.5 CPU + 0.25 GPU" in text and "8.5 GPUs" in text


def test_gpu_kind_is_checked_naming_the_field():
    with pytest.raises(ValueError, match=r"scaling.gpu_kind.*H100, H200, A100, A10G, L4"):
        cfg("--scaling.gpu_kind", "V100")
