"""Labelling at scale, piece by piece: streamed sorted listing, the chunk plan in parquet, the
ledger (coverage without reading parts), tar members read once by offset, errors per task."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from beit_ray import storage as st
from beit_ray.infer import inputs, plan
from beit_ray.infer.config import LabelConfig
from beit_ray.infer.inputs import Entry, fetch, list_inputs, tar_index
from beit_ray.infer.label import part_name, write_part
from beit_ray.infer.plan import Ledger, Plan, PlanWriter, coverage, read_chunk


def _cfg(src, out, **kw) -> LabelConfig:
    return LabelConfig(input=str(src), output=str(out), checkpoint="x", **kw)


def test_listing_streams_sorted_and_skips_hidden(tmp_path, monkeypatch):
    monkeypatch.setattr(inputs, "LISTING_BATCH", 3)  # several row groups
    src = tmp_path / "in"
    names = ["a.jpg", "a/b.jpg", "a/c/d.png", "a-b.jpg", "b.jpg", "z/y.jpg", "a0.jpg", "ä.jpg"]
    for n in names + [".DS_Store", "_SUCCESS", "a/.hidden/x.jpg", "out/part-00000.parquet"]:
        (src / n).parent.mkdir(parents=True, exist_ok=True)
        (src / n).write_bytes(b"x" * len(n))
    units = list_inputs(_cfg(src, src / "out"))
    table = pq.read_table(units.uri)
    paths = table.column("path").to_pylist()
    assert paths == sorted(str(src / n) for n in names)  # full-path order, nothing hidden
    assert table.column("size").to_pylist() == [len(p) - len(str(src)) - 1 for p in paths]
    assert units.count == len(names) and units.kinds == {"tar": 0, "parquet": 0, "image": 8}
    assert pq.ParquetFile(units.uri).metadata.num_row_groups == 3


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


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_tar_members_read_once_by_offset(tmp_path, monkeypatch):
    members = [(f"n01_{i}.JPEG", bytes([i]) * (3000 + 100 * i)) for i in range(10)]
    path = tmp_path / "n01.tar"
    path.write_bytes(_tar(members))
    index, error = tar_index(str(path), None)
    assert error == "" and [n for n, _, _ in index] == [n for n, _ in members]
    entries = inputs.list_container(str(path), "class_tars", "image", None)
    assert [e.size for e in entries] == [len(d) for _, d in members]

    spans = []
    real = inputs._read_span
    monkeypatch.setattr(
        inputs, "_read_span", lambda u, a, b, s: spans.append((a, b)) or real(u, a, b, s)
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
    entries = inputs.list_container(str(cut), "class_tars", "image", None)
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
