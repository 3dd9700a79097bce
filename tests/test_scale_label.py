"""Labelling at scale, piece by piece: streamed sorted listing, the chunk plan in parquet, the
ledger (coverage without reading parts), tar members read once by offset, errors per task."""

from __future__ import annotations

import hashlib
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import tar_bytes

from beit_ray import storage as st
from beit_ray.data import containers
from beit_ray.infer import inputs, plan, tars
from beit_ray.infer.config import LabelConfig
from beit_ray.infer.inputs import Entry, fetch, list_inputs
from beit_ray.infer.label import part_name, write_part
from beit_ray.infer.plan import Ledger, Plan, PlanWriter, coverage, read_chunk


def _cfg(src, out, **kw) -> LabelConfig:
    return LabelConfig(input=str(src), output=str(out), checkpoint="x", **kw)


def test_listing_walks_in_path_order_and_skips_hidden(tmp_path, monkeypatch):
    from beit_ray.data import walk

    monkeypatch.setattr(walk, "RUN_FILES", 3)  # runs of 3 files: several parts
    monkeypatch.setattr(walk, "DIRS_PER_TASK", 1)  # a walking task per top-level folder
    src = tmp_path / "in"
    names = ["a.jpg", "a/b.jpg", "a/c/d.png", "a-b.jpg", "b.jpg", "z/y.jpg", "a0.jpg", "ä.jpg"]
    for n in names + [".DS_Store", "_SUCCESS", "a/.hidden/x.jpg", "out/part-00000.parquet"]:
        (src / n).parent.mkdir(parents=True, exist_ok=True)
        (src / n).write_bytes(b"x" * len(n))
    cfg = _cfg(src, src / "out")
    units = list_inputs(cfg)
    paths = units.paths()
    assert paths == sorted(str(src / n) for n in names)  # full-path order, nothing hidden
    sizes = [s for b in units.batches(None) for s in b.column("size").to_pylist()]
    assert sizes == [len(p) - len(str(src)) - 1 for p in paths]
    assert units.count == len(names) and units.kinds == {"tar": 0, "parquet": 0, "image": 8}
    assert len(units.parts) >= 3 and not units.reused
    monkeypatch.setattr(inputs, "walk", lambda *a, **k: pytest.fail("listed again"))
    again = list_inputs(cfg)  # a rerun reads the saved listing back: nothing is walked
    assert again.reused and again.paths() == paths and again.count == units.count
    (src / "new.jpg").write_bytes(b"n")
    cfg.relist = True
    monkeypatch.undo()
    relisted = list_inputs(cfg)  # --relist walks it again, into a new version
    assert len(relisted.paths()) == len(names) + 1 and relisted.version == units.version + 1


def test_plan_chunks_roundtrip_and_digest(tmp_path, monkeypatch):
    monkeypatch.setattr(plan, "INPUTS_PER_ROW_GROUP", 6)  # 2 chunks of 3 per row group
    uri = str(tmp_path / "_INPUTS.parquet")
    entries = [Entry(f"p{i:02d}", "tar", "t.tar", f"m{i}", 512 * i, i) for i in range(10)]
    writer = PlanWriter(uri, 3, None)
    for e in entries:
        writer.add(e)
    writer.close()
    p = writer.plan(uri)
    assert (p.inputs, p.chunks) == (10, 4) and p.chunk_rows(3) == 1
    want = hashlib.sha256("\n".join(e.path for e in entries).encode()).hexdigest()
    assert p.inputs_sha256 == want  # the same digest as plans of earlier versions
    assert pq.ParquetFile(uri).metadata.num_row_groups == 2
    for c in (3, 0, 2, 1):  # any order: each read finds its row group
        assert read_chunk(uri, c, 3, None) == entries[3 * c : 3 * c + 3]
    # a folder (what build_plan writes): files of at most GROUPS_PER_FILE row groups each
    monkeypatch.setattr(plan, "GROUPS_PER_FILE", 1)
    folder = str(tmp_path / "_INPUTS")
    writer = PlanWriter(folder, 3, None)
    for e in entries:
        writer.add(e)
    writer.close()
    assert sorted(os.listdir(folder)) == ["part-000000.parquet", "part-000001.parquet"]
    for c in (3, 0, 2, 1):
        assert read_chunk(folder, c, 3, None, "v2") == entries[3 * c : 3 * c + 3]


def _part(out, chunk: int, paths: list[str], errors: list[str | None]) -> None:
    table = pa.table({"path": paths, "error": errors, "chunk": [chunk] * len(paths)})
    write_part(table, str(out), chunk, None)


