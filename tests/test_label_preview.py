"""``_PREVIEW.html`` of labelling runs, opened offline in a real headless Chromium: the counts,
the errors by kind, the label histogram over every part, and a bounded sample of thumbnails
(segment: mask overlays) agree with the run's own parts and summary."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import jpeg_bytes, wait_for
from test_label import make_files

from beit_ray.config import parse_args
from beit_ray.infer.config import LabelConfig
from beit_ray.infer.label import label, read_parts
from beit_ray.infer.preview import PREVIEW_NAME, SAMPLE

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def inputs(photos, tmp_path_factory) -> str:
    """70 real photo crops (more than the sample holds) plus test_label's awkward files."""
    root = tmp_path_factory.mktemp("preview_in")
    rng = np.random.default_rng(0)
    names = sorted(photos)
    for i in range(70):
        img = photos[names[i % len(names)]]
        h, w = img.shape[:2]
        y, x = int(rng.integers(0, h - 96)), int(rng.integers(0, w - 96))
        (root / "crops").mkdir(exist_ok=True)
        (root / "crops" / f"{i:03d}.jpg").write_bytes(jpeg_bytes(img[y : y + 96, x : x + 128]))
    for rel, data in make_files(photos).items():
        os.makedirs(root / os.path.dirname(rel), exist_ok=True)
        (root / rel).write_bytes(data)
    return str(root)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    from beit_ray.models.build import build_model
    from beit_ray.models.load import export_hf

    root = tmp_path_factory.mktemp("preview_ckpt")
    torch.manual_seed(5)
    names = ["sky", "tabby", "mug", "rocket", "face", "cells"]
    out = {}
    for task in ("classification", "segmentation"):
        export_hf(
            build_model("debug", task, num_labels=len(names)),
            str(root / task),
            id2label=dict(enumerate(names)),
        )
        out[task] = str(root / task)
    return out


def _run(inputs: str, output: str, checkpoint: str, task: str) -> dict:
    argv = ["--input", inputs, "--output", output, "--checkpoint", checkpoint, "--task", task]
    argv += ["--chunk_size", "16", "--predict.max_pixels", "1000000", "--actors.num_cpus", "0.5"]
    return label(parse_args(LabelConfig, [*argv, "--ray.num_cpus", "4"]))


def _open(browser, output: str) -> None:
    browser.get("file://" + os.path.join(output, PREVIEW_NAME))
    wait_for(browser, "document.readyState === 'complete'")
    # every thumbnail is inline: all decoded, none broken
    wait_for(browser, "[...document.images].every(i => i.complete)")
    assert browser.execute_script("return [...document.images].every(i => i.naturalWidth > 0)")


def _facts(browser) -> dict[str, str]:
    return browser.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('[data-fact]')]"
        ".map(d => [d.dataset.fact, d.querySelector('b').textContent]))"
    )


def test_classify_preview(ray_session, browser, inputs, checkpoints, tmp_path):
    out = str(tmp_path / "labels")
    summary = _run(inputs, out, checkpoints["classification"], "classify")
    assert summary["preview"] == os.path.join(out, PREVIEW_NAME)
    parts = read_parts(out).to_pandas()
    ok = parts[parts["error"].isna()]
    assert len(ok) > SAMPLE  # the sample is bounded, the counts are not

    _open(browser, out)
    facts = _facts(browser)
    assert facts["images"] == str(len(parts)) and facts["errors"] == str(summary["errors"])
    kinds = browser.execute_script(
        "return [...document.querySelectorAll('#error-kinds tr')].slice(1)"
        ".map(tr => [tr.cells[0].textContent, Number(tr.cells[1].textContent)])"
    )
    assert dict(kinds) == summary["error_reasons"] and summary["errors"] >= 5
    examples = browser.execute_script(
        "return [...document.querySelectorAll('#error-examples tr')].slice(1)"
        ".map(tr => tr.cells[0].textContent)"
    )
    assert examples and set(examples) <= set(parts.loc[parts["error"].notna(), "path"])

    # the histogram counts every labelled image's top-1 label, read from all the parts
    hist = browser.execute_script(
        "return [...document.querySelectorAll('#histogram .hl')].map(d => [d.textContent,"
        " d.nextElementSibling.nextElementSibling.textContent])"
    )
    top1 = ok["top_labels"].map(lambda labels: labels[0]).value_counts()
    assert {label: int(text.split()[0]) for label, text in hist} == top1.to_dict()

    cards = browser.execute_script(
        "return [...document.querySelectorAll('.card')].map(c => [c.title, c.querySelector('img')"
        " !== null, c.querySelector('ol.top li') && c.querySelector('ol.top li').firstChild"
        ".textContent.trim()])"
    )
    assert len(cards) == SAMPLE
    by_path = ok.set_index("path")
    for path, has_img, first in cards:
        assert has_img, path  # loose files: every sampled image has its thumbnail
        assert first == by_path.loc[path, "top_labels"][0]
    browser.save_screenshot(str(tmp_path / "preview.png"))
    assert (tmp_path / "preview.png").stat().st_size > 10_000


def test_segment_preview_overlays_masks(ray_session, browser, inputs, checkpoints, tmp_path):
    out = str(tmp_path / "masks")
    _run(os.path.join(inputs, "photos"), out, checkpoints["segmentation"], "segment")
    parts = read_parts(out).to_pandas()
    _open(browser, out)
    cards = browser.execute_script("return document.querySelectorAll('.card img').length")
    assert cards == len(parts) == 7  # test_label's 7 photos, each with its overlay

    totals: dict[int, int] = {}
    for ids, counts in zip(parts["class_ids"], parts["pixel_counts"], strict=True):
        for i, n in zip(ids, counts, strict=True):
            totals[int(i)] = totals.get(int(i), 0) + int(n)
    names = json.loads(Path(checkpoints["segmentation"], "config.json").read_text())
    names = {int(k): v for k, v in names["id2label"].items()}
    shown = browser.execute_script(
        "return [...document.querySelectorAll('#histogram .hl')].map(d => d.textContent)"
    )
    assert shown == [names[i] for i in sorted(totals, key=lambda i: -totals[i])]

    # an overlay thumbnail is the photo blended with its mask's palette colours
    from PIL import Image

    from beit_ray.data.decode import decode_image
    from beit_ray.infer.masks import overlay

    path, w, h, data = browser.execute_script(
        "const card = document.querySelector('.card'), img = card.querySelector('img');"
        "const c = document.createElement('canvas'); c.width = img.naturalWidth;"
        "c.height = img.naturalHeight; const x = c.getContext('2d'); x.drawImage(img, 0, 0);"
        "return [card.title, c.width, c.height, [...x.getImageData(0, 0, c.width, c.height).data]]"
    )
    shown = np.array(data, dtype=np.float64).reshape(h, w, 4)[..., :3]
    row = parts.set_index("path").loc[path]
    image = decode_image(Path(path).read_bytes())
    mask = np.asarray(Image.open(row["mask_uri"]))

    def thumb(a: np.ndarray) -> np.ndarray:
        pic = Image.fromarray(a)
        pic.thumbnail((192, 192), Image.Resampling.BILINEAR)
        return np.asarray(pic, dtype=np.float64)

    want, bare = thumb(overlay(image, mask)), thumb(image)
    assert max(w, h) == 192 and want.shape == shown.shape
    err = np.abs(shown - want).mean()  # JPEG q82 of the thumbnail
    assert err < 4 and np.abs(shown - bare).mean() > 5 * err, (err, np.abs(shown - bare).mean())
