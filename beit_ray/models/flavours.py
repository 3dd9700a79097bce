"""Named model flavours and the transformers config each one becomes for a task.

BEiT flavours follow microsoft/beit-{base,large}-patch16-224 (relative position bias, layer
scale 0.1 base / 1e-5 large, mean pooling); ViT flavours follow
google/vit-{base,large}-patch16-224-in21k (absolute positions, CLS pooler). ``debug`` is a
tiny BEiT for tests: 4 blocks, width 64, 32-pixel images, patch 8.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from transformers import BeitConfig, PretrainedConfig, ViTConfig

Task = Literal["mim", "classification", "segmentation", "features"]
TASKS: tuple[str, ...] = ("mim", "classification", "segmentation", "features")


@dataclass(frozen=True)
class Flavour:
    family: Literal["beit", "vit"]
    hidden_size: int
    depth: int
    heads: int
    mlp: int
    patch_size: int = 16
    image_size: int = 224
    layer_scale: float = 0.1
    drop_path: float = 0.1
    vocab_size: int = 8192
    out_indices: tuple[int, int, int, int] = (4, 6, 8, 12)
    """Blocks (1-based) whose outputs feed UperNet's four feature maps: unilm's 0-based
    [3, 5, 7, 11] of BEiT-base is blocks 4/6/8/12 (see :mod:`beit_ray.models.segmentation`)."""
    layer_decay: float = 0.65
    """Default layer-wise lr decay for fine-tuning (BEiT: 0.65 base, 0.75 large)."""


FLAVOURS: dict[str, Flavour] = {
    "debug": Flavour(
        "beit",
        64,
        4,
        4,
        128,
        patch_size=8,
        image_size=32,
        drop_path=0.0,
        vocab_size=256,
        out_indices=(1, 2, 3, 4),
    ),
    "base": Flavour("beit", 768, 12, 12, 3072),
    "large": Flavour(
        "beit",
        1024,
        24,
        16,
        4096,
        layer_scale=1e-5,
        drop_path=0.2,
        out_indices=(8, 12, 16, 24),
        layer_decay=0.75,
    ),
    "vit-debug": Flavour(
        "vit", 64, 4, 4, 128, patch_size=8, image_size=32, drop_path=0.0, out_indices=(1, 2, 3, 4)
    ),
    "vit-base": Flavour("vit", 768, 12, 12, 3072, drop_path=0.0),
    "vit-large": Flavour(
        "vit", 1024, 24, 16, 4096, drop_path=0.0, out_indices=(8, 12, 16, 24), layer_decay=0.75
    ),
}


def get_flavour(name: str) -> Flavour:
    if name not in FLAVOURS:
        raise ValueError(f"unknown flavour {name!r}; choose from {', '.join(FLAVOURS)}")
    return FLAVOURS[name]


def model_config(
    flavour: str,
    task: Task,
    *,
    image_size: int | None = None,
    num_labels: int | None = None,
    id2label: dict[int, str] | None = None,
    vocab_size: int | None = None,
    drop_path: float | None = None,
    layer_scale: float | None = None,
    **extra: Any,
) -> PretrainedConfig:
    """The transformers config of ``flavour`` set up for ``task``.

    MIM uses one relative position bias shared by all blocks and a mask token (as BEiT
    pretraining); the fine-tuning tasks use a bias per block (filled from the shared one by
    :func:`beit_ray.models.load.load_model`) and mean pooling.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    f = get_flavour(flavour)
    labels = _labels(num_labels, id2label)
    common: dict[str, Any] = dict(
        hidden_size=f.hidden_size,
        num_hidden_layers=f.depth,
        num_attention_heads=f.heads,
        intermediate_size=f.mlp,
        patch_size=f.patch_size,
        image_size=image_size or f.image_size,
        **labels,
    )
    if f.family == "vit":
        if task in ("mim", "segmentation"):
            raise ValueError(
                f"flavour {flavour!r} (ViT) supports classification and features, not {task}"
            )
        cfg = ViTConfig(**common, layer_norm_eps=1e-12, **extra)
        cfg.drop_path_rate = f.drop_path if drop_path is None else drop_path
        return cfg
    beit: dict[str, Any] = dict(
        vocab_size=vocab_size or f.vocab_size,
        layer_scale_init_value=f.layer_scale if layer_scale is None else layer_scale,
        drop_path_rate=f.drop_path if drop_path is None else drop_path,
        use_absolute_position_embeddings=False,
        layer_norm_eps=1e-6,
    )
    if task == "mim":
        beit.update(
            use_mask_token=True,
            use_shared_relative_position_bias=True,
            use_relative_position_bias=False,
            use_mean_pooling=False,
        )
    else:
        beit.update(
            use_mask_token=False,
            use_shared_relative_position_bias=False,
            use_relative_position_bias=True,
            use_mean_pooling=True,
        )
    if task == "segmentation":
        beit.update(
            out_indices=list(f.out_indices), use_auxiliary_head=True, semantic_loss_ignore_index=255
        )
    beit.update(extra)
    cfg = BeitConfig(**common, **beit)
    if task == "segmentation":
        from beit_ray.models.segmentation import mark_block_taps

        mark_block_taps(cfg)
    return cfg


def _labels(num_labels: int | None, id2label: dict[int, str] | None) -> dict[str, Any]:
    if id2label:
        id2label = {int(k): str(v) for k, v in id2label.items()}
        if num_labels is not None and num_labels != len(id2label):
            raise ValueError(f"num_labels={num_labels} but id2label has {len(id2label)} entries")
        return {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    if num_labels:
        id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
        return {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    return {}