def test_coverage_from_ledger_and_footers_without_reading_rows(tmp_path, monkeypatch):
    out = tmp_path / "out"
    p = Plan("unused", inputs=7, chunks=3, inputs_sha256="", chunk_size=3)
    _part(out, 0, ["a", "b", "c"], [None, "corrupt: x", None])
    _part(out, 1, ["d", "e", "f"], ["empty: y", "corrupt: z", None])
    _part(out, 2, ["g"], [None])
    ledger = Ledger(str(out), None)
    ledger.add(0, 3, 1, {"corrupt": 1})
    ledger.flush()  # chunks 1 and 2 were written after the last flush: a crash

    def part_uri(c: int) -> str:
        return str(out / part_name(c))

    fresh = Ledger(str(out), None).load()
    reads = []
    real = plan.part_footer_counts
    monkeypatch.setattr(plan, "part_footer_counts", lambda u, s: reads.append(u) or real(u, s))
    got = coverage(p, {0, 1, 2}, fresh, part_uri, None)
    assert got["rows"] == 7 and got["errors"] == 3 and got["recovered"] == 2
    assert got["reasons"] == {"corrupt": 2, "empty": 1}
    assert sorted(reads) == [part_uri(1), part_uri(2)]  # footers only, of the unrecorded parts
    fresh.compact()
    assert len(list((out / "_PARTS").glob("seg-*.parquet"))) == 1

    def no_reads(*_a: object) -> None:
        raise AssertionError("a part was read")

    monkeypatch.setattr(plan, "part_footer_counts", no_reads)
    monkeypatch.setattr(pq, "read_table", no_reads)
    again = Ledger(str(out), None)
    monkeypatch.undo()  # loading the ledger reads its own (small) file
    again.load()
    monkeypatch.setattr(plan, "part_footer_counts", no_reads)
    assert coverage(p, {0, 1, 2}, again, part_uri, None)["rows"] == 7
    bad = Plan("unused", inputs=8, chunks=3, inputs_sha256="", chunk_size=3)
    with pytest.raises(RuntimeError, match="part 2 has 1 rows, its chunk 2"):
        coverage(bad, {0, 1, 2}, again, part_uri, None)
    meta = pq.read_metadata(part_uri(1)).metadata[plan.PART_META_KEY]
    assert json.loads(meta) == {"rows": 3, "errors": 2, "reasons": {"empty": 1, "corrupt": 1}}


def test_tar_members_read_once_by_offset(tmp_path, monkeypatch):
    members = [(f"n01_{i}.JPEG", bytes([i]) * (3000 + 100 * i)) for i in range(10)]
    path = tmp_path / "n01.tar"
    path.write_bytes(tar_bytes(members))
    index = list(containers.members(str(path)))  # headers only: names, offsets, sizes
    assert [m.name for m in index] == [n for n, _ in members]
    assert all(m.data is None for m in index)
    entries = tars.list_container(str(path), "class_tars", "image", None)
    assert [e.size for e in entries] == [len(d) for _, d in members]

    spans = []
    real = containers.read_span
    monkeypatch.setattr(
        containers, "read_span", lambda u, a, b, s: spans.append((a, b)) or real(u, a, b, s)
    )
    got = []
    for c in range(0, 10, 4):  # chunks of 4 members: one ranged read each, no overlap
        blobs, errors = fetch(entries[c : c + 4], None, "image")
        assert errors == [""] * len(blobs)
        got += blobs
    assert got == [d for _, d in members] and len(spans) == 3
    read = sum(b - a for a, b in spans)
    assert read <= 1.05 * path.stat().st_size
    assert all(spans[i][1] <= spans[i + 1][0] for i in range(len(spans) - 1))

    cut = tmp_path / "cut.tar"  # cut inside the second member's data
    cut.write_bytes(path.read_bytes()[: 512 + 3000 + 512 + 512 + 1000])
    entries = tars.list_container(str(cut), "class_tars", "image", None)
    assert [e.path for e in entries] == [f"{cut}/n01_0.JPEG", f"{cut}/n01_1.JPEG", str(cut)]
    assert entries[-1].kind == "error" and entries[-1].member.startswith("read_failed")
    blobs, errors = fetch(entries, None, "image")
    assert errors[0] == "" and blobs[0] == members[0][1]
    assert errors[1].startswith("read_failed") and errors[2].startswith("read_failed")


