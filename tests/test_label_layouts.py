"""Batch labelling of the data pipeline's container layouts on moto's S3 server.

Per-class tars, WebDataset shards and parquet files of image bytes, each with a corrupt
member: one row per image, error rows for the bad ones, an interruption and a rerun with no
duplicates and no gaps, and the same predictions as a direct transformers forward.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import jpeg_bytes, moto_requests, tar_bytes

from beit_ray import storage as st
from beit_ray.config import ConfigError, parse_args
from beit_ray.infer.config import LabelConfig
from beit_ray.infer.inputs import Units
from beit_ray.infer.label import LabelInterrupted, label, read_parts

pytestmark = pytest.mark.integration

BAD = "!corrupt|truncated|not_an_image"  # random bytes after a JPEG header: any of these
PARQUET_GETS = 7  # a.parquet: its footer + 3 row groups; b: footer + 1; c: its footer
NAMES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")


def corrupt(photos: dict[str, np.ndarray]) -> bytes:
    good = jpeg_bytes(photos["coffee"])
    return good[:20] + np.random.default_rng(0).bytes(3000)


def write_layouts(bucket: str, photos: dict[str, np.ndarray]) -> dict[str, dict[str, str]]:
    """Three inputs on S3; returns, per layout, each expected path → photo name or error prefix."""
    jpg = {n: jpeg_bytes(photos[n]) for n in NAMES}
    expect: dict[str, dict[str, str]] = {"class_tars": {}, "webdataset": {}, "parquet": {}}

    # ImageNet-22k style: one tar of JPEGs per class; a corrupt member, a macOS ._ file, a tar
    # truncated in its second member's data, and a classes.json beside them (not an input)
    root = f"s3://{bucket}/ctars"
    a = tar_bytes(
        [(f"./n01_{n}.JPEG", jpg[n]) for n in NAMES[:3]]
        + [("n01_bad.JPEG", corrupt(photos)), ("._n01_astronaut.JPEG", b"\0" * 50)]
    )
    b = tar_bytes([(f"n02_{n}.JPEG", jpg[n]) for n in NAMES[3:]])
    cut = tar_bytes([(f"n03_{n}.JPEG", jpg[n]) for n in NAMES[:3]])
    cut = cut[: 512 + len(jpg[NAMES[0]]) + 511 + 512 + len(jpg[NAMES[1]]) // 2]
    for name, data in (("n01.tar", a), ("n02.tar", b), ("n03.tar", cut)):
        st.write_bytes(f"{root}/{name}", data)
    st.write_text(f"{root}/classes.json", json.dumps({"classes": ["n01", "n02", "n03"]}))
    e = expect["class_tars"]
    e.update({f"{root}/n01.tar/n01_{n}.JPEG": n for n in NAMES[:3]})
    e[f"{root}/n01.tar/n01_bad.JPEG"] = BAD
    e.update({f"{root}/n02.tar/n02_{n}.JPEG": n for n in NAMES[3:]})
    e[f"{root}/n03.tar/n03_{NAMES[0]}.JPEG"] = NAMES[0]
    e[f"{root}/n03.tar/n03_{NAMES[1]}.JPEG"] = "!read_failed"  # listed, then cut short
    e[f"{root}/n03.tar"] = "!read_failed"  # the tar itself could not be listed to its end

    # WebDataset shards: <key>.jpg + .cls or .json; a corrupt image; a sample with no image
    root = f"s3://{bucket}/wds"
    s0 = [(f"s{i}.jpg", jpg[n]) for i, n in enumerate(NAMES[:3])]
    s0 = [m for i, (name, data) in enumerate(s0) for m in ((name, data), (f"s{i}.cls", b"1"))]
    s0 += [("s3.jpg", corrupt(photos)), ("s3.cls", b"2"), ("s4.json", b'{"label": 0}')]
    s1 = [(f"t{i}.jpg", jpg[n]) for i, n in enumerate(NAMES[3:])]
    s1 = [m for i, (name, d) in enumerate(s1) for m in ((name, d), (f"t{i}.json", b'{"label":1}'))]
    st.write_bytes(f"{root}/shard-000000.tar", tar_bytes(s0))
    st.write_bytes(f"{root}/shard-000001.tar", tar_bytes(s1))
    e = expect["webdataset"]
    e.update({f"{root}/shard-000000.tar/s{i}.jpg": n for i, n in enumerate(NAMES[:3])})
    e[f"{root}/shard-000000.tar/s3.jpg"] = BAD
    e[f"{root}/shard-000000.tar/s4"] = "!no_image"
    e.update({f"{root}/shard-000001.tar/t{i}.jpg": n for i, n in enumerate(NAMES[3:])})

    # parquet of image bytes, small row groups; a corrupt row, a null row, a file without images
    root = f"s3://{bucket}/pq"
    rows = [jpg[n] for n in NAMES[:4]] + [corrupt(photos), None]
    fs, path = st.pyarrow_fs(root)
    table = pa.table({"image": pa.array(rows, pa.binary()), "label": list(range(6))})
    pq.write_table(table, f"{path}/a.parquet", filesystem=fs, row_group_size=2)
    table = pa.table({"image": pa.array([jpg[n] for n in NAMES[4:]], pa.binary())})
    pq.write_table(table, f"{path}/b.parquet", filesystem=fs)
    pq.write_table(pa.table({"caption": ["x"]}), f"{path}/c.parquet", filesystem=fs)
    e = expect["parquet"]
    e.update({f"{root}/a.parquet#{i}": n for i, n in enumerate(NAMES[:4])})
    e[f"{root}/a.parquet#4"] = BAD
    e[f"{root}/a.parquet#5"] = "!empty"
    e.update({f"{root}/b.parquet#{i}": n for i, n in enumerate(NAMES[4:])})
    e[f"{root}/c.parquet"] = "!read_failed"  # no image column: one row for the file
    return expect


@pytest.fixture(scope="module")
def layouts(s3_server, photos) -> tuple[str, dict[str, dict[str, str]]]:
    import os

    import boto3

    bucket = "layouts-" + os.urandom(4).hex()
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    return bucket, write_layouts(bucket, photos)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> str:
    from beit_ray.models.build import build_model
    from beit_ray.models.load import export_hf

    torch.manual_seed(0)
    model = build_model("debug", "classification", num_labels=10)
    local = str(tmp_path_factory.mktemp("ckpt") / "cls")
    export_hf(model, local, id2label={i: f"c{i}" for i in range(10)})
    return local


@pytest.fixture(scope="module")
def reference(classifier, photos) -> dict[str, tuple[list[int], np.ndarray]]:
    """Top-3 ids and scores of each photo from a direct transformers forward."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from beit_ray.data.decode import decode_image

    processor = AutoImageProcessor.from_pretrained(classifier)
    model = AutoModelForImageClassification.from_pretrained(classifier).eval()
    out = {}
    for n in NAMES:
        pil = Image.fromarray(decode_image(jpeg_bytes(photos[n])))
        with torch.no_grad():
            probs = model(**processor(pil, return_tensors="pt")).logits.softmax(-1)[0]
        scores, ids = probs.topk(3)
        out[n] = (ids.tolist(), scores.numpy())
    return out


