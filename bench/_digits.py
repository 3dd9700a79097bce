"""scikit-learn's digits as an offline, real, labelled image set in class folders (bench only).

1,797 8×8 gray digits (10 classes), upsampled to ``size`` pixels (bicubic), gray → RGB, split
deterministically (stratified) into train / val and written as ``<root>/<split>/<class>/*.png``.
``load_folder`` reads such a folder back into one uint8 tensor for a plain torch loop.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

CLASSES = tuple(f"digit_{i}" for i in range(10))


def write_digits(
    root: str, size: int = 32, train_n: int = 1400, few_fraction: float = 0.1, seed: int = 0
) -> dict[str, str]:
    """Folders {"train", "val", "few"}: a stratified split, and ``few``: a stratified
    ``few_fraction`` of train (the labelled subset of the few-label experiment)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    pix = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # [1797, 8, 8], values 0..16
    idx = np.arange(len(pix))
    train, val = train_test_split(idx, train_size=train_n, stratify=d.target, random_state=seed)
    few, _ = train_test_split(
        train, train_size=few_fraction, stratify=d.target[train], random_state=seed
    )
    out = {}
    for split, ids in (("train", train), ("val", val), ("few", few)):
        folder = os.path.join(root, split)
        out[split] = folder
        for c in CLASSES:
            os.makedirs(os.path.join(folder, c), exist_ok=True)
        for i in sorted(ids.tolist()):
            img = Image.fromarray(pix[i], mode="L").resize((size, size), Image.BICUBIC)
            img.convert("RGB").save(os.path.join(folder, CLASSES[d.target[i]], f"{i:04d}.png"))
    return out


def folder_files(folder: str) -> tuple[list[tuple[str, int]], list[str]]:
    """([("<class>/<file>", class index)] in :func:`load_folder`'s row order, class names)."""
    names = sorted(n for n in os.listdir(folder) if os.path.isdir(os.path.join(folder, n)))
    files = [(f"{name}/{f}", c) for c, name in enumerate(names)
             for f in sorted(os.listdir(os.path.join(folder, name)))]  # fmt: skip
    return files, names


def load_folder(folder: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(uint8 [N, 3, H, W], int64 labels [N], class names) of a class-folder tree of images."""
    files, names = folder_files(folder)
    xs = []
    for rel, _ in files:
        with Image.open(os.path.join(folder, rel)) as img:
            xs.append(np.asarray(img.convert("RGB")).transpose(2, 0, 1))  # [3, H, W]
    return torch.from_numpy(np.stack(xs)), torch.tensor([c for _, c in files]), names
