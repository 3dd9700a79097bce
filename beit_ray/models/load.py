"""Load models from Hugging Face folders or beit-ray runs, and export them back.

``load_model`` reads a Hugging Face-format folder, a beit-ray run or a unilm weights file, local
or ``s3://`` (:mod:`beit_ray.models.checkpoint`). It can load
a checkpoint into another task, as BEiT fine-tuning does (microsoft/unilm
``beit/run_class_finetuning.py``): encoder weights kept, the shared relative position bias copied
into every block's own table, a new classification head scaled by ``init_scale`` = 0.001, and
position information resized when the image size changes (:mod:`beit_ray.models.posembed`).
What was not taken from the checkpoint is logged and left on ``model.beit_ray_load_report``; a
load that would leave most encoder weights at their random init raises instead.

Segmentation models are exported as transformers' ``UperNetForSemanticSegmentation`` over a
``BeitBackbone`` tapping the trained blocks (:mod:`beit_ray.models.upernet`); such folders load
back into our class. ``out_indices`` of ``BeitForSemanticSegmentation`` configs not written here
are read as unilm's 0-based block indices, as microsoft/beit-*-finetuned-ade-* hold them
(:mod:`beit_ray.models.segmentation`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import shutil
import tempfile
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from beit_ray import storage as st
from beit_ray.config import StorageConfig
from beit_ray.models import upernet
from beit_ray.models.build import MODEL_CLASSES, build_from_config, model_class
from beit_ray.models.checkpoint import RUN_METADATA as RUN_METADATA  # re-exported
from beit_ray.models.checkpoint import canonical_state, read_source
from beit_ray.models.checkpoint import model_dir as model_dir  # re-exported
from beit_ray.models.flavours import TASKS, Task
from beit_ray.models.init import OWN_INIT, Gather, transformers_value
from beit_ray.models.posembed import current_image_size, resize_model, resize_state_dict
from beit_ray.models.preprocess import Preprocessor
from beit_ray.models.segmentation import (
    ForeignTaps,
    block_taps,
    has_block_taps,
    set_block_taps,
)

log = logging.getLogger(__name__)

MAX_MISSING_ENCODER = 0.5
"""Refuse a load whose checkpoint lacks more than this share of the encoder's weights (numel)."""
HEAD_INIT_SCALE = 1e-3
"""unilm's ``--init_scale``: a new classification head starts at 0.001 × trunc_normal(0.02)."""

_ARCH_TASK: dict[str, Task] = {cls.__name__: task for (_, task), cls in MODEL_CLASSES.items()}
_ARCH_TASK[upernet.ARCHITECTURE] = "segmentation"  # our segmentation exports (models/upernet.py)


# ---------------------------------------------------------------------------- configs


def task_of(config: PretrainedConfig) -> Task:
    """The task a checkpoint was saved for, from ``config.architectures`` (features if unknown)."""
    for arch in config.architectures or ():
        if arch in _ARCH_TASK:
            return _ARCH_TASK[arch]
    if config.architectures:
        raise ValueError(
            f"unsupported architecture {config.architectures}; known: {sorted(_ARCH_TASK)}"
        )
    return "features"


