"""Batch labelling over moto's S3 server: all tasks, bad files, resumption, equality with HF."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO, jpeg_bytes
from PIL import Image

from beit_ray import storage as st
from beit_ray.config import ConfigError, parse_args, run_job
from beit_ray.infer.config import LabelConfig
from beit_ray.infer.label import LabelInterrupted, label, part_name, read_parts

pytestmark = pytest.mark.integration

MAX_PIXELS = 1_000_000  # the "oversized" file below is 1200x1000; the photos are smaller
GOOD = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_files(photos: dict[str, np.ndarray]) -> dict[str, bytes]:
    """Real photos plus every kind of awkward file, keyed by relative path."""
    files = {f"photos/{name}.jpg": jpeg_bytes(photos[name]) for name in GOOD}
    files["photos/astronaut_copy.png"] = _png(Image.fromarray(photos["astronaut"]))
    cmyk = io.BytesIO()
    Image.fromarray(photos["coffee"]).convert("CMYK").save(cmyk, format="JPEG", quality=90)
    files["odd/cmyk.jpg"] = cmyk.getvalue()
    gray16 = (photos["rocket"][..., 0].astype(np.uint16) * 257).astype(np.uint16)
    files["odd/gray16.png"] = _png(Image.fromarray(gray16))  # mode I;16
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display: stored 451x300, shown 300x451
    rot = io.BytesIO()
    Image.fromarray(photos["chelsea"]).save(rot, format="JPEG", quality=90, exif=exif)
    files["odd/exif_rotated.jpg"] = rot.getvalue()
    files["odd/oversized.png"] = _png(Image.new("RGB", (1200, 1000), (10, 200, 30)))
    good = jpeg_bytes(photos["coffee"])
    files["bad/truncated.jpg"] = good[: len(good) // 3]
    files["bad/corrupt.jpg"] = good[:20] + np.random.default_rng(0).bytes(5000)
    files["bad/empty.jpg"] = b""
    files["bad/notes.txt"] = b"not an image at all\n"
    files[".hidden/ignored.jpg"] = good  # hidden: not an input
    return files


BAD_REASONS = {
    "odd/oversized.png": ("too_large",),
    "bad/truncated.jpg": ("truncated", "corrupt"),
    "bad/corrupt.jpg": ("corrupt", "truncated", "not_an_image"),
    "bad/empty.jpg": ("empty",),
    "bad/notes.txt": ("not_an_image",),
}


@pytest.fixture(scope="module")
def bucket(s3_server, photos) -> str:
    """A module-wide bucket: photos under s3://B/in/, checkpoints under s3://B/ckpt/."""
    import boto3

    name = "label-" + os.urandom(4).hex()
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    for rel, data in make_files(photos).items():
        st.write_bytes(f"s3://{name}/in/{rel}", data)
    return name


@pytest.fixture(scope="module")
def checkpoints(bucket, tmp_path_factory) -> dict[str, str]:
    """Tiny random debug models exported in HF format: local folders and s3:// copies."""
    from beit_ray.models.build import build_model
    from beit_ray.models.load import export_hf

    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    out = {}
    for task, n in (("classification", 10), ("segmentation", 5)):
        model = build_model("debug", task, num_labels=n)
        local = str(root / task)
        export_hf(model, local, id2label={i: f"{task[:3]}_{i}" for i in range(n)})
        st.upload_dir(local, f"s3://{bucket}/ckpt/{task}")
        out[task] = local
        out[f"s3-{task}"] = f"s3://{bucket}/ckpt/{task}"
    return out


def _cfg(**kw: object) -> LabelConfig:
    argv: list[str] = []
    for k, v in kw.items():
        argv += [f"--{k.replace('__', '.')}", str(v)]
    argv += [
        "--ray.num_cpus",
        "4",
        "--predict.max_pixels",
        str(MAX_PIXELS),
        "--actors.num_cpus",
        "0.5",
    ]
    return parse_args(LabelConfig, argv)


def decoded(data: bytes) -> np.ndarray:
    from beit_ray.data.decode import decode_image

    return decode_image(data)