@pytest.mark.integration
def test_errors_written_once_per_task(ray_session, tmp_path):
    import numpy as np

    from beit_ray.data.pipeline import read_errors, write_errors  # still importable there

    uri = str(tmp_path / "errors")

    def fail_all(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        recs = [{"key": str(i), "path": "p", "reason": "corrupt: x"} for i in batch["id"]]
        write_errors(recs, uri, None)
        return batch

    ds = ray_session.data.range(1000, override_num_blocks=4).map_batches(fail_all, batch_size=10)
    assert ds.count() == 1000
    records = read_errors(uri)
    assert sorted(int(r["key"]) for r in records) == list(range(1000))  # all there at the end
    files = list((tmp_path / "errors").glob("*.jsonl"))
    assert 1 <= len(files) <= 4  # one per task, not one per failing batch (100 batches)
    st.write_text(str(tmp_path / "direct" / "x"), "")  # outside a task: written at once
    write_errors([{"key": "k", "path": "p", "reason": "r"}], str(tmp_path / "direct"), None)
    assert len(read_errors(str(tmp_path / "direct"))) == 1


def test_manifest_commits_append_and_fold(tmp_path):
    from beit_ray.data import materialize as m

    out = str(tmp_path / "shards")
    manifest = {"format": "x", "plan_hash": "h", "shards": {}}
    st.makedirs(out)
    m._save_manifest(out, manifest, None)
    before = (tmp_path / "shards" / "manifest.json").stat().st_mtime_ns
    for wave in range(3):  # each wave adds one small file; manifest.json is left alone
        shard = {str(wave): {"wave": f"w{wave}", "files": [], "rows": 10, "errors": wave}}
        m._append_commit(out, manifest, shard, None)
    assert (tmp_path / "shards" / "manifest.json").stat().st_mtime_ns == before
    assert len(list((tmp_path / "shards" / "manifest.d").glob("commit-*.json"))) == 3
    loaded = m.load_manifest(out)
    assert sorted(loaded["shards"]) == ["0", "1", "2"] and loaded["rows"] == 30
    assert loaded["errors"] == 3 and loaded["compacted_through"] == 2
    m._compact(out, manifest, None)  # once per run: folded in, the commit files dropped
    assert not list((tmp_path / "shards" / "manifest.d").glob("commit-*.json"))
    assert m.load_manifest(out) == loaded
    del loaded["shards"]["2"]  # an edited manifest.json wins over commits it already holds
    m._save_manifest(out, loaded, None)
    m._append_commit(out, loaded, {"3": {"wave": "w3", "files": [], "rows": 1, "errors": 0}}, None)
    assert sorted(m.load_manifest(out)["shards"]) == ["0", "1", "3"]


def _stream(path: str, layout: str, chunk_size: int) -> list[tuple[Entry, bytes | None, str]]:
    out = []
    for entries, blobs, errors in tars.stream(path, layout, chunk_size, None, "image"):
        assert len(entries) <= chunk_size
        out += list(zip(entries, blobs, errors, strict=True))
    return out


@pytest.mark.parametrize("layout", ["class_tars", "webdataset"])
def test_streamed_tar_gives_the_listed_inputs_with_their_bytes(tmp_path, layout):
    if layout == "class_tars":
        members = [(f"./n01_{i}.JPEG", bytes([i]) * (700 + i)) for i in range(7)]
        members += [("._n01_0.JPEG", b"\0" * 9), ("n01_1.JPEG", b"copy")]  # AppleDouble, repeat
    else:  # samples: image + label, one without an image, one whose keys are split
        members = [("s0.jpg", b"a" * 900), ("s0.cls", b"1"), ("s1.json", b"{}"), ("s1.txt", b"t")]
        members += [("s2.cls", b"2"), ("s3.png", b"p" * 40), ("s2.jpg", b"j" * 30)]
    path = tmp_path / "x.tar"
    path.write_bytes(tar_bytes(members))
    listed = tars.list_container(str(path), layout, "image", None)
    streamed = _stream(str(path), layout, 3)
    # the same inputs (the local listing and the stream share one selection)
    assert sorted(e.path for e, _, _ in streamed) == sorted(e.path for e in listed)
    first = {}
    for name, data in members:
        first.setdefault(name.lstrip("./"), data)
    for e, data, error in streamed:
        if e.kind == "tar":
            assert error == "" and data == first[e.member.lstrip("./")]
        else:
            assert data is None and error.startswith("no_image")
    if layout == "webdataset":
        got = {e.path.rsplit("/", 1)[1]: error for e, _, error in streamed}
        assert set(got) == {"s0.jpg", "s1", "s3.png", "s2.jpg"}
        assert got["s1"] == "no_image: sample has only ['json', 'txt']"

    cut = tmp_path / "cut.tar"  # cut inside the fourth member's data: 3 rows, its, the tar's
    data = path.read_bytes()
    cut.write_bytes(data[: 3 * (512 + 1024) + 512 + 200] if layout == "class_tars" else data[:1500])
    streamed = _stream(str(cut), layout, 2)
    assert streamed[-1][0].path == str(cut) and streamed[-1][2].startswith("read_failed")
    bad = [e.path for e, _, error in streamed[:-1] if error]
    if layout == "class_tars":
        assert [e.member for e, _, _ in streamed[:3]] == [f"./n01_{i}.JPEG" for i in range(3)]
        assert bad == [f"{cut}/n01_3.JPEG"] and len(streamed) == 5


def test_streamed_parquet_gives_the_listed_rows_with_their_bytes(tmp_path, monkeypatch):
    """An object-store parquet file is labelled by one task reading each row group once
    (members mode read a row group per chunk touching it): the same rows, bytes and errors
    as the listing + :func:`fetch`, a null image an error row, a file without images one."""
    cells = [bytes([i]) * (50 + i) for i in range(7)] + [None]
    path = str(tmp_path / "x.parquet")
    pq.write_table(pa.table({"image": pa.array(cells, pa.binary())}), path, row_group_size=3)
    listed = tars.list_container(path, "parquet", "image", None)
    streamed = _stream(path, "parquet", 2)
    assert [e for e, _, _ in streamed] == listed
    blobs, errors = fetch(listed, None, "image")
    assert [d for _, d, _ in streamed] == blobs == cells
    assert [w for _, _, w in streamed] == errors == [""] * 7 + ["empty: null image"]
    reads = []
    read_row_group = pq.ParquetFile.read_row_group

    def counted(self, i, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        reads.append(i)
        return read_row_group(self, i, *a, **k)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counted)
    _stream(path, "parquet", 2)
    assert reads == [0, 1, 2]  # each row group once, in order
    bare = str(tmp_path / "y.parquet")
    pq.write_table(pa.table({"caption": ["x"]}), bare)
    ((entry, data, error),) = _stream(bare, "parquet", 2)
    assert entry.path == bare and data is None and error.startswith("read_failed: ValueError")


def test_streamed_tars_resume_by_marker_and_chunk(tmp_path):
    """A tar unit's chunks are ids tar × TAR_STRIDE + k; a rerun skips the written chunks of an
    unfinished tar and never reads a finished one (its marker and parts are there)."""
    from beit_ray.infer.plan import TAR_STRIDE, incomplete, pending_work, read_units, tar_marks

    tars = []
    for t, n in enumerate((5, 2)):
        p = tmp_path / f"n{t}.tar"
        p.write_bytes(tar_bytes([(f"n{t}_{i}.JPEG", bytes([i]) * 600) for i in range(n)]))
        tars.append(str(p))
    out = str(tmp_path / "out")
    units = inputs.Units(str(tmp_path / "_UNITS.parquet"), 2)
    pq.write_table(pa.table({"path": tars, "size": [0, 0]}), units.uri)
    p = Plan(units.uri, -1, 2, "", 2, mode="tars", layout="class_tars")

    def run(items: list[dict]) -> list[tuple[int, list[str]]]:
        batch = {k: [it[k] for it in items] for k in ("chunk", "tar", "skip")}
        got = read_units(batch, p, None, "image", out)
        return [(c, [e.member for e in entries]) for c, entries, _, _ in got]

    items, resumed = pending_work(p, set(), {}, None)
    assert resumed == 0 and [i["skip"] for i in items] == ["", ""]
    # a crash: tar 0 read to its end, only chunks 0 and 2 of its 3 written; tar 1 not begun
    got = run(items[:1])
    assert [c for c, _ in got] == [0, 1, 2] and got[2][1] == ["n0_4.JPEG"]
    assert tar_marks(out, None) == {0: 5}
    done = {0, 2}
    assert (
        incomplete(p, done, tar_marks(out, None))
        == "1 tars not read to their end, 1 chunks missing"
    )
    items, resumed = pending_work(p, done, tar_marks(out, None), None)
    assert resumed == 0 and [(i["chunk"], i["skip"]) for i in items] == [(0, "0,2"), (1, "")]
    got = run(items)
    assert [c for c, _ in got] == [1, TAR_STRIDE] and got[0][1] == ["n0_2.JPEG", "n0_3.JPEG"]
    done |= {1, TAR_STRIDE}
    marks = tar_marks(out, None)
    assert marks == {0: 5, 1: 2} and incomplete(p, done, marks) == ""
    assert pending_work(p, done, marks, None) == ([], 2)
    assert [p.chunk_rows(c, marks) for c in (0, 2, TAR_STRIDE)] == [2, 1, 2]
    assert not p.holds(3, marks) and not p.holds(2 * TAR_STRIDE, marks) and p.holds(2, marks)