def _cfg(**kw: object) -> LabelConfig:
    argv = [f"--{k}={v}" for k, v in kw.items()]
    argv += ["--ray.num_cpus", "4", "--actors.num_cpus", "0.5", "--actors.max_actors", "1"]
    return parse_args(LabelConfig, ["--task", "classify", "--predict.top_k", "3", *argv])


@pytest.mark.parametrize(
    ("layout", "interrupt"), [("class_tars", True), ("webdataset", False), ("parquet", True)]
)
def test_layouts(ray_session, layouts, classifier, reference, layout, interrupt, capsys):
    bucket, expect = layouts
    src = {"class_tars": "ctars", "webdataset": "wds", "parquet": "pq"}[layout]
    out = f"s3://{bucket}/out-{layout}"
    cfg = _cfg(input=f"s3://{bucket}/{src}", output=out, checkpoint=classifier, chunk_size=3)
    assert cfg.layout == "auto"  # detected as the data pipeline does
    n = len(expect[layout])
    tars = layout != "parquet"
    # object-store containers (tars, parquet files): one task streams each once
    fs, path = st.filesystem(cfg.input)
    size = sum(i["size"] for i in fs.ls(path, detail=True) if i["name"].endswith(".tar"))

    with moto_requests() as reads:
        if interrupt:
            with pytest.raises(LabelInterrupted):
                label(cfg, stop_after_chunks=1)  # a chunk; with tars, a whole tar (n01: 4 rows)
            first = 4 if tars else 6  # a whole container: n01's 4 rows, a.parquet's 6
            assert len(read_parts(out, columns=["path"])) == first  # nothing partial
            assert "each read once" in capsys.readouterr().out
        summary = label(cfg)  # (again:) the same command finishes the rest
    if interrupt:
        assert "listing the images" not in capsys.readouterr().out  # nothing listed inside
        assert summary["chunks_resumed"] == 1 and summary["processed_this_run"] == n - first
    assert summary["files"] == n and summary["layout"] == "auto"
    inputs = f"GET /{bucket}/{src}"
    if tars:  # each tar read once in all (and the first one's headers, to detect the layout)
        assert 0 < size <= reads["bytes .tar"] <= 1.05 * size, (reads, size)
    else:  # each file's footer, then each row group once: a 3 groups, b 1, c none
        assert 0 < reads[inputs] <= PARQUET_GETS, reads
    with moto_requests() as again:
        assert label(cfg)["processed_this_run"] == 0
    assert again[inputs] == 0, again  # a finished output: no container is read

    df = read_parts(out).to_pandas()
    assert len(df) == df["path"].nunique() == n  # no duplicates
    assert set(df["path"]) == set(expect[layout])  # no gaps, nothing unexpected
    for _, row in df.iterrows():
        want = expect[layout][row["path"]]
        if want.startswith("!"):
            reasons = tuple(want[1:].split("|"))
            assert row["error"] and row["error"].startswith(reasons), (row["path"], row["error"])
            assert row["top_ids"] is None or pd.isna(row["top_ids"])  # null (NaN in all-null parts)
            continue
        assert pd.isna(row["error"]), (row["path"], row["error"])
        ids, scores = reference[want]
        assert list(row["top_ids"]) == ids, row["path"]
        np.testing.assert_allclose(row["top_scores"], scores, atol=1e-4)
        assert list(row["top_labels"]) == [f"c{i}" for i in ids]
    plan = json.loads(st.read_text(f"{out}/_PLAN.json"))
    assert plan["layout"] == layout
    (first_gen,) = plan["generations"]  # one run's inputs (no --relist): one generation
    _, _, units, inputs, _ = first_gen
    # units are the containers, each read to its end (a marker each)
    assert plan["mode"] == "tars" and units == len(st.list_files(f"{out}/_TARS"))