def test_classify_s3_matches_transformers(ray_session, bucket, checkpoints, photos):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    out = f"s3://{bucket}/out-classify"
    summary = label(
        _cfg(
            input=f"s3://{bucket}/in",
            output=out,
            checkpoint=checkpoints["s3-classification"],
            task="classify",
            predict__top_k=3,
            chunk_size=4,
        )
    )
    files = make_files(photos)
    inputs = {f"s3://{bucket}/in/{rel}" for rel in files if not rel.startswith(".")}
    df = read_parts(out).to_pandas().set_index("path")
    assert set(df.index) == inputs and len(df) == len(inputs)  # one row per file, nothing else
    assert summary["files"] == len(inputs) and summary["errors"] == len(BAD_REASONS)
    assert st.exists(f"{out}/_SUMMARY.json") and summary["images_per_s"] > 0
    # start-up (workers, actor, model load) until the first result, then the steady rate
    assert 0 < summary["seconds_to_first_result"] <= summary["seconds"]
    steady = summary["images_per_s_after_first"]  # None: every row came in the first batch
    assert steady is None or steady > 0
    for rel, reasons in BAD_REASONS.items():
        row = df.loc[f"s3://{bucket}/in/{rel}"]
        assert row["error"] and row["error"].split(":")[0] in reasons, (rel, row["error"])
        assert row["top_ids"] is None
    assert df.loc[f"s3://{bucket}/in/odd/exif_rotated.jpg", ["height", "width"]].tolist() == [
        451,
        300,
    ]

    processor = AutoImageProcessor.from_pretrained(checkpoints["classification"])
    model = AutoModelForImageClassification.from_pretrained(checkpoints["classification"]).eval()
    ok = df[df["error"].isna()]
    assert len(ok) == len(inputs) - len(BAD_REASONS)
    for path, row in ok.iterrows():
        data = files[path.split("/in/", 1)[1]]
        pil = Image.fromarray(decoded(data))
        if path.endswith(("photos/astronaut.jpg", "photos/astronaut_copy.png")):
            pil = Image.open(io.BytesIO(data)).convert("RGB")  # plain PIL agrees on plain files
        with torch.no_grad():
            probs = model(**processor(pil, return_tensors="pt")).logits.softmax(-1)[0]
        scores, ids = probs.topk(3)
        assert list(row["top_ids"]) == ids.tolist(), path
        np.testing.assert_allclose(row["top_scores"], scores.numpy(), atol=1e-4)
        assert list(row["top_labels"]) == [f"cla_{i}" for i in ids.tolist()]


def test_embed_and_segment(ray_session, bucket, checkpoints, photos):
    from transformers import AutoImageProcessor, AutoModel

    from beit_ray.models.load import load_model

    files = make_files(photos)
    subset = ["photos/coffee.jpg", "photos/rocket.jpg", "odd/exif_rotated.jpg", "bad/notes.txt"]
    manifest = f"s3://{bucket}/manifest.csv"
    st.write_text(
        manifest,
        "uri\n"
        + "\n".join(f"s3://{bucket}/in/{r}" for r in subset)
        + f"\ns3://{bucket}/in/missing.jpg\n",
    )

    out = f"s3://{bucket}/out-embed"
    label(_cfg(input=manifest, output=out, checkpoint=checkpoints["classification"], task="embed"))
    emb = read_parts(out).to_pandas().set_index("path")
    assert len(emb) == len(subset) + 1
    assert emb.loc[f"s3://{bucket}/in/missing.jpg", "error"].startswith("read_failed")
    processor = AutoImageProcessor.from_pretrained(checkpoints["classification"])
    encoder = AutoModel.from_pretrained(checkpoints["classification"]).eval()
    for rel in subset[:3]:
        vec = np.asarray(emb.loc[f"s3://{bucket}/in/{rel}", "embedding"], dtype=np.float32)
        with torch.no_grad():
            ref = encoder(
                **processor(Image.fromarray(decoded(files[rel])), return_tensors="pt")
            ).pooler_output[0]
        assert vec.shape == (64,)
        np.testing.assert_allclose(vec, ref.numpy(), atol=1e-4)

    out = f"s3://{bucket}/out-segment"
    label(
        _cfg(input=manifest, output=out, checkpoint=checkpoints["s3-segmentation"], task="segment")
    )
    seg = read_parts(out).to_pandas().set_index("path")
    processor = AutoImageProcessor.from_pretrained(checkpoints["segmentation"])
    # our class on the export (transformers' UperNet on it gives the same logits, upsampled to
    # its input inside the forward: tests/test_models_upernet.py)
    segmenter = load_model(checkpoints["segmentation"])
    for rel in subset[:3]:
        row = seg.loc[f"s3://{bucket}/in/{rel}"]
        png = Image.open(io.BytesIO(st.read_bytes(row["mask_uri"])))
        assert png.mode == "P"  # the shared palette: a viewer shows colours, values are ids
        mask = np.asarray(png)
        image = decoded(files[rel])
        assert mask.shape == image.shape[:2] == (row["height"], row["width"])
        with torch.no_grad():
            outputs = segmenter(**processor(Image.fromarray(image), return_tensors="pt"))
        ref = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.shape[:2]])[
            0
        ]
        assert (mask == ref.numpy()).mean() > 0.999
        counts = np.bincount(mask.ravel())
        assert list(row["class_ids"]) == np.flatnonzero(counts).tolist()
        assert list(row["pixel_counts"]) == counts[counts > 0].tolist()
    assert pd.isna(seg.loc[f"s3://{bucket}/in/bad/notes.txt", "mask_uri"])


