"""Data pipeline on real Ray: every source layout on disk and on moto's S3, both modes, resume."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import jpeg_bytes
from PIL import Image

from beit_ray import storage
from beit_ray.data.config import DataConfig
from beit_ray.data.pipeline import labelled_dataset, pretraining_dataset, read_errors

pytestmark = pytest.mark.integration
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(image_size=32, patch_size=8, tokenizer_image_size=32)


def _job(name: str):  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(
        f"job_{name}", os.path.join(ROOT, "jobs", f"{name}.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


@pytest.fixture(scope="module")
def items(photos) -> list[tuple[str, str, bytes]]:
    """(class, name, jpeg) of small real photos: 2 classes × 4 images."""
    out = []
    names = sorted(photos)
    for i in range(8):
        img = Image.fromarray(photos[names[i % len(names)]])
        img = img.resize((96 + 8 * i, 72 + 4 * i))
        out.append(("cat" if i % 2 else "dog", f"img{i}", jpeg_bytes(np.asarray(img))))
    return out


BAD = {"empty": b"", "text": b"not an image at all" * 20}


def write_layout(layout: str, dest: str, items: list[tuple[str, str, bytes]]) -> dict[str, int]:
    """Write ``items`` (+ bad files) in ``layout`` under ``dest``; returns expected key → label."""
    os.makedirs(dest, exist_ok=True)
    expected: dict[str, int] = {}
    classes = sorted({c for c, _, _ in items})
    if layout == "folders":
        for c, n, b in items:
            os.makedirs(f"{dest}/{c}", exist_ok=True)
            Path(f"{dest}/{c}/{n}.jpg").write_bytes(b)
            expected[f"{c}/{n}.jpg"] = classes.index(c)
        for n, b in BAD.items():
            Path(f"{dest}/dog/{n}.jpg").write_bytes(b)
    elif layout in ("class_tars", "webdataset"):
        groups: dict[str, list] = {}
        for i, (c, n, b) in enumerate(items):
            groups.setdefault(c if layout == "class_tars" else f"shard-{i % 2:03d}", []).append(
                (c, n, b)
            )
        for tname, members in groups.items():
            with tarfile.open(f"{dest}/{tname}.tar", "w") as tar:
                extra = list(BAD.items()) if tname in ("dog", "shard-000") else []
                for c, n, b in members + [("dog", n, b) for n, b in extra]:
                    parts = [(f"{n}.jpg", b)]
                    if layout == "webdataset":
                        lab = classes.index(c)
                        parts.append(
                            (f"{n}.cls", str(lab).encode())
                            if n.endswith(("0", "4"))
                            else (f"{n}.json", json.dumps({"label": lab}).encode())
                        )
                    for name, data in parts:
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
                    if n.startswith("img"):
                        expected[f"{tname}/{n}" + (".jpg" if layout == "class_tars" else "")] = (
                            classes.index(c)
                        )
    elif layout == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [(f"p/{n}", b, classes.index(c)) for c, n, b in items] + [
            (f"p/{n}", b, 0) for n, b in BAD.items()
        ]
        for part in range(2):
            sub = rows[part::2]
            table = pa.table(
                {
                    "key": [r[0] for r in sub],
                    "image": pa.array([r[1] for r in sub], pa.binary()),
                    "label": [r[2] for r in sub],
                }
            )
            pq.write_table(table, f"{dest}/part-{part}.parquet")
        expected = {k: lab for k, _, lab in rows if k.split("/")[1].startswith("img")}
    return expected


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("layout", ["folders", "class_tars", "webdataset", "parquet"])
def test_layouts_read_label_and_log_errors(ray_session, tmp_path, request, items, layout, where):
    local = str(tmp_path / "src")
    expected = write_layout(layout, local, items)
    src = local
    if where == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        src = f"s3://{bucket}/src"
        storage.upload_dir(local, src)
    errors = storage.join(src if where == "s3" else str(tmp_path), "errors")
    cfg = DataConfig(
        source=src, tokenizer="none", errors_uri=errors, **TINY
    )  # layout: auto-detected
    rows = labelled_dataset(
        cfg, "val", classes_write_to=storage.join(str(tmp_path), "classes.json")
    ).take_all()
    got = {r["key"]: int(r["label"]) for r in rows}
    assert got == expected
    assert all(r["pixel_values"].shape == (3, 32, 32) for r in rows)
    reasons = sorted(e["reason"].split(":")[0] for e in read_errors(errors))
    assert reasons == ["empty", "not_an_image"]


def test_streaming_codebook_epochs_and_partitioning(ray_session, tmp_path, items):
    src = str(tmp_path / "src")
    write_layout("folders", src, items)
    book = str(tmp_path / "codebook.safetensors")
    _job("fit_tokenizer").main(["--input", src, "--output", book, "--data.image_size", "32", "--data.patch_size", "8",
                                "--data.tokenizer_image_size", "32", "--codebook.vocab_size", "16", "--codebook.sample_images", "20"])  # fmt: skip
    cfg = DataConfig(
        source=src,
        tokenizer="codebook",
        tokenizer_weights=book,
        errors_uri=str(tmp_path / "e"),
        **TINY,
    )
    rows = pretraining_dataset(cfg, epoch=0, epochs=2).take_all()
    assert len(rows) == 16  # 8 good images × 2 epochs; the 2 bad files are error records
    r = rows[0]
    assert r["pixel_values"].shape == (3, 32, 32) and r["pixel_values"].dtype == np.uint8
    assert r["bool_masked_pos"].shape == (16,) and r["bool_masked_pos"].dtype == bool
    assert r["visual_token_ids"].shape == (16,) and r["visual_token_ids"].dtype == np.int16
    assert "tokenizer_pixels" not in r
    ids = np.stack([r["visual_token_ids"] for r in rows])
    assert ids.min() >= 0 and ids.max() < 16
    by_key: dict[str, list] = {}
    for r in rows:
        by_key.setdefault(r["key"], []).append(r["pixel_values"])
    assert all(
        len(v) == 2 and not np.array_equal(v[0], v[1]) for v in by_key.values()
    )  # fresh crops
    # Same rows however the input is partitioned and batched.
    one = {
        r["key"]: r
        for r in pretraining_dataset(
            DataConfig(source=src, tokenizer="none", read_tasks=1, batch_size=3, **TINY)
        ).take_all()
    }
    four = (
        pretraining_dataset(
            DataConfig(source=src, tokenizer="none", read_tasks=4, batch_size=2, **TINY)
        )
        .repartition(3)
        .take_all()
    )
    assert len(one) == len(four) == 8
    for r in four:
        for col in ("pixel_values", "bool_masked_pos", "tokenizer_pixels"):
            assert np.array_equal(r[col], one[r["key"]][col])


def test_labelled_split_is_deterministic_and_disjoint(ray_session, tmp_path, items):
    src = str(tmp_path / "src")
    write_layout("class_tars", src, items)
    cfg = DataConfig(source=src, tokenizer="none", **TINY)
    train = {r["key"] for r in labelled_dataset(cfg, "train", val_fraction=0.4).take_all()}
    val = {r["key"] for r in labelled_dataset(cfg, "val", val_fraction=0.4).take_all()}
    assert not train & val and len(train | val) == 8 and val
    assert val == {r["key"] for r in labelled_dataset(cfg, "val", val_fraction=0.4).take_all()}
    # data.reserve_per_operator reaches the dataset's own context (Ray's default stays global).
    # Unset (auto): off for task-only graphs such as this one, on where an actor stage is.
    import dataclasses

    import ray

    from beit_ray.data.pipeline import with_reservation

    auto = labelled_dataset(cfg, "val", val_fraction=0.4)
    assert auto.context.op_resource_reservation_enabled is False
    assert {r["key"] for r in auto.take_all()} == val  # same rows, only scheduling differs
    on = dataclasses.replace(cfg, reserve_per_operator=True)
    assert labelled_dataset(on, "train", val_fraction=0.4).context.op_resource_reservation_enabled
    assert with_reservation(
        ray.data.range(2), cfg, actor_stage=True
    ).context.op_resource_reservation_enabled
    off = dataclasses.replace(cfg, reserve_per_operator=False)
    assert not with_reservation(
        ray.data.range(2), off, actor_stage=True
    ).context.op_resource_reservation_enabled
    assert ray.data.DataContext.get_current().op_resource_reservation_enabled


def test_materialize_on_s3_resumes_without_duplicates(
    ray_session, tmp_path, s3_bucket, items, capsys
):
    src = str(tmp_path / "src")
    write_layout("folders", src, items)
    out = f"s3://{s3_bucket}/shards"
    args = ["--input", src, "--output", out, "--data.image_size", "32", "--data.patch_size", "8",
            "--data.tokenizer_image_size", "32", "--data.tokenizer", "none",
            "--shards.images_per_shard", "3", "--shards.shards_per_wave", "2"]  # fmt: skip
    from beit_ray.config import parse_args, run_job
    from beit_ray.data.config import TokenizeConfig
    from beit_ray.data.materialize import load_manifest, materialize, read_materialized

    # The job's main returns an exit code: the counts come from the library call it makes.
    cfg = parse_args(TokenizeConfig, args)
    counts = materialize(cfg, progress=False)
    assert counts == {
        "shards_total": 4,
        "shards_skipped": 0,
        "shards_written": 4,
        "read": 10,
        "written": 8,
        "failed": 2,
    }

    # Simulate an interruption: the last wave was never committed, and left half-written files.
    manifest = load_manifest(out)
    lost = [
        k for k, e in manifest["shards"].items() if e["wave"] == manifest["shards"]["3"]["wave"]
    ]
    for k in lost:
        del manifest["shards"][k]
    storage.write_text(storage.join(out, "manifest.json"), json.dumps(manifest))
    storage.write_text(
        storage.join(out, "data", "wave-deadbeef", "shard=0", "partial.parquet"), "junk"
    )
    again = materialize(parse_args(TokenizeConfig, args), progress=False)
    assert again["shards_skipped"] == 4 - len(lost) and again["shards_written"] == len(lost)
    rows = read_materialized(out).take_all()
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) == 8
    assert rows[0]["pixel_values"].shape == (3, 32, 32) and rows[0]["tokenizer_pixels"].shape == (
        3,
        32,
        32,
    )
    assert not storage.exists(storage.join(out, "data", "wave-deadbeef"))
    assert json.loads(storage.read_text(storage.join(out, "classes.json")))["classes"] == [
        "cat",
        "dog",
    ]
    # The job itself: a rerun of a finished output exits 0, writes nothing and says so.
    capsys.readouterr()
    assert run_job(_job("tokenize_shards").main, args) == 0
    said = capsys.readouterr().out
    assert "wrote 0 rows" in said and "shards: 0 written, 4 already done, 4 total" in said
    assert len(read_materialized(out).take_all()) == 8


def test_segmentation_rows(ray_session, tmp_path, photos):
    from beit_ray.data.segmentation import segmentation_dataset

    root = tmp_path / "ade"
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i, name in enumerate(["astronaut", "coffee"]):
            img = photos[name][:120, :160]
            lab = np.zeros(img.shape[:2], np.uint8)
            lab[:, 80:] = 3 + i
            lab[:60, :40] = 1
            (root / "images" / split / f"{name}.jpg").write_bytes(jpeg_bytes(img))
            Image.fromarray(lab).save(root / "annotations" / split / f"{name}.png")
    train = segmentation_dataset(str(root), "training", crop_size=64).take_all()
    assert len(train) == 2
    for r in train:
        assert r["pixel_values"].shape == (3, 64, 64) and r["labels"].shape == (64, 64)
        assert set(np.unique(r["labels"])) <= {0, 2, 3, 255}  # reduce_zero_label: 0 → 255, k → k-1
    val = segmentation_dataset(str(root), "validation", crop_size=64).take_all()
    # images at the test scale (256, 64), ratio kept; labels at the original size
    assert {r["pixel_values"].shape for r in val} == {(3, 64, 85)}
    assert all(
        r["labels"].shape == (120, 160) and r["labels"][0, 0] == 0 and r["labels"][-1, 0] == 255
        for r in val
    )
