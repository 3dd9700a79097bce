"""``_PREVIEW.html``: what a labelling run found, readable offline in a browser.

One self-contained HTML file beside ``_SUMMARY.json`` (thumbnails inlined as data URIs, no
script, no network): the run's counts, its errors by kind with a few example files, the label
histogram over every labelled image (classify: top-1 labels; segment: each class's share of
the labelled pixels and the images it appears in), and a bounded sample of images (64 by
default) with their top labels, or their masks overlaid in the shared palette
(:mod:`beit_ray.infer.masks`).

Cost, bounded: the histogram reads one or two list columns of every part (parallel reads,
one part in memory per thread); the sample reads the parts it draws from, their images and
masks. Images inside object-store tars (streamed, never listed) get no thumbnail.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from beit_ray import storage as st
from beit_ray.config import StorageConfig
from beit_ray.infer.config import LabelConfig
from beit_ray.infer.parts import read_part

PREVIEW_NAME = "_PREVIEW.html"
SAMPLE = 64
"""Images shown in the sample grid."""
THUMB = 192
"""Longest side of a thumbnail, pixels."""
HISTOGRAM_ROWS = 40
"""Labels listed in the histogram; the rest are counted in one line."""
EXAMPLE_ERRORS = 12
"""Failed files listed by path and reason (the counts cover all of them)."""
READ_THREADS = 16


def write_preview(cfg: LabelConfig, plan: Any, summary: dict[str, Any]) -> str:
    """Write ``_PREVIEW.html`` under ``cfg.output``; returns its URI."""
    from beit_ray.infer.parts import done_chunks, part_name

    chunks = sorted(done_chunks(cfg.output, cfg.storage))
    parts = [st.join(cfg.output, part_name(c)) for c in chunks]
    hist = _histogram(cfg.task, parts, cfg.storage)
    picked = chunks[:: max(1, math.ceil(len(chunks) / SAMPLE))][:SAMPLE]  # spread over the run
    rows, failed = _sample_rows(cfg, picked)
    images = _thumbnails(cfg, plan, rows)
    id2label = _id2label(cfg) if cfg.task == "segment" else {}
    page = _page(cfg, summary, hist, rows, images, failed, id2label)
    uri = st.join(cfg.output, PREVIEW_NAME)
    st.write_text(uri, page, cfg.storage)
    return uri


# --------------------------------------------------------------------------- reading


def _histogram(task: str, parts: list[str], storage: StorageConfig | None) -> dict[str, Any]:
    """classify: {label: images whose top-1 it is}; segment: {id: [pixels, images]}."""
    if task == "embed":
        return {}
    columns = ["top_labels"] if task == "classify" else ["class_ids", "pixel_counts"]

    def one(uri: str) -> Counter:
        table = read_part(uri, storage, columns).to_pydict()
        counts: Counter = Counter()
        if task == "classify":
            counts.update(labels[0] for labels in table["top_labels"] if labels)
            return counts
        for ids, pixels in zip(table["class_ids"], table["pixel_counts"], strict=True):
            for i, n in zip(ids or [], pixels or [], strict=True):
                counts[("px", i)] += n
                counts[("img", i)] += 1
        return counts

    total: Counter = Counter()
    with ThreadPoolExecutor(READ_THREADS) as pool:
        for counts in pool.map(one, parts):
            total.update(counts)
    if task == "classify":
        return dict(total)
    ids = sorted({i for kind, i in total if kind == "px"})
    return {i: [total[("px", i)], total[("img", i)]] for i in ids}


def _sample_rows(cfg: LabelConfig, chunks: list[int]) -> tuple[list[dict], list[dict]]:
    """Up to SAMPLE labelled rows evenly spaced over ``chunks``' parts (parts spread over the
    run, rows spread within each: class folders show every class, not the first few), and up
    to EXAMPLE_ERRORS failed ones (path, error)."""
    from beit_ray.infer.parts import part_name, task_schema

    columns = [f.name for f in task_schema(cfg.task) if f.name != "embedding"]
    ok: list[dict] = []  # at most SAMPLE parts of chunk_size rows, without embeddings
    failed: list[dict] = []
    for c in chunks:
        table = read_part(st.join(cfg.output, part_name(c)), cfg.storage, columns).to_pylist()
        for row in table:
            row["chunk"] = c
        ok += [r for r in table if not r["error"]]
        failed += [r for r in table if r["error"]][: EXAMPLE_ERRORS - len(failed)]
    if len(ok) > SAMPLE:
        ok = [ok[i] for i in np.linspace(0, len(ok) - 1, SAMPLE).round().astype(int)]
    return ok, failed


def _image_bytes(cfg: LabelConfig, plan: Any, rows: list[dict]) -> list[bytes | None]:
    """Each row's image bytes, read as labelling read them (the plan's entries: a file, a tar
    member by its offset, a parquet row); None for members of streamed object-store tars."""
    from beit_ray.infer.inputs import fetch

    if plan is None or getattr(plan, "mode", "") == "tars":
        return [None] * len(rows)
    by_chunk: dict[int, dict[str, Any]] = {}
    for c in {r["chunk"] for r in rows}:
        entries = plan.entries(c, cfg.storage)
        by_chunk[c] = {e.path: e for e in entries}
    entries = [by_chunk[r["chunk"]].get(r["path"]) for r in rows]
    found = [e for e in entries if e is not None]
    blobs, errors = fetch(found, cfg.storage, cfg.image_column) if found else ([], [])
    got = {e.path: b for e, b, err in zip(found, blobs, errors, strict=True) if not err}
    return [got.get(r["path"]) for r in rows]


def _thumbnails(cfg: LabelConfig, plan: Any, rows: list[dict]) -> list[str | None]:
    """A JPEG data URI per row: the image (segment: with its mask overlaid), longest side
    THUMB; None where the image cannot be read back."""
    from beit_ray.data.decode import decode_image
    from beit_ray.infer.masks import overlay

    def one(item: tuple[dict, bytes | None]) -> str | None:
        row, data = item
        if data is None:
            return None
        try:
            image = decode_image(data, max_pixels=cfg.predict.max_pixels)  # [H, W, 3]
            if cfg.task == "segment" and row.get("mask_uri"):
                from PIL import Image

                png = Image.open(io.BytesIO(st.read_bytes(row["mask_uri"], cfg.storage)))
                image = overlay(image, np.asarray(png))
            return _jpeg_uri(image)
        except Exception:  # a preview never fails the run: the card says "no thumbnail"
            return None

    blobs = _image_bytes(cfg, plan, rows)
    with ThreadPoolExecutor(READ_THREADS) as pool:
        return list(pool.map(one, zip(rows, blobs, strict=True)))


def _jpeg_uri(image: np.ndarray) -> str:
    from PIL import Image

    pic = Image.fromarray(image)
    pic.thumbnail((THUMB, THUMB), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    pic.save(buf, format="JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _id2label(cfg: LabelConfig) -> dict[int, str]:
    from beit_ray.models.load import model_dir

    folder = model_dir(cfg.checkpoint, cfg.storage)
    raw = json.loads(st.read_text(st.join(folder, "config.json"), cfg.storage))
    return {int(k): str(v) for k, v in (raw.get("id2label") or {}).items()}


# --------------------------------------------------------------------------- the page

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1d2430;
 background:#f7f8fa;max-width:1180px;margin:0 auto;padding:1.2rem 1.5rem 2rem}
h1{font-size:1.4rem;margin:.2rem 0 .4rem}h2{font-size:1.1rem;margin:1.6rem 0 .6rem}
.muted{color:#5b6573;font-size:.9rem}code{font-size:.85rem;overflow-wrap:anywhere}
.facts{display:flex;flex-wrap:wrap;gap:.6rem;margin:.8rem 0}
.fact{background:#fff;border:1px solid #d7dce3;border-radius:8px;padding:.45rem .8rem}
.fact b{display:block;font-size:1.25rem}
table{border-collapse:collapse;background:#fff;font-size:.9rem}
td,th{border:1px solid #d7dce3;padding:.3rem .6rem;text-align:left;vertical-align:top}
.hist{display:grid;grid-template-columns:minmax(6rem,14rem) 1fr 8rem;gap:.25rem .6rem;
 align-items:center;max-width:900px}
.bar{height:.8rem;background:#e6e9ee;border-radius:4px;overflow:hidden}
.bar span{display:block;height:100%;background:#2f6fdb}
.num{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:.8rem}
.card{background:#fff;border:1px solid #d7dce3;border-radius:8px;padding:.5rem;font-size:.85rem}
.card img{display:block;max-width:100%;height:auto;margin:0 auto .4rem;border-radius:4px}
.card .name{font-weight:600;overflow-wrap:anywhere}
.noimg{height:96px;display:flex;align-items:center;justify-content:center;background:#eef0f3;
 color:#5b6573;border-radius:4px;margin-bottom:.4rem}
.sw{display:inline-block;width:.8rem;height:.8rem;border-radius:2px;margin-right:.3rem;
 vertical-align:middle;border:1px solid rgba(0,0,0,.2)}
ol.top{margin:.2rem 0 0;padding-left:1.2rem}
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _bar(fraction: float, color: str | None = None) -> str:
    style = f"width:{100 * max(0.0, min(1.0, fraction)):.1f}%"
    if color:
        style += f";background:{color}"
    return f'<div class="bar"><span style="{style}"></span></div>'


def _page(
    cfg: LabelConfig,
    summary: dict[str, Any],
    hist: dict[Any, Any],
    rows: list[dict],
    images: list[str | None],
    failed: list[dict],
    id2label: dict[int, str],
) -> str:
    from beit_ray.infer.inputs import input_root

    s = summary
    facts = [
        ("images", s.get("files", 0)),
        ("labelled", s.get("ok", 0)),
        ("errors", s.get("errors", 0)),
        ("images/s", f"{s.get('images_per_s', 0):.1f}"),
    ]
    out = [
        '<!doctype html><html lang="en"><head><meta charset="utf-8">',
        f"<title>labelling preview: {_e(cfg.output)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Labelling preview: <code>{_e(cfg.task)}</code></h1>",
        f'<p class="muted">input <code>{_e(cfg.input)}</code><br>output <code>{_e(cfg.output)}'
        f"</code><br>checkpoint <code>{_e(cfg.checkpoint)}</code><br>written "
        f"{_e(time.strftime('%Y-%m-%d %H:%M:%S'))}; every count below is over the whole run, "
        f"the images are a sample of {len(rows)}.</p>",
        '<div class="facts" id="facts">',
        *(f'<div class="fact" data-fact="{_e(k)}"><b>{_e(v)}</b>{_e(k)}</div>' for k, v in facts),
        "</div>",
        *_errors_section(s, failed),
        *_histogram_section(cfg.task, hist, id2label, s.get("ok", 0)),
        *_sample_section(cfg.task, rows, images, id2label, input_root(cfg).rstrip("/")),
        "</body></html>",
    ]
    return "\n".join(out)


def _errors_section(summary: dict[str, Any], failed: list[dict]) -> list[str]:
    reasons = summary.get("error_reasons") or {}
    out = [f'<h2 id="errors">Errors by kind ({summary.get("errors", 0)})</h2>']
    if not reasons:
        return [*out, '<p class="muted">none: every input was labelled.</p>']
    out.append('<table id="error-kinds"><tr><th>kind</th><th>files</th></tr>')
    out += [f'<tr><td>{_e(k)}</td><td class="num">{int(n)}</td></tr>' for k, n in reasons.items()]
    out.append("</table>")
    if failed:
        out.append(f'<p class="muted">{len(failed)} of them, from the sampled parts:</p>')
        out.append('<table id="error-examples"><tr><th>file</th><th>error</th></tr>')
        out += [
            f"<tr><td><code>{_e(r['path'])}</code></td><td>{_e(r['error'])}</td></tr>"
            for r in failed
        ]
        out.append("</table>")
    return out


def _histogram_section(
    task: str, hist: dict[Any, Any], id2label: dict[int, str], ok: int
) -> list[str]:
    from beit_ray.infer.masks import hex_color

    if task == "embed":
        return ['<h2 id="labels">Labels</h2><p class="muted">embeddings: no labels.</p>']
    if task == "classify":
        items = sorted(hist.items(), key=lambda kv: (-kv[1], kv[0]))
        title = f"Top-1 labels over {ok} labelled images ({len(items)} distinct)"
        lines = [
            (str(label), None, n / max(1, ok), f"{n} ({100 * n / max(1, ok):.1f}%)")
            for label, n in items
        ]
    else:
        pixels = sum(px for px, _ in hist.values())
        items = sorted(hist.items(), key=lambda kv: -kv[1][0])
        title = f"Classes by share of the labelled pixels ({len(items)} classes present)"
        lines = [
            (
                id2label.get(i, str(i)),
                hex_color(i),
                px / max(1, pixels),
                f"{100 * px / max(1, pixels):.1f}%, {n} images",
            )
            for i, (px, n) in items
        ]
    top = max((f for _, _, f, _ in lines), default=1.0) or 1.0
    out = [f'<h2 id="labels">{_e(title)}</h2>', '<div class="hist" id="histogram">']
    for label, color, frac, text in lines[:HISTOGRAM_ROWS]:
        swatch = f'<span class="sw" style="background:{color}"></span>' if color else ""
        out.append(
            f'<div class="hl">{swatch}{_e(label)}</div>{_bar(frac / top, color)}'
            f'<div class="num">{_e(text)}</div>'
        )
    out.append("</div>")
    if len(lines) > HISTOGRAM_ROWS:
        out.append(f'<p class="muted">and {len(lines) - HISTOGRAM_ROWS} more labels.</p>')
    return out


def _sample_section(
    task: str, rows: list[dict], images: list[str | None], id2label: dict[int, str], root: str
) -> list[str]:
    from beit_ray.infer.masks import hex_color

    what = "with the mask overlaid" if task == "segment" else "with their top labels"
    out = [f'<h2 id="sample">A sample of {len(rows)} images, {what}</h2>', '<div class="grid">']
    for row, uri in zip(rows, images, strict=True):
        path = str(row["path"])  # shown from the input root: class folders name the class
        name = path[len(root) :].lstrip("/") if path.startswith(root) else path.rsplit("/", 1)[-1]
        pic = (
            f'<img src="{uri}" alt="{_e(name)}">'
            if uri
            else '<div class="noimg">no thumbnail</div>'
        )
        size = f"{row['width']}×{row['height']}"
        body = ""
        if task == "classify":
            body = '<ol class="top">' + "".join(
                f"<li>{_e(label)} <span class='muted'>{score:.2f}</span></li>"
                for label, score in zip(row["top_labels"][:3], row["top_scores"][:3], strict=True)
            )
            body += "</ol>"
        elif task == "segment":
            total = max(1, sum(row["pixel_counts"]))
            pairs = sorted(
                zip(row["class_ids"], row["pixel_counts"], strict=True), key=lambda p: -p[1]
            )
            body = '<ol class="top">' + "".join(
                f"<li><span class='sw' style='background:{hex_color(i)}'></span>"
                f"{_e(id2label.get(i, str(i)))} <span class='muted'>{100 * n / total:.0f}%</span></li>"
                for i, n in pairs[:3]
            )
            body += "</ol>"
        out.append(
            f'<div class="card" title="{_e(row["path"])}">{pic}<div class="name">{_e(name)}</div>'
            f'<div class="muted">{size}</div>{body}</div>'
        )
    out.append("</div>")
    return out