def test_layout_selection_errors(s3_server, layouts, classifier, tmp_path, photos):
    bucket, _ = layouts
    with pytest.raises(ConfigError, match="layout"):
        parse_args(LabelConfig, ["--layout", "zip"])
    with pytest.raises(ConfigError, match="manifest needs"):
        parse_args(LabelConfig, ["--layout", "manifest", "--input", "s3://b/photos/"])
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.jpg").write_bytes(jpeg_bytes(photos["chelsea"]))
    (mixed / "b.tar").write_bytes(tar_bytes([("x.jpg", jpeg_bytes(photos["coffee"]))]))
    cfg = _cfg(input=mixed, output=tmp_path / "out", checkpoint=classifier)
    with pytest.raises(ConfigError, match="mixes 1 tar files, 1 image files"):
        label(cfg)  # auto never drops one kind silently
    from beit_ray.infer.inputs import resolve_layout
    from beit_ray.infer.plan import build_plan

    # an explicit layout picks one kind; a single tar or parquet file is an input too
    outs = iter(range(10))

    def units(cfg: LabelConfig) -> tuple[str, list[str]]:
        """The layout and the files its plan reads (the listing holds every file)."""
        cfg.output = str(tmp_path / f"o{next(outs)}")
        layout, listing = resolve_layout(cfg)
        plan = build_plan(cfg, layout, listing)
        if plan.mode == "tars":  # streamed tars: the plan's units are the tars
            return layout, [u for g in plan.generations for u in Units(g.uri, g.chunks).paths()]
        entries = [e for c in range(plan.chunks) for e in plan.entries(c, None)]
        return layout, sorted({e.container or e.path for e in entries})

    assert units(_cfg(input=mixed, layout="files", checkpoint=classifier))[1] == [
        str(mixed / "a.jpg"),
        str(mixed / "b.tar"),
    ]
    assert units(_cfg(input=mixed, layout="class_tars", checkpoint=classifier))[1] == [
        str(mixed / "b.tar")
    ]
    one = f"s3://{bucket}/pq/a.parquet"
    assert units(_cfg(input=one, checkpoint=classifier)) == ("parquet", [one])
    one = f"s3://{bucket}/wds/shard-000000.tar"
    assert units(_cfg(input=one, checkpoint=classifier)) == ("webdataset", [one])


def test_throttled_store_loses_no_image_and_writes_no_error_row(
    ray_session, layouts, classifier, tmp_path, monkeypatch
):
    """S3 answers SlowDown (503) to every tar and parquet object's first 7 GETs, more than the
    6 tries s3fs and botocore make of one request: the readers back off and retry, so the
    output is the same as unthrottled, every input once, no error row but the inputs' own."""
    bucket, expect = layouts
    throttled = (".tar", ".parquet")

    def slow_down(method: str, path: str, n: int) -> bool:  # the outputs' own files too
        return method == "GET" and path.endswith(throttled) and n <= 7

    for layout, src in (("class_tars", "ctars"), ("parquet", "pq")):
        out = f"s3://{bucket}/throttled-{layout}"
        cfg = _cfg(input=f"s3://{bucket}/{src}", output=out, checkpoint=classifier, chunk_size=3)
        with moto_requests(slow_down) as got:
            summary = label(cfg)
        assert got["throttled"] >= 7 * 2, got  # every container was throttled, past the transport
        assert summary["preview"] and st.exists(f"{out}/_PREVIEW.html")  # its part reads retried
        df = read_parts(out).to_pandas()
        assert len(df) == df["path"].nunique() == len(expect[layout]) == summary["files"]
        assert set(df["path"]) == set(expect[layout])
        bad = {p for p, want in expect[layout].items() if want.startswith("!")}
        errs = {p: e for p, e in zip(df["path"], df["error"], strict=True) if pd.notna(e)}
        assert set(errs) == bad, [errs[p] for p in sorted(set(errs) - bad)][:3]
        assert not any("SlowDown" in str(e) or "503" in str(e) for e in df["error"].dropna())
