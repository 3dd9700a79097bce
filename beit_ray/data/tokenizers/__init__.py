"""Visual tokenizers (DALL-E dVAE encoder, fitted codebook) and their Ray Data actor.

tok = load_tokenizer("dalle", "s3://b/dalle_encoder.safetensors")
ids = tok(uint8 [B, 3, T, T])   # int16 [B, g*g]
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import numpy as np


def load_tokenizer(
    kind: str, weights: str, storage_cfg: Any = None, device: str = "cpu"
) -> Callable[[np.ndarray], np.ndarray]:
    """A function uint8 [B, 3, T, T] → int16 token ids [B, g*g], computed on ``device``.

    On CUDA the DALL-E encoder runs under fp16 autocast, as unilm's BEiT runs it in its training
    step (fp16 keeps 3 more mantissa bits than bf16 for the argmax over 8192 logits); uint8
    pixels cross to the GPU (4x fewer bytes than float) and become floats there.
    """
    import torch

    if kind == "dalle":
        from beit_ray.data.tokenizers.dalle import load_encoder

        model: Any = load_encoder(weights, storage_cfg)
    elif kind == "codebook":
        from beit_ray.data.tokenizers.codebook import Codebook

        model = Codebook.load(weights, storage_cfg)
    else:
        raise ValueError(f"unknown tokenizer {kind!r}")
    if model.vocab_size > 32768:
        raise ValueError(f"vocabulary of {model.vocab_size} does not fit int16 token ids")
    dev = torch.device(device)
    if dev.type != "cpu":
        model = model.to(dev)
    autocast = (
        torch.autocast("cuda", dtype=torch.float16)
        if dev.type == "cuda" and kind == "dalle"
        else contextlib.nullcontext()
    )

    def tokenize(pixels: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(pixels)).to(dev, non_blocking=True)
        with torch.inference_mode(), autocast:
            return model.tokenize(x).cpu().numpy().astype(np.int16)

    return tokenize


def actor_device() -> str:
    """cuda when Ray gave this actor a GPU (it sees only its own), else cpu.

    A visible GPU alone is not enough: an actor that asked for none would compete with the one
    that reserved it.
    """
    import ray

    return "cuda" if ray.get_gpu_ids() else "cpu"


def actor_threads() -> int:
    """torch threads for this actor: its CPU reservation rounded up (at least 1).

    Ray's OMP_NUM_THREADS gives a 0.5-CPU actor one thread; that is kept on purpose (the decode
    tasks need the other cores), so a CPU DALL-E pool that should compute faster needs a larger
    data.tokenizer_num_cpus, which then also reserves those cores.
    """
    import ray
    import torch

    # Outside a Ray worker (a local call, a test) asking the runtime context would start Ray.
    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return torch.get_num_threads()
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU") or 1.0
    return max(1, math.ceil(cpus))


class TokenizerActor:
    """Ray Data actor stage: ``tokenizer_pixels`` → ``visual_token_ids`` (int16 [B, N]).

    Runs on the actor's GPU when it holds one (data.tokenizer_num_gpus), else on its CPUs.
    """

    def __init__(self, kind: str, weights: str, st: Any = None, device: str | None = None) -> None:
        import torch

        device = device or actor_device()
        if device == "cpu":
            torch.set_num_threads(actor_threads())
        self.tokenize = load_tokenizer(kind, weights, st, device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels = batch.pop("tokenizer_pixels")  # [B, 3, T, T]
        if len(pixels):
            batch["visual_token_ids"] = self.tokenize(pixels)
        else:
            batch["visual_token_ids"] = np.zeros((0, batch["bool_masked_pos"].shape[1]), np.int16)
        return batch
