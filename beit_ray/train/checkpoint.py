"""Save, report, resume and consolidate DeepSpeed checkpoints through Ray Train.

Every rank saves its own DeepSpeed shard into a private temp folder and reports it; Ray merges
the ranks' files into one checkpoint folder under ``<storage_path>/<run>/`` and keeps the last K
(plus the best by a score for fine-tuning). Rank 0 adds ``train_state.json`` (step, epoch, data
position). A run started again under the same name resumes from the latest checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

import torch

TAG = "state"
STATE_FILE = "train_state.json"


@dataclass
class TrainState:
    """Where training is: optimizer steps done, data epoch, passes over the dataset done,
    micro-batches consumed in the current pass (a pass may hold several epochs) and the rows of
    the current epoch trained on."""

    step: int = 0
    epoch: int = 0
    passes: int = 0
    micro_in_pass: int = 0
    best: float | None = None
    progress: dict[str, Any] | None = None
    """What of the current epoch every rank has trained on (``plan.EpochProgress.to_json``): a
    resumed epoch skips exactly that."""


def save(engine: Any, state: TrainState, metrics: dict[str, float], rank: int) -> None:
    """Save this rank's shard and report it (a barrier: every rank calls this together)."""
    import ray.train

    tmp = tempfile.mkdtemp(prefix="beit_ckpt_")
    try:
        engine.save_checkpoint(tmp, tag=TAG)
        if rank == 0:
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump(asdict(state), f)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def restore(engine: Any) -> TrainState | None:
    """Load the latest checkpoint of this run into ``engine`` (model, optimizer); None if fresh."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        engine.load_checkpoint(
            d, tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        with open(os.path.join(d, STATE_FILE)) as f:
            return TrainState(**json.load(f))


def read_state(checkpoint_dir: str) -> TrainState:
    with open(os.path.join(checkpoint_dir, STATE_FILE)) as f:
        return TrainState(**json.load(f))


def consolidate(checkpoint_dir: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a merged checkpoint folder, whatever the ZeRO stage."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = os.path.join(checkpoint_dir, TAG)
    if any(
        n.endswith("optim_states.pt") and n.startswith(("zero_pp", "bf16_zero_pp"))
        for n in os.listdir(tag_dir)
    ):
        return get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=TAG)
    # ZeRO-0 keeps the whole model in rank 0's file. It is a pickle, but one this run wrote.
    states = torch.load(
        os.path.join(tag_dir, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False
    )
    return {k: v.float() for k, v in states["module"].items()}