def _default_out_indices(depth: int) -> list[int]:
    # BEiT's UperNet taps blocks 4, 6, 8, 12 of 12 (and 8, 12, 16, 24 of 24)
    picks = [depth // 3, depth // 2, 2 * depth // 3, depth]
    if len(set(picks)) < 4 or picks[0] < 1:
        picks = [max(1, round(depth * k / 4)) for k in (1, 2, 3, 4)]
    return picks


def target_config(
    source: PretrainedConfig,
    source_task: Task,
    task: Task,
    *,
    image_size: int | None = None,
    num_labels: int | None = None,
    id2label: dict[int, str] | None = None,
    drop_path: float | None = None,
) -> PretrainedConfig:
    """The config of ``source`` turned into a model for ``task`` (BEiT fine-tuning settings).

    ``drop_path`` replaces the checkpoint's stochastic depth rate (unilm fine-tuning sets its own).
    """
    cfg = copy.deepcopy(source)
    if cfg.model_type == "vit" and task not in ("classification", "features"):
        raise ValueError(f"ViT checkpoints support classification and features, not {task}")
    if cfg.model_type == "beit" and task != source_task:
        if task in ("classification", "segmentation"):
            cfg.use_mask_token = False
            cfg.use_mean_pooling = True
            if cfg.use_shared_relative_position_bias:
                cfg.use_shared_relative_position_bias = False
                cfg.use_relative_position_bias = True
        if task == "segmentation":
            if len(cfg.out_indices or []) != 4 or not has_block_taps(cfg):
                set_block_taps(cfg, _default_out_indices(cfg.num_hidden_layers))
            cfg.semantic_loss_ignore_index = 255
        if task == "mim":
            cfg.use_mask_token = True
    if id2label:
        id2label = {int(k): str(v) for k, v in id2label.items()}
        if num_labels is not None and num_labels != len(id2label):
            raise ValueError(f"num_labels={num_labels} but id2label has {len(id2label)} entries")
        cfg.id2label, cfg.label2id = id2label, {v: k for k, v in id2label.items()}
    elif num_labels is not None and num_labels != cfg.num_labels:
        cfg.num_labels = num_labels
    if image_size is not None:
        cfg.image_size = int(image_size)
    if drop_path is not None:
        cfg.drop_path_rate = float(drop_path)
    cfg.architectures = [model_class(cfg, task).__name__]
    return cfg


# ---------------------------------------------------------------------------- loading


def _split(model: nn.Module, state: dict[str, Any]) -> tuple[str, dict, dict]:
    """(prefix, encoder keys without prefix, head keys) of a task model's state dict."""
    prefix = model.base_model_prefix
    if not hasattr(model, prefix):  # the bare encoder (BeitModel / ViTModel)
        return "", dict(state), {}
    enc = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
    head = {k: v for k, v in state.items() if not k.startswith(prefix + ".")}
    return prefix + ".", enc, head


def _new_head(shape: torch.Size, is_bias: bool, generator: torch.Generator) -> torch.Tensor:
    if is_bias:
        return torch.zeros(shape)
    weight = torch.empty(shape)
    nn.init.trunc_normal_(weight, std=0.02, generator=generator)
    return weight * HEAD_INIT_SCALE


def _shell(config: PretrainedConfig, task: Task) -> nn.Module:
    """The model on the meta device: names and shapes without memory or init."""
    with torch.device("meta"):
        return model_class(config, task)._from_config(
            copy.deepcopy(config), attn_implementation="sdpa"
        )


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], zero3: bool) -> None:
    """Copy ``state`` into ``model``, per top-level child so no key is ever re-prefixed."""
    if not zero3:
        result = model.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise KeyError(f"unexpected keys {result.unexpected_keys}")
        return
    # transformers' ZeRO-3 loader gathers each module's partitioned params, loads, re-partitions
    from transformers.integrations.deepspeed import _load_state_dict_into_zero3_model

    for name, child in model.named_children():
        sub = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")}
        if sub:
            errors, _ = _load_state_dict_into_zero3_model(child, sub)
            if errors:
                raise RuntimeError(f"loading {name}: {errors}")


def _refuse_random_encoder(uri: str, report: dict[str, Any]) -> None:
    """Raise when the checkpoint held too little of the encoder: a wrong file, not a model."""
    share = report["encoder_missing_share"]
    if share > MAX_MISSING_ENCODER:
        raise ValueError(
            f"{uri}: the checkpoint holds only {1 - share:.0%} of the encoder's weights; loading "
            f"it would leave the model mostly random. Missing e.g. {report['missing'][:4]}; "
            f"unused checkpoint names e.g. {report['unused'][:4]}. Expected a Hugging Face folder "
            "(transformers BEiT/ViT names), a beit-ray run, or a unilm BEiT .pth"
        )


