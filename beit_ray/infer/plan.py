"""The labelling plan and the ledger of written parts, both parquet, neither in driver memory.

``_INPUTS.parquet`` holds one row per chunk (``chunk`` + list columns of its :class:`Entry`
fields), in row groups of ~4k inputs: a read task loads just its chunk's row group. The plan is
streamed from the listing; a rerun recomputes only its digest (files, manifest) or reuses it
outright (container layouts: the containers' digest matches), so tars are listed once.

Tars on an object store are planned whole instead (``mode`` tars): listing their members would
stream each tar once, and labelling would read the member spans again. One task per tar streams
it once and cuts it into chunks as its members arrive; chunk ``k`` of the ``t``-th tar (in the
sorted tar listing) is part ``t * TAR_STRIDE + k``. At its end the task writes the marker
``_TARS/tar-<t>-<inputs>``, so a rerun knows each finished tar's chunks from one listing, and
never reads a tar whose marker and parts are all there.

``_PARTS/seg-*.parquet`` is the ledger: (chunk, rows, errors, reasons) of every written part,
appended by the driver as parts complete and compacted at the end of a run. A part also keeps
its counts in its own footer (key ``beit_ray.part``), so a part written after the last ledger
flush (a crash) costs one footer read; a rerun never reads the parts' rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from beit_ray import storage as st
from beit_ray.config import ConfigError, StorageConfig
from beit_ray.infer.config import LabelConfig
from beit_ray.infer.inputs import CONTAINER_LAYOUTS, PLAN_NAME, Entry, Units, fetch
from beit_ray.infer.tars import list_container
from beit_ray.runtime import print0

INPUTS_NAME, LEDGER_DIR, MARKS_DIR = "_INPUTS.parquet", "_PARTS", "_TARS"
TAR_LAYOUTS = ("class_tars", "webdataset")
TAR_STRIDE = 100_000  # part ids of one streamed tar: tar index × TAR_STRIDE + its chunk
MARK_RE = re.compile(r"^tar-(\d+)-(\d+)$")
PART_META_KEY = b"beit_ray.part"
INPUTS_PER_ROW_GROUP = 4096
PLAN_SCHEMA = pa.schema(
    [("chunk", pa.int64())]
    + [(f, pa.list_(pa.int64() if f in ("offset", "size") else pa.string())) for f in Entry._fields]
)
LEDGER_SCHEMA = pa.schema(
    [("chunk", pa.int64()), ("rows", pa.int64()), ("errors", pa.int64()), ("reasons", pa.string())]
)


def chunks_per_group(chunk_size: int) -> int:
    return max(1, INPUTS_PER_ROW_GROUP // chunk_size)


class Digest:
    """sha256 of the lines joined by newlines, fed one line at a time."""

    def __init__(self) -> None:
        self._h, self._first = hashlib.sha256(), True

    def add(self, line: str) -> None:
        self._h.update(line.encode() if self._first else b"\n" + line.encode())
        self._first = False

    def hexdigest(self) -> str:
        return self._h.hexdigest()


@dataclass
class Plan:
    """What the chunks are made of (the parquet holds the entries)."""

    uri: str
    inputs: int
    chunks: int
    inputs_sha256: str
    chunk_size: int
    mode: str = "members"
    """members: fixed chunks of the listed inputs (``_INPUTS.parquet``); tars: ``chunks`` is the
    number of object-store tars, each streamed once by one task (``inputs`` unknown: -1)."""
    layout: str = ""

    def chunk_rows(self, c: int, marks: dict[int, int] | None = None) -> int | None:
        """Rows part ``c`` must hold (None: a streamed tar not yet read to its end)."""
        if self.mode != "tars":
            return min(self.chunk_size, self.inputs - c * self.chunk_size)
        t, k = divmod(c, TAR_STRIDE)
        n = (marks or {}).get(t)
        return None if n is None else min(self.chunk_size, n - k * self.chunk_size)

    def holds(self, c: int, marks: dict[int, int] | None = None) -> bool:
        """Part ``c`` belongs to this plan."""
        if self.mode != "tars":
            return 0 <= c < self.chunks
        rows = self.chunk_rows(c, marks)
        return 0 <= c // TAR_STRIDE < self.chunks and (rows is None or rows > 0)


class PlanWriter:
    """Entries in plan order → chunk rows, written a row group at a time."""

    def __init__(self, uri: str | None, chunk_size: int, storage: StorageConfig | None) -> None:
        self.chunk_size, self.inputs, self.digest = chunk_size, 0, Digest()
        self.group = chunks_per_group(chunk_size)
        self._chunk: list[Entry] = []
        self._rows: list[list[Entry]] = []
        self._chunks = 0
        self._writer = None
        if uri is not None:  # None: only count and digest (a rerun's check)
            fs, path = st.pyarrow_fs(uri, storage)
            if not st.is_remote(uri):
                os.makedirs(os.path.dirname(path), exist_ok=True)
            self._writer = pq.ParquetWriter(path, PLAN_SCHEMA, filesystem=fs)

    def add(self, e: Entry) -> None:
        self.inputs += 1
        self.digest.add(e.path)
        if self._writer is None:
            return
        self._chunk.append(e)
        if len(self._chunk) == self.chunk_size:
            self._end_chunk()

    def _end_chunk(self) -> None:
        if self._chunk:
            self._rows.append(self._chunk)
            self._chunk = []
        if len(self._rows) >= self.group:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        cols: dict[str, list[Any]] = {
            "chunk": list(range(self._chunks, self._chunks + len(self._rows)))
        }
        for k, f in enumerate(Entry._fields):
            cols[f] = [[e[k] for e in row] for row in self._rows]
        self._writer.write_table(pa.table(cols, schema=PLAN_SCHEMA), row_group_size=self.group)  # type: ignore[union-attr]
        self._chunks += len(self._rows)
        self._rows = []

    def close(self) -> None:
        if self._writer is not None:
            self._end_chunk()
            self._flush()
            self._writer.close()

    def plan(self, uri: str) -> Plan:
        chunks = -(-self.inputs // self.chunk_size)
        return Plan(uri, self.inputs, chunks, self.digest.hexdigest(), self.chunk_size)


def _units_digest(units: Units, storage: StorageConfig | None) -> str:
    d = Digest()
    for batch in units.batches(storage):
        for p in batch.column("path").to_pylist():
            d.add(p)
    return d.hexdigest()


def _old_plan(cfg: LabelConfig) -> dict[str, Any] | None:
    uri = st.join(cfg.output, PLAN_NAME)
    return json.loads(st.read_text(uri, cfg.storage)) if st.exists(uri, cfg.storage) else None


def _inputs_ok(uri: str, storage: StorageConfig | None) -> bool:
    """The chunk-row plan file exists (an older run's entry-per-row file does not count)."""
    if not st.exists(uri, storage):
        return False
    fs, path = st.pyarrow_fs(uri, storage)
    return "chunk" in pq.read_schema(path, filesystem=fs).names


def _refuse(cfg: LabelConfig, diff: list[str]) -> None:
    if diff:
        raise ConfigError(
            f"output: {cfg.output} holds results of another run ({', '.join(diff)} differ); "
            "use a new --output, or rerun with the same input, task, checkpoint and chunk_size"
        )


def build_plan(cfg: LabelConfig, layout: str, units: Units) -> Plan:
    """The plan of ``units`` (listing containers in Ray tasks when needed); writes ``_PLAN.json``
    on the first run and refuses to mix results of a different plan."""
    inputs_uri = st.join(cfg.output, INPUTS_NAME)
    head = {"chunk_size": cfg.chunk_size, "task": cfg.task, "checkpoint": cfg.checkpoint}
    head["layout"] = layout
    if layout in CONTAINER_LAYOUTS:
        head["containers_sha256"] = _units_digest(units, cfg.storage)
    old = _old_plan(cfg)
    streamed = layout in TAR_LAYOUTS and st.is_remote(cfg.input)
    head["mode"] = "tars" if streamed else "members"
    if old is not None:
        old.setdefault("layout", layout)  # plans written before layouts existed
        old.setdefault("mode", "members")  # and before tars were streamed
        head["mode"] = old["mode"]  # an output keeps the plan it was started with
        _refuse(cfg, [k for k in head if old.get(k) != head[k]])
    if head["mode"] == "tars":
        if old is None:
            record = {**head, "tars": units.count}
            st.write_text(st.join(cfg.output, PLAN_NAME), json.dumps(record, indent=1), cfg.storage)
        sha = head["containers_sha256"]
        return Plan(units.uri, -1, units.count, sha, cfg.chunk_size, "tars", layout)  # type: ignore[arg-type]
    have_inputs = old is not None and _inputs_ok(inputs_uri, cfg.storage)
    if layout in CONTAINER_LAYOUTS and have_inputs:  # the saved listing: no tar is read again
        return Plan(inputs_uri, old["inputs"], old["chunks"], old["inputs_sha256"], cfg.chunk_size)  # type: ignore[index]
    source = _entries(cfg, layout, units, old)
    if layout in CONTAINER_LAYOUTS and old is not None and st.exists(inputs_uri, cfg.storage):
        source = list(source)  # an older run's file: read whole before the writer replaces it
    writer = PlanWriter(None if have_inputs else inputs_uri, cfg.chunk_size, cfg.storage)
    for e in source:
        writer.add(e)
    writer.close()
    plan = writer.plan(inputs_uri)
    if plan.inputs == 0:
        raise ConfigError(f"input: no images inside the {units.count} {layout} files")
    record = {"inputs": plan.inputs, "inputs_sha256": plan.inputs_sha256, "chunks": plan.chunks}
    if old is not None:
        _refuse(cfg, [k for k in record if old.get(k) != record[k]])
    else:  # after the inputs file: a plan implies its inputs are saved
        record.update(head)
        st.write_text(st.join(cfg.output, PLAN_NAME), json.dumps(record, indent=1), cfg.storage)
    return plan


def _entries(cfg: LabelConfig, layout: str, units: Units, old: dict[str, Any] | None):  # noqa: ANN202
    """Every input in plan order: the listing itself, or each container's members."""
    if layout not in CONTAINER_LAYOUTS:
        for batch in units.batches(cfg.storage):
            for p, s in zip(
                batch.column("path").to_pylist(), batch.column("size").to_pylist(), strict=True
            ):
                yield Entry(p, size=s)
        return
    legacy = st.join(cfg.output, INPUTS_NAME)
    if old is not None and st.exists(legacy, cfg.storage):  # an older run's entry-per-row file
        fs, path = st.pyarrow_fs(legacy, cfg.storage)
        table = pq.read_table(path, filesystem=fs, columns=["path", "kind", "container", "member"])
        rows = table.to_pydict()
        del table
        for t in zip(*(rows[f] for f in ("path", "kind", "container", "member")), strict=True):
            yield Entry(*t)
        return
    import ray

    from beit_ray.runtime import init_ray

    init_ray(cfg.ray, cfg.storage)
    print0(f"label: listing the images in {units.count} {layout} files")
    task = ray.remote(list_container).options(num_cpus=cfg.actors.decode_cpus)
    refs = [
        task.remote(p, layout, cfg.image_column, cfg.storage)
        for batch in units.batches(cfg.storage)
        for p in batch.column("path").to_pylist()
    ]
    for i, ref in enumerate(refs):  # in order, one container's members in memory at a time
        for e in ray.get(ref):
            yield Entry(*e)
        refs[i] = None  # type: ignore[call-overload]


def read_chunk(
    plan_uri: str, chunk: int, chunk_size: int, storage: StorageConfig | None, version: str = ""
) -> list[Entry]:
    """One chunk's entries (reads the row group holding it, cached per process; ``version``,
    the plan's digest, keeps a long-lived worker from reusing rows of a replaced plan)."""
    g = chunks_per_group(chunk_size)
    key = (plan_uri, version, chunk // g)
    if _GROUP_CACHE.get("key") != key:
        fs, path = st.pyarrow_fs(plan_uri, storage)
        _GROUP_CACHE.update(
            key=key, rows=pq.ParquetFile(path, filesystem=fs).read_row_group(chunk // g).to_pylist()
        )
    row = _GROUP_CACHE["rows"][chunk % g]
    assert row["chunk"] == chunk, (row["chunk"], chunk)
    return [Entry(*t) for t in zip(*(row[f] for f in Entry._fields), strict=True)]


_GROUP_CACHE: dict[str, Any] = {}


# --------------------------------------------------------------------------- work units


def tar_marks(output: str, storage: StorageConfig | None) -> dict[int, int]:
    """tar index → its inputs, for every streamed tar read to its end (one listing)."""
    fs, path = st.filesystem(st.join(output, MARKS_DIR), storage)
    if not fs.exists(path):
        return {}
    names = (os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
    return {int(m.group(1)): int(m.group(2)) for n in names if (m := MARK_RE.match(n))}


def pending_work(
    plan: Plan, units: Units, done: set[int], marks: dict[int, int], storage: StorageConfig | None
) -> tuple[list[dict[str, Any]], int]:
    """The work items of the unfinished units (chunk ids; or tars, each with its URI and the
    chunks already written) and how many units are finished."""
    if plan.mode != "tars":
        items = [{"chunk": c} for c in range(plan.chunks) if c not in done]
        return items, plan.chunks - len(items)
    written: dict[int, list[int]] = defaultdict(list)
    for c in done:
        written[c // TAR_STRIDE].append(c % TAR_STRIDE)
    items, t = [], 0
    for batch in units.batches(storage):
        for uri in batch.column("path").to_pylist():
            have = written.get(t, [])
            if t not in marks or len(have) < -(-marks[t] // plan.chunk_size):
                items.append({"chunk": t, "tar": uri, "skip": ",".join(map(str, sorted(have)))})
            t += 1
    return items, plan.chunks - len(items)


def incomplete(plan: Plan, done: set[int], marks: dict[int, int]) -> str:
    """What the output still lacks ("" when every input has its row)."""
    if plan.mode != "tars":
        missing = sum(plan.chunk_rows(c) or 0 for c in range(plan.chunks) if c not in done)
        return f"{missing} missing" if missing else ""
    unread = plan.chunks - len(marks)
    gaps = sum(
        1
        for t, n in marks.items()
        for k in range(-(-n // plan.chunk_size))
        if t * TAR_STRIDE + k not in done
    )
    return f"{unread} tars not read to their end, {gaps} chunks missing" if unread or gaps else ""


def read_units(
    batch: dict[str, Any],
    plan: Plan,
    storage: StorageConfig | None,
    image_column: str,
    output: str,
) -> Iterator[tuple[int, list[Entry], list[bytes | None], list[str]]]:
    """In a read task: each work item's chunks as (chunk id, entries, bytes, errors). A streamed
    tar is read once, its finished chunks skipped, its marker written at its end."""
    if plan.mode != "tars":
        for chunk in batch["chunk"]:
            entries = read_chunk(plan.uri, int(chunk), plan.chunk_size, storage, plan.inputs_sha256)
            yield (int(chunk), entries, *fetch(entries, storage, image_column))
        return
    from beit_ray.infer.tars import stream_tar

    for t, uri, skip in zip(batch["chunk"], batch["tar"], batch["skip"], strict=True):
        t, skipped = int(t), {int(k) for k in str(skip).split(",") if k}
        inputs = 0
        for k, (entries, blobs, errors) in enumerate(
            stream_tar(str(uri), plan.layout, plan.chunk_size, storage)
        ):
            if k >= TAR_STRIDE:
                raise RuntimeError(
                    f"{uri} holds over {TAR_STRIDE} chunks of {plan.chunk_size}: raise chunk_size"
                )
            inputs += len(entries)
            if k not in skipped:
                yield t * TAR_STRIDE + k, entries, blobs, errors
        # after the last chunk: the marker says how many inputs (so chunks) the tar has
        st.write_bytes(st.join(output, MARKS_DIR, f"tar-{t:07d}-{inputs}"), b"", storage)


# --------------------------------------------------------------------------- the ledger


def part_counts(table: pa.Table) -> dict[str, Any]:
    """A part's counts: rows, errors and error reasons (the text before the first colon)."""
    errors = [e for e in table.column("error").to_pylist() if e]
    reasons = Counter(e.split(":", 1)[0] for e in errors)
    return {"rows": table.num_rows, "errors": len(errors), "reasons": dict(reasons)}


class Ledger:
    """chunk → (rows, errors, reasons) of the written parts, appended as segment files."""

    def __init__(self, output: str, storage: StorageConfig | None) -> None:
        self.output, self.storage = output, storage
        self.dir = st.join(output, LEDGER_DIR)
        self.entries: dict[int, tuple[int, int, str]] = {}
        self._new: list[tuple[int, int, int, str]] = []
        self._segments: list[str] = []
        self._flushed = time.monotonic()

    def load(self) -> Ledger:
        fs, path = st.filesystem(self.dir, self.storage)
        if not fs.exists(path):
            return self
        pfs, _ = st.pyarrow_fs(self.dir, self.storage)
        names = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".parquet"))
        for p in names:  # in time order: a later count of a rewritten chunk wins
            t = pq.read_table(p, filesystem=pfs).to_pydict()
            for c, r, e, why in zip(t["chunk"], t["rows"], t["errors"], t["reasons"], strict=True):
                self.entries[c] = (r, e, why)
            self._segments.append(p)
        return self

    def add(self, chunk: int, rows: int, errors: int, reasons: dict[str, int]) -> None:
        why = json.dumps(reasons) if reasons else ""
        self.entries[chunk] = (rows, errors, why)
        self._new.append((chunk, rows, errors, why))

    def maybe_flush(self, every_s: float = 30.0, every_n: int = 1000) -> None:
        if len(self._new) >= every_n or (self._new and time.monotonic() - self._flushed > every_s):
            self.flush()

    def flush(self) -> None:
        if self._new:
            self._segments.append(self._write(self._new))
            self._new = []
        self._flushed = time.monotonic()

    def _write(self, rows: list[tuple[int, int, int, str]]) -> str:
        table = pa.table(list(zip(*rows, strict=True)), schema=LEDGER_SCHEMA)
        name = f"seg-{time.time_ns():020d}-{uuid.uuid4().hex[:6]}.parquet"
        fs, root = st.pyarrow_fs(self.dir, self.storage)
        if not st.is_remote(self.dir):
            os.makedirs(root, exist_ok=True)
            tmp = f"{root}/.{name}.tmp"
            pq.write_table(table, tmp, filesystem=fs)
            os.replace(tmp, f"{root}/{name}")
        else:
            pq.write_table(table, f"{root}/{name}", filesystem=fs)
        return f"{root}/{name}"

    def compact(self) -> None:
        """One segment for everything (the old ones deleted after it is written)."""
        self.flush()
        if len(self._segments) <= 1:
            return
        rows = [(c, *v) for c, v in sorted(self.entries.items())]
        old, self._segments = self._segments, [self._write(rows)]  # type: ignore[arg-type]
        fs, _ = st.filesystem(self.dir, self.storage)
        fs.rm(old)


def part_footer_counts(uri: str, storage: StorageConfig | None) -> dict[str, Any]:
    """A part's counts from its footer (or its path/error columns, for parts of older runs)."""
    fs, path = st.pyarrow_fs(uri, storage)
    meta = pq.read_metadata(path, filesystem=fs).metadata or {}
    if PART_META_KEY in meta:
        return json.loads(meta[PART_META_KEY])
    return part_counts(pq.read_table(path, filesystem=fs, columns=["error"]))


def coverage(
    plan: Plan,
    done: set[int],
    ledger: Ledger,
    part_uri: Any,
    storage: StorageConfig | None,
    marks: dict[int, int] | None = None,
) -> dict[str, Any]:
    """Totals over the written parts, each checked against its chunk's size in the plan (a
    streamed tar's: from its marker)."""
    extra = sorted(c for c in done if not plan.holds(c, marks))
    if extra:
        raise RuntimeError(f"output holds parts {extra[:5]} beyond the plan's {plan.chunks} chunks")
    missing = [c for c in done if c not in ledger.entries]
    for c in missing:  # written after the last ledger flush (a crash): one footer each
        n = part_footer_counts(part_uri(c), storage)
        ledger.add(c, n["rows"], n["errors"], n["reasons"])
    rows = errors = 0
    reasons: Counter[str] = Counter()
    for c in done:
        r, e, why = ledger.entries[c]
        want = plan.chunk_rows(c, marks)
        if r != want and (want is not None or r > plan.chunk_size):
            raise RuntimeError(
                f"output does not match the input list: part {c} has {r} rows, its chunk {want}"
            )
        rows, errors = rows + r, errors + e
        if why:
            reasons.update(json.loads(why))
    return {"rows": rows, "errors": errors, "reasons": reasons, "recovered": len(missing)}
