"""Reading checkpoints: where a model's files are, and their tensors in transformers 5 names.

A Hugging Face folder (config.json + safetensors, sharded or not; a pytorch_model.bin only
through ``torch.load(weights_only=True)``), a beit-ray run (a folder whose ``model/`` holds such
an export, see :data:`RUN_METADATA`), or one unilm weights file (:mod:`beit_ray.models.unilm`);
local or ``s3://``. Nothing here builds a model.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from beit_ray import storage as st
from beit_ray.config import StorageConfig
from beit_ray.models import unilm, upernet
from beit_ray.models.build import model_class

RUN_METADATA = "beit_ray.json"
"""A run folder's metadata file: ``{"model_dir": "model", "task": ..., ...}``; the HF export lives
in ``<run>/<model_dir>`` (default ``model``)."""
UNILM_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
"""A URI ending so is one weights file (unilm layout), not a folder."""


def _has(uri: str, name: str, cfg: StorageConfig | None) -> bool:
    return st.exists(st.join(uri, name), cfg)


def model_dir(uri: str, storage: StorageConfig | None = None) -> str:
    """The folder (URI) holding config.json: ``uri`` itself or a run's export folder."""
    uri = str(uri).rstrip("/")
    if _has(uri, "config.json", storage):
        return uri
    sub = "model"
    if _has(uri, RUN_METADATA, storage):
        meta = json.loads(st.read_text(st.join(uri, RUN_METADATA), storage))
        sub = meta.get("model_dir", sub)
    if _has(st.join(uri, sub), "config.json", storage):
        return st.join(uri, sub)
    raise FileNotFoundError(f"no Hugging Face model (config.json) at {uri} or {st.join(uri, sub)}")


def read_checkpoint(folder: str) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face folder: (sharded) safetensors, else pytorch_model.bin.

    ``.bin`` files are read with ``torch.load(weights_only=True)``: no pickled code runs.
    """
    from safetensors.torch import load_file

    for single, index, reader in (
        ("model.safetensors", "model.safetensors.index.json", load_file),
        ("pytorch_model.bin", "pytorch_model.bin.index.json", _load_bin),
    ):
        if os.path.exists(os.path.join(folder, single)):
            return reader(os.path.join(folder, single))
        if os.path.exists(os.path.join(folder, index)):
            with open(os.path.join(folder, index)) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(reader(os.path.join(folder, shard)))
            return state
    raise FileNotFoundError(
        f"no model.safetensors or pytorch_model.bin (or sharded index) in {folder}"
    )


def _load_bin(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def canonical_state(raw: dict[str, torch.Tensor], shell: nn.Module) -> dict[str, torch.Tensor]:
    """Checkpoint keys renamed to transformers 5 names for ``shell``'s class.

    Uses transformers' own conversion table (v4 / hub names → v5) but not its per-key prefix
    guessing, which swaps ``beit.layernorm`` and ``layernorm`` of BeitForMaskedImageModeling
    (transformers 5.24). A missing or extra base-model prefix is fixed for the whole checkpoint.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(shell)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    state = {
        rename_source_key(k, renamings, converters)[0]: v
        for k, v in raw.items()
        if not k.endswith("relative_position_index")  # v4 buffers; recomputed now
    }
    want, prefix = set(shell.state_dict()), shell.base_model_prefix + "."
    hits = len(want & set(state))
    added = {prefix + k: v for k, v in state.items()}
    stripped = {k.removeprefix(prefix): v for k, v in state.items()}
    best = max(
        (hits, state),
        (len(want & set(added)), added),
        (len(want & set(stripped)), stripped),
        key=lambda t: t[0],
    )
    return best[1]


def read_source(uri: str, storage: StorageConfig | None) -> tuple[PretrainedConfig, dict]:
    """(config, tensors) of a checkpoint: an HF folder, a run, or one unilm weights file."""
    if str(uri).rstrip("/").endswith(UNILM_SUFFIXES) and not _has(uri, "config.json", storage):
        path = str(uri).rstrip("/")
        raw = unilm.unwrap(read_weights_file(path, storage))
        if not unilm.is_unilm(raw):
            raise ValueError(
                f"{uri}: a bare weights file must be in unilm's layout (patch_embed.*, blocks.N.*); "
                "one in transformers' names needs its config.json beside it (a Hugging Face folder)"
            )
        src_cfg, src_task = unilm.config_from_state(raw)
        src_cfg.architectures = [model_class(src_cfg, src_task).__name__]  # type: ignore[arg-type]
        return src_cfg, unilm.to_transformers(raw)
    folder_uri = model_dir(uri, storage)
    tmp = tempfile.mkdtemp(prefix="beit_ray_load_") if st.is_remote(folder_uri) else None
    try:
        folder = st.download_dir(folder_uri, storage, dest=tmp)
        src_cfg = AutoConfig.from_pretrained(folder)
        raw = unilm.unwrap(read_checkpoint(folder))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    if unilm.is_unilm(raw):  # unilm weights saved under an HF config.json
        raw = unilm.to_transformers(raw)
    if upernet.is_upernet(src_cfg):  # our segmentation export: back to our class's names
        src_cfg, raw = upernet.from_upernet(src_cfg, raw)
    return src_cfg, raw


def read_weights_file(path: str, storage: StorageConfig | None) -> Any:
    if path.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        return load_safetensors(st.read_bytes(path, storage))
    if st.is_remote(path):
        return torch.load(io.BytesIO(st.read_bytes(path, storage)), "cpu", weights_only=True)
    return torch.load(st.strip_scheme(path), map_location="cpu", weights_only=True)