def load_model(
    uri: str,
    task: Task | None = None,
    *,
    storage: StorageConfig | None = None,
    image_size: int | None = None,
    num_labels: int | None = None,
    id2label: dict[int, str] | None = None,
    zero3_config: dict[str, Any] | None = None,
    seed: int = 0,
    drop_path: float | None = None,
    foreign_taps: ForeignTaps = "unilm",
) -> nn.Module:
    """A transformers model for ``task`` (default: the checkpoint's) from a folder or URI.

    ``uri`` is a Hugging Face folder, a beit-ray run, or one unilm weights file (``.pth``...).
    ``image_size`` resizes position information; ``num_labels``/``id2label`` size a new head;
    ``drop_path`` replaces the checkpoint's stochastic depth rate; ``foreign_taps`` says how to
    read 4 ``out_indices`` of a config not written here ("unilm": 0-based blocks, as
    microsoft/beit-*-finetuned-ade-*; "transformers": trained with transformers' own class).
    ``zero3_config`` (a DeepSpeed config dict with ZeRO stage 3) partitions weights as they are
    created and loaded. ``seed`` drives the new head's initialisation. The model is returned in
    eval mode with ``model.beit_ray_load_report``: {"source_task", "task", "missing",
    "newly_initialised", "copied", "resized", "unused"} (names in the returned model, except
    "unused": checkpoint names).
    """
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    src_cfg, raw = read_source(uri, storage)
    src_task = task_of(src_cfg)
    if src_task == "segmentation" and not has_block_taps(src_cfg):
        # e.g. microsoft/beit-*-finetuned-ade-*: tap the blocks its weights were trained on
        set_block_taps(src_cfg, block_taps(src_cfg, foreign_taps))
    source = canonical_state(raw, _shell(src_cfg, src_task))
    del raw
    task = task or src_task
    cfg = target_config(
        src_cfg,
        src_task,
        task,
        image_size=image_size,
        num_labels=num_labels,
        id2label=id2label,
        drop_path=drop_path,
    )
    state, report = _target_state(source, src_cfg, src_task, cfg, task, seed)
    del source
    _refuse_random_encoder(uri, report)

    zero3 = zero3_config is not None and zero3_config.get("zero_optimization", {}).get("stage") == 3
    # Every weight comes from ``state``: skip the random initialisation it would overwrite
    # (0.7 s of BEiT-base's 1 s load; non-persistent buffers are still computed).
    complete = all(k in state for k in report["missing"] + report["newly_initialised"])
    from transformers.initialization import no_init_weights

    with no_init_weights() if complete and not zero3 else contextlib.nullcontext():
        model = build_from_config(cfg, task, zero3_config=zero3_config, init="transformers")
    keep_alive = None
    if zero3:  # transformers sees ZeRO-3 through a weakref to the newest HfDeepSpeedConfig
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(zero3_config)
    _load_into(model, state, zero3)
    del keep_alive
    model.beit_ray_load_report = report  # type: ignore[assignment]
    if report["newly_initialised"] or report["copied"] or report["resized"]:
        log.info(
            "loaded %s (%s) as %s: new %s; copied %s; resized %s; unused %s",
            uri,
            src_task,
            task,
            report["newly_initialised"],
            report["copied"],
            report["resized"],
            report["unused"],
        )
    return model.eval()