def test_interrupt_and_rerun(ray_session, photos, checkpoints, tmp_path):
    files = make_files(photos)
    src = tmp_path / "in"
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    out = tmp_path / "out"
    cfg = _cfg(
        input=src,
        output=out,
        checkpoint=checkpoints["classification"],
        task="classify",
        chunk_size=3,
    )
    n_inputs = len([r for r in files if not r.startswith(".")])
    n_chunks = -(-n_inputs // 3)

    with pytest.raises(LabelInterrupted):
        label(cfg, stop_after_chunks=2)
    first = sorted(str(p.relative_to(out)) for p in out.glob("parts/*/part-*.parquet"))
    assert len(first) == 2 and not list(out.glob("parts/*/.part-*"))  # no partial files left
    stamps = {name: (out / name).stat().st_mtime_ns for name in first}

    summary = label(cfg)  # the same command again finishes the rest
    assert summary["chunks_resumed"] == 2 and summary["processed_this_run"] == n_inputs - 6
    assert {name: (out / name).stat().st_mtime_ns for name in first} == stamps  # not redone
    table = read_parts(str(out))
    paths = table.column("path").to_pylist()
    assert len(paths) == len(set(paths)) == n_inputs  # no duplicates, no gaps
    full = table.to_pandas().set_index("path").sort_index()

    (out / part_name(1)).unlink()  # lose a middle chunk: the rerun rewrites just that one
    summary = label(cfg)
    assert (
        summary["processed_this_run"] == 3
        and len(list(out.glob("parts/*/part-*.parquet"))) == n_chunks
    )
    again = read_parts(str(out)).to_pandas().set_index("path").sort_index()
    assert again.index.tolist() == full.index.tolist()
    assert (
        again["top_ids"].map(lambda x: None if x is None else list(x)).tolist()
        == full["top_ids"].map(lambda x: None if x is None else list(x)).tolist()
    )
    assert pq.read_table(out / part_name(0)).num_rows == 3

    with pytest.raises(ConfigError, match="another run"):  # a different plan is refused
        label(
            _cfg(
                input=src,
                output=out,
                checkpoint=checkpoints["classification"],
                task="classify",
                chunk_size=5,
            )
        )


def test_job_cli_and_config_errors(ray_session, photos, checkpoints, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("label_job", "jobs/label.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)  # type: ignore[union-attr]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(jpeg_bytes(photos["chelsea"]))
    argv = [
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(tmp_path / "out"),
        "--checkpoint",
        checkpoints["segmentation"],
        "--task",
        "segment",
        "--actors.num_cpus",
        "0.5",
    ]
    assert job.main(argv) == 0
    assert "1/1 labelled" in capsys.readouterr().out
    assert (tmp_path / "out" / "_masks" / "a.jpg.png").exists()
    # missing output/checkpoint: a clear config error, exit 2 (every job ends in run_job)
    assert run_job(job.main, ["--input", "x"]) == 2
    assert "output: is required" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="predict.top_k"):
        parse_args(LabelConfig, ["--predict.top_k", "0"])
    with pytest.raises(ConfigError, match="actors.max_actors"):
        parse_args(LabelConfig, ["--actors.min_actors", "3", "--actors.max_actors", "2"])
    # a checkpoint without the task's head is refused, never given a random one
    bad = _cfg(
        input=tmp_path / "in", output=tmp_path / "o2", checkpoint=checkpoints["segmentation"]
    )
    with pytest.raises(ConfigError, match="needs a .*ForImageClassification"):
        label(bad)  # checked before any Ray work
    from beit_ray.infer.predictor import Predictor

    with pytest.raises(ValueError, match="segmentation checkpoint"):
        Predictor(checkpoints["segmentation"], "classify")


def test_banded_upsampling_matches_interpolate():
    import torch.nn.functional as F

    from beit_ray.infer import predictor

    logits = torch.randn(7, 9, 13, generator=torch.Generator().manual_seed(0))
    ref = (
        F.interpolate(logits[None], size=(61, 83), mode="bilinear", align_corners=False)[0]
        .argmax(0)
        .numpy()
    )
    saved = predictor.UPSAMPLE_BUDGET
    predictor.UPSAMPLE_BUDGET = 7 * 83 * 5  # force bands of 5 rows
    try:
        banded = predictor.upsample_argmax(logits, 61, 83)
    finally:
        predictor.UPSAMPLE_BUDGET = saved
    assert (banded == ref).mean() > 0.999


def test_bfloat16_predictions_stay_close_to_float32(checkpoints, photos):
    """predict.dtype=bfloat16 (the fast CPU/GPU path) reaches the actor and stays near fp32."""
    from beit_ray.infer.label import PredictorActor, decode_batch
    from beit_ray.infer.predictor import Predictor

    images = [photos[k] for k in sorted(photos)[:3]]
    fp32 = Predictor(checkpoints["classification"], "classify", top_k=10)
    bf16 = Predictor(checkpoints["classification"], "classify", top_k=10, dtype="bfloat16")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    for a, b in zip(fp32.predict(images), bf16.predict(images), strict=True):
        sa = dict(zip(a["top_ids"].tolist(), a["top_scores"], strict=True))
        sb = dict(zip(b["top_ids"].tolist(), b["top_scores"], strict=True))
        assert max(abs(sa[k] - sb[k]) for k in sa) < 2e-2
    # the labelling actor builds its predictor with the configured dtype
    actor = PredictorActor(
        checkpoints["classification"], "classify", None, 5, "pooled", 1, 0.0, dtype="bfloat16"
    )
    assert actor.predictor.dtype == torch.bfloat16
    blobs = [io.BytesIO() for _ in images]
    for buf, img in zip(blobs, images, strict=True):
        Image.fromarray(img).save(buf, format="PNG")
    batch = decode_batch([b.getvalue() for b in blobs], [""] * 3, fp32.preprocessor, MAX_PIXELS)
    table = actor.rows({**batch, "path": np.array(["a", "b", "c"]), "chunk": np.zeros(3, np.int64)})
    assert table.num_rows == 3 and table.column("error").null_count == 3
    want = bf16.predict(images, top_k=5)
    assert table.column("top_ids").to_pylist() == [w["top_ids"].tolist() for w in want]
    got = np.array(table.column("top_scores").to_pylist())
    assert np.allclose(got, np.stack([w["top_scores"] for w in want]), atol=1e-6)


def test_collect_times_the_first_result_and_the_rate_after_it(tmp_path):
    """Start-up (until the first written part) is reported apart from the steady rate after it;
    every part's counts reach the ledger, which a fresh load reads back."""
    import time

    from beit_ray.infer.label import _collect
    from beit_ray.infer.plan import Ledger

    def batch(chunks: list[int]) -> dict[str, np.ndarray]:  # what the actors return, per part
        return {"chunk": np.array(chunks), "rows": np.array([4] * len(chunks)),
                "errors": np.array([c % 2 for c in chunks]),
                "reasons": np.array(['{"corrupt": 1}' if c % 2 else "{}" for c in chunks],
                                    dtype=object)}  # fmt: skip

    class Stream:  # what Ray Data's iter_batches yields, paced
        def iter_batches(self, **_):
            time.sleep(0.3)  # start-up
            for chunks in ([0], [1], [2]):
                yield batch(chunks)
                time.sleep(0.1)

    ledger = Ledger(str(tmp_path), None)
    start = time.perf_counter()
    processed, timing = _collect(Stream(), ledger, start)
    ledger.flush()
    assert processed == 12
    assert 0.3 <= timing["seconds_to_first_result"] < 0.6
    assert 8 / 0.4 < timing["images_per_s_after_first"] <= 8 / 0.2  # 8 rows in ~0.2 s
    again = Ledger(str(tmp_path), None).load().entries
    assert again == {0: (4, 0, ""), 1: (4, 1, '{"corrupt": 1}'), 2: (4, 0, "")}
    one = type("One", (), {"iter_batches": lambda self, **_: iter([batch([0, 1])])})()
    _, timing = _collect(one, Ledger(str(tmp_path / "b"), None), time.perf_counter())
    assert timing["images_per_s_after_first"] is None  # a single batch: no rate after it


def test_a_rerun_reuses_its_listing_and_relist_labels_only_what_is_new(
    ray_session, photos, checkpoints, tmp_path, capsys
):
    """A growing input: a rerun reads nothing again (the saved plan); objects added since are
    not seen until --relist, which labels them as new chunks after the old ones, once each,
    and keeps the rows of files that are gone."""
    from beit_ray.infer import inputs

    src = tmp_path / "in"
    jpg = {n: jpeg_bytes(photos[n]) for n in ("astronaut", "chelsea", "coffee", "rocket")}
    for i, (n, data) in enumerate(jpg.items()):
        (src / f"{i}-{n}.jpg").parent.mkdir(parents=True, exist_ok=True)
        (src / f"{i}-{n}.jpg").write_bytes(data)
    out = tmp_path / "out"
    args = dict(input=src, output=out, checkpoint=checkpoints["classification"], chunk_size=3)
    assert label(_cfg(**args))["processed_this_run"] == 4
    (src / "9-new.jpg").write_bytes(jpg["coffee"])  # added after the first run
    (src / "2-coffee.jpg").unlink()  # and one gone

    real_walk = inputs.walk
    inputs.walk = lambda *a, **k: pytest.fail("a plain rerun walked the input")
    try:
        assert label(_cfg(**args))["processed_this_run"] == 0  # the saved plan: no listing
    finally:
        inputs.walk = real_walk
    capsys.readouterr()
    summary = label(_cfg(**args, relist=True))
    said = capsys.readouterr().out
    assert "1 new (labelled now), 1 gone since" in said
    assert summary["processed_this_run"] == 1 and summary["files"] == 5
    table = read_parts(str(out)).to_pandas()
    paths = table["path"].tolist()
    assert len(paths) == len(set(paths)) == 5 and str(src / "9-new.jpg") in paths
    assert str(src / "2-coffee.jpg") in paths  # labelled before it went: its row stays
    assert sorted(str(p.relative_to(out)) for p in out.glob("parts/*/part-*.parquet")) == [
        part_name(c) for c in (0, 1, 2)
    ]
    assert label(_cfg(**args, relist=True))["processed_this_run"] == 0  # nothing new since
    assert label(_cfg(**args))["processed_this_run"] == 0


def _small_tree(photos: dict[str, np.ndarray], root: Path, n: int) -> list[str]:
    """``n`` small real JPEGs (crops of the photos) under ``root``; their paths, sorted."""
    out = []
    names = list(GOOD)
    for i in range(n):
        img = photos[names[i % len(names)]][: 48 + i, : 64 + i]
        p = root / f"d{i % 3}" / f"{i:03d}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(jpeg_bytes(img))
        out.append(str(p))
    return sorted(out)


def _once_each(out: Path, paths: list[str]) -> None:
    table = read_parts(str(out)).to_pandas()
    got = table["path"].tolist()
    assert len(got) == len(set(got)) and sorted(got) == paths  # every input once, no more
    assert table["error"].isna().all(), table["error"].dropna().tolist()[:3]


def test_a_killed_model_actor_is_replaced_and_its_chunk_written_once(
    ray_session, photos, checkpoints, tmp_path
):
    paths = _small_tree(photos, tmp_path / "in", 12)
    out = tmp_path / "out"
    cfg = _cfg(
        input=tmp_path / "in", output=out, checkpoint=checkpoints["classification"],
        chunk_size=3, actors__fail_at_chunk=2,
    )  # fmt: skip
    summary = label(cfg)
    assert (out / "_debug" / "actor-killed-at-chunk-2").exists()  # the actor did die there
    assert summary["files"] == summary["ok"] == 12 and summary["chunks"] == 4
    _once_each(out, paths)


def test_a_killed_driver_resumes_with_every_input_once(ray_session, photos, checkpoints, tmp_path):
    """The job's driver (and its local Ray) SIGKILLed while chunks are being written; the same
    command again writes the rest, and each input has one row."""
    import signal
    import subprocess
    import sys
    import time

    paths = _small_tree(photos, tmp_path / "in", 40)
    out, ray_tmp = tmp_path / "out", f"/tmp/ray_kill_{os.getpid()}"
    args = ["--input", str(tmp_path / "in"), "--output", str(out), "--chunk_size", "2",
            "--checkpoint", checkpoints["classification"], "--ray.num_cpus", "4",
            "--ray.temp_dir", ray_tmp, "--actors.num_cpus", "0.5", "--actors.max_actors", "1"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
    proc = subprocess.Popen(
        [sys.executable, "jobs/label.py", *args], cwd=REPO, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while len(list(out.glob("parts/*/part-*.parquet"))) < 3 and proc.poll() is None:
            assert time.monotonic() < deadline, "the job wrote no part in 5 minutes"
            time.sleep(0.05)
        written = len(list(out.glob("parts/*/part-*.parquet")))
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, at once
    finally:
        proc.wait()
        _kill_leftovers(ray_tmp)
    assert proc.returncode == -signal.SIGKILL and 3 <= written < 20, (proc.returncode, written)
    before = {p: p.stat().st_mtime_ns for p in out.glob("parts/*/part-*.parquet")}
    summary = label(_cfg(input=tmp_path / "in", output=out, chunk_size=2,
                         checkpoint=checkpoints["classification"]))  # fmt: skip
    assert summary["chunks_resumed"] == len(before) and summary["files"] == 40
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # not redone
    _once_each(out, paths)


def _kill_leftovers(marker: str) -> None:
    """SIGKILL any process whose command line names ``marker`` (the killed job's Ray)."""
    import signal

    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    os.kill(int(pid), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


def test_a_killed_second_node_costs_no_input(photos, checkpoints, tmp_path):
    """Two raylets (ray.cluster_utils, in a child process with its own Ray): the second node is
    killed while chunks are in flight (read tasks are spread over both nodes); Ray Data reruns
    its tasks and actors on the head, and every input has one row."""
    from conftest import run_child

    paths = _small_tree(photos, tmp_path / "in", 40)
    out = tmp_path / "out"
    script = tmp_path / "kill_node.py"
    script.write_text(
        f"""
import glob, json, os, threading, time, ray
from ray.cluster_utils import Cluster
from beit_ray.config import parse_args
from beit_ray.infer.config import LabelConfig
from beit_ray.infer.label import label
c = Cluster(initialize_head=True, head_node_args={{"num_cpus": 2}})
node = c.add_node(num_cpus=2)
ray.init(address=c.address)
c.wait_for_nodes()
cfg = parse_args(LabelConfig, [
    "--input", {str(tmp_path / "in")!r}, "--output", {str(out)!r}, "--chunk_size", "2",
    "--checkpoint", {checkpoints["classification"]!r}, "--actors.num_cpus", "0.5",
    "--actors.max_actors", "2", "--storage.shared_paths", "[{tmp_path}]",
])
done = {{}}
t = threading.Thread(target=lambda: done.update(summary=label(cfg)))
t.start()
parts = lambda: glob.glob(os.path.join({str(out)!r}, "parts", "*", "part-*.parquet"))
while len(parts()) < 4:
    time.sleep(0.05)
written = len(parts())
c.remove_node(node, allow_graceful=False)
t.join()
end = time.monotonic() + 120  # the GCS marks a killed raylet dead after its health checks
while len([n for n in ray.nodes() if n["Alive"]]) > 1 and time.monotonic() < end:
    time.sleep(1)
alive = len([n for n in ray.nodes() if n["Alive"]])
ray.shutdown(); c.shutdown()
print("RESULT " + json.dumps({{"written": written, "alive": alive, **done["summary"]}}, default=str))
"""
    )
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    res = run_child([str(script)], env=env, timeout=600)
    assert res["alive"] == 1 and 4 <= res["written"] < 20  # killed mid-run
    assert res["files"] == res["ok"] == 40
    _once_each(out, paths)