def _target_state(
    source: dict[str, torch.Tensor],
    src_cfg: PretrainedConfig,
    src_task: Task,
    cfg: PretrainedConfig,
    task: Task,
    seed: int,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The target model's state dict built from the source checkpoint, and the load report."""
    shell = _shell(cfg, task)
    shell_state = shell.state_dict()  # meta tensors: names, shapes, dtypes
    want = {k: v.shape for k, v in shell_state.items()}
    t_prefix, _, _ = _split(shell, dict.fromkeys(want))
    s_prefix, s_enc, s_head = _split(_shell(src_cfg, src_task), source)
    shared_key = "shared_position_bias.relative_position_bias_table"

    state: dict[str, torch.Tensor] = {}
    missing, copied, used = [], [], set()
    for key in want:
        is_enc = key.startswith(t_prefix) if t_prefix else True
        rel = key[len(t_prefix) :] if is_enc else key
        pool = s_enc if is_enc else (s_head if task == src_task else {})
        if rel in pool:
            state[key] = pool[rel]
            used.add(("enc" if is_enc else "head", rel))
        elif (
            is_enc
            and rel.endswith("relative_position_bias.relative_position_bias_table")
            and shared_key in s_enc
        ):
            # unilm fine-tuning: every block's own table starts from the shared one
            missing.append(key)
            state[key] = s_enc[shared_key].clone()
            copied.append(key)
            used.add(("enc", shared_key))
        else:
            missing.append(key)

    resized: list[str] = []
    src_size, dst_size = current_image_size(src_cfg), current_image_size(cfg)
    if src_size != dst_size:
        state, resized = resize_state_dict(state, cfg.patch_size, dst_size)

    generator = torch.Generator().manual_seed(seed)
    new: list[str] = [k for k in missing if k not in copied]
    for key in list(state):
        if state[key].shape != want[key]:  # e.g. a head for another number of labels
            del state[key]
            new.append(key)
    std = getattr(cfg, "initializer_range", 0.02) or 0.02
    for key in want:
        if key in state:
            continue
        if key.startswith("classifier."):
            state[key] = _new_head(want[key], key.endswith("bias"), generator)
        elif t_prefix and not key.startswith(t_prefix) and key.split(".")[0] not in OWN_INIT:
            # a new UperNet head: drawn here, so its values do not depend on the ZeRO stage
            owner, _, name = key.rpartition(".")
            state[key] = transformers_value(
                shell.get_submodule(owner), name, want[key], generator, std
            ).to(shell_state[key].dtype)
    enc_keys = [k for k in want if (k.startswith(t_prefix) if t_prefix else True)]
    enc_total = sum(math.prod(want[k]) for k in enc_keys)
    enc_absent = sum(math.prod(want[k]) for k in enc_keys if k not in state)
    unused = [s_prefix + k for k in s_enc if ("enc", k) not in used]
    unused += [k for k in s_head if ("head", k) not in used]
    report = {
        "source_task": src_task,
        "task": task,
        "missing": sorted(missing),
        "newly_initialised": sorted(set(new)),
        "copied": sorted(copied),
        "resized": sorted(resized),
        "unused": sorted(unused),
        "encoder_missing_share": enc_absent / max(1, enc_total),
    }
    return state, report


# ---------------------------------------------------------------------------- export


def _task_of_model(model: nn.Module) -> Task:
    for (_, task), cls in MODEL_CLASSES.items():
        if type(model) is cls:
            return task
    raise ValueError(f"cannot export a {type(model).__name__}")


def export_hf(
    model: nn.Module,
    out_dir: str,
    *,
    id2label: dict[int, str] | None = None,
    image_size: int | None = None,
    storage: StorageConfig | None = None,
    image_mean: list[float] | None = None,
    image_std: list[float] | None = None,
    preprocessor: dict[str, Any] | None = None,
) -> None:
    """Write config.json, model.safetensors and preprocessor_config.json to ``out_dir``.

    ``transformers.AutoModelFor*.from_pretrained(out_dir)`` and ``AutoImageProcessor`` then
    reproduce this model; a segmentation model is written as transformers'
    ``UperNetForSemanticSegmentation`` over a ``BeitBackbone`` tapping the same blocks
    (:mod:`beit_ray.models.upernet`). ``image_size`` resizes the model first; ``preprocessor`` overrides
    keys of the written preprocessor config. The model must be whole (consolidated), not
    ZeRO-3 partitioned. ``out_dir`` may be a URI (written locally, then uploaded).
    """
    model = getattr(model, "module", model)
    task = _task_of_model(model)
    if image_size is not None and image_size != current_image_size(model.config):
        model = resize_model(model, image_size)
    else:
        model = copy.copy(model)  # shallow: a private config without copying weights
        model.config = copy.deepcopy(model.config)
    cfg = model.config
    if id2label:
        id2label = {int(k): str(v) for k, v in id2label.items()}
        if task in ("classification", "segmentation") and len(id2label) != cfg.num_labels:
            raise ValueError(
                f"id2label has {len(id2label)} entries, the model {cfg.num_labels} labels"
            )
        cfg.id2label, cfg.label2id = id2label, {v: k for k, v in id2label.items()}
    cfg.architectures = [type(model).__name__]
    size = current_image_size(cfg)
    proc = Preprocessor.for_model(
        cfg.model_type,
        size,
        segmentation=task == "segmentation",
        image_mean=image_mean,
        image_std=image_std,
        **(preprocessor or {}),
    )
    local = (
        tempfile.mkdtemp(prefix="beit_ray_export_")
        if st.is_remote(out_dir)
        else st.strip_scheme(out_dir)
    )
    try:
        os.makedirs(local, exist_ok=True)
        if task == "segmentation":
            _save_upernet(model, local)
        else:
            model.save_pretrained(local)
        proc.save(local)
        if st.is_remote(out_dir):
            st.upload_dir(local, out_dir, storage)
    finally:
        if st.is_remote(out_dir):
            shutil.rmtree(local, ignore_errors=True)


def _save_upernet(model: nn.Module, folder: str) -> None:
    """Our segmentation model as transformers' UperNet over a BeitBackbone (models/upernet.py),
    whose stage taps are the blocks we trained on; the names are checked against that class."""
    from safetensors.torch import save_file
    from transformers import UperNetForSemanticSegmentation

    cfg, state = upernet.to_upernet(model.config, model.state_dict())
    with torch.device("meta"):
        want = UperNetForSemanticSegmentation(copy.deepcopy(cfg)).state_dict()
    if set(want) != set(state) or any(want[k].shape != state[k].shape for k in want):
        raise RuntimeError(
            f"UperNet export names do not match transformers' class: missing "
            f"{sorted(set(want) - set(state))[:4]}, extra {sorted(set(state) - set(want))[:4]}"
        )
    cfg.save_pretrained(folder)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})


def build_or_load(
    flavour: str | None,
    task: Task,
    *,
    init_from: str | None = None,
    zero3_config: dict[str, Any] | None = None,
    storage: StorageConfig | None = None,
    gather: Gather | None = None,
    seed: int | None = None,
    **overrides: Any,
) -> nn.Module:
    """A model from ``init_from`` (checkpoint URI) when given, else a new ``flavour`` model.

    From a checkpoint only ``image_size``, ``num_labels``, ``id2label`` and ``drop_path`` apply;
    a new model is initialised as unilm does (``gather`` makes ZeRO-3 partitions whole for it).
    ``seed`` fixes every new weight, partitioned or not (None: drawn from torch's global RNG).
    """
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    if init_from:
        keys = ("image_size", "num_labels", "id2label", "drop_path")
        keep = {k: overrides[k] for k in keys if overrides.get(k) is not None}
        return load_model(
            init_from, task, storage=storage, zero3_config=zero3_config, seed=seed, **keep
        )
    if flavour is None:
        raise ValueError("give a flavour or a checkpoint to start from")
    from beit_ray.models.flavours import model_config

    return build_from_config(
        model_config(flavour, task, **overrides),
        task,
        zero3_config=zero3_config,
        gather=gather,
        seed=seed,
    )
