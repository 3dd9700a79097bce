"""The labelling plan and the ledger of written parts, both parquet, neither in driver memory.

``_INPUTS/part-*.parquet`` holds one row per chunk (``chunk`` + list columns of its :class:`Entry`
fields), in row groups of ~4k inputs: a read task loads just its chunk's row group. The plan is
streamed from the listing; a rerun recomputes only its digest (files, manifest) or reuses it
outright (container layouts: the containers' digest matches), so tars are listed once.

Containers on an object store (tars, parquet files) are planned whole instead (``mode`` tars):
listing a tar's members would stream it once, and labelling would read the member spans again;
a parquet row group would be read once per chunk touching it. One task per container streams
it once and cuts it into chunks as its inputs arrive; chunk ``k`` of the ``t``-th container (in
the sorted listing) is part ``t * TAR_STRIDE + k``. At its end the task writes the marker
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
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from beit_ray import storage as st
from beit_ray.config import ConfigError, StorageConfig
from beit_ray.data.containers import TAR_SUFFIXES
from beit_ray.infer.config import LabelConfig
from beit_ray.infer.inputs import (
    CONTAINER_LAYOUTS,
    PLAN_NAME,
    Entry,
    ListingWriter,
    Units,
    fetch,
    load_listing,
    subset,
)
from beit_ray.infer.tars import list_container
from beit_ray.runtime import print0

INPUTS_NAME, LEDGER_DIR, MARKS_DIR = "_INPUTS.parquet", "_PARTS", "_TARS"
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


GROUPS_PER_FILE = 64
"""Row groups (of ~INPUTS_PER_ROW_GROUP inputs) a plan file holds: 262 k inputs, a footer of
~0.1 MB (one file for 100 M inputs had a 21 MB footer, read whole by every chunk's task)."""


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


class Generation(NamedTuple):
    """Inputs a run added to the plan: the first run's, then each ``--relist``'s new ones."""

    uri: str
    """members: its chunk rows (``_INPUTS[-g]/``); tars: its tars (``_UNITS[-g].parquet``)."""
    first: int
    """Its first chunk id (members) or tar index (tars)."""
    chunks: int
    """Its chunks (members) or tars."""
    inputs: int
    """Its inputs (-1 for streamed tars: known once each is read)."""
    sha256: str = ""
    """Digest of its inputs' paths, in plan order."""


@dataclass
class Plan:
    """What the chunks are made of (parquet files hold the entries), in generations."""

    uri: str
    inputs: int
    chunks: int
    inputs_sha256: str
    chunk_size: int
    mode: str = "members"
    """members: fixed chunks of the listed inputs (``_INPUTS.parquet``); tars: ``chunks`` is the
    number of object-store tars, each streamed once by one task (``inputs`` unknown: -1)."""
    layout: str = ""
    generations: list[Generation] = field(default_factory=list)
    """The first run's inputs, then those each ``--relist`` found new (ids continue)."""

    def __post_init__(self) -> None:
        if not self.generations:
            gen = Generation(self.uri, 0, self.chunks, self.inputs, self.inputs_sha256)
            self.generations = [gen]

    @classmethod
    def of(cls, gens: list[Generation], chunk_size: int, mode: str, layout: str) -> Plan:
        inputs = -1 if mode == "tars" else sum(g.inputs for g in gens)
        chunks = sum(g.chunks for g in gens)
        return cls(gens[0].uri, inputs, chunks, gens[0].sha256, chunk_size, mode, layout, gens)

    def generation(self, c: int) -> Generation:
        """The generation holding chunk (members) or tar (tars) ``c``."""
        for g in reversed(self.generations):
            if c >= g.first:
                return g
        raise KeyError(c)

    def entries(self, c: int, storage: StorageConfig | None) -> list[Entry]:
        """Chunk ``c``'s entries (members mode)."""
        g = self.generation(c)
        return read_chunk(g.uri, c - g.first, self.chunk_size, storage, g.sha256)

    def chunk_rows(self, c: int, marks: dict[int, int] | None = None) -> int | None:
        """Rows part ``c`` must hold (None: a streamed tar not yet read to its end)."""
        if self.mode != "tars":
            g = self.generation(c)
            return min(self.chunk_size, g.inputs - (c - g.first) * self.chunk_size)
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
    """Entries in plan order → chunk rows, written a row group at a time: into ``uri`` itself
    when it names a .parquet file, else into ``uri/part-<k>.parquet`` files of at most
    ``GROUPS_PER_FILE`` row groups (a footer, which a reader of one chunk reads whole and a
    writer holds, stays small however many inputs there are)."""

    def __init__(self, uri: str | None, chunk_size: int, storage: StorageConfig | None) -> None:
        self.chunk_size, self.inputs, self.digest = chunk_size, 0, Digest()
        self.group = chunks_per_group(chunk_size)
        self.uri, self.storage = uri, storage
        self._chunk: list[Entry] = []
        self._rows: list[list[Entry]] = []
        self._chunks = 0
        self._groups_in_file = 0
        self._files = 0
        self._writer: Any = None

    def _open(self) -> Any:
        """The file the next row group goes to (a new one every GROUPS_PER_FILE groups)."""
        single = str(self.uri).endswith(".parquet")
        if self._writer is not None and (single or self._groups_in_file < GROUPS_PER_FILE):
            return self._writer
        if self._writer is not None:
            self._writer.close()
        uri = self.uri if single else st.join(str(self.uri), f"part-{self._files:06d}.parquet")
        fs, path = st.pyarrow_fs(str(uri), self.storage)
        if not st.is_remote(str(uri)):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        self._writer = pq.ParquetWriter(path, PLAN_SCHEMA, filesystem=fs)
        self._files, self._groups_in_file = self._files + 1, 0
        return self._writer

    def add(self, e: Entry) -> None:
        self.inputs += 1
        self.digest.add(e.path)
        if self.uri is None:  # only count and digest
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
        self._open().write_table(pa.table(cols, schema=PLAN_SCHEMA), row_group_size=self.group)
        self._chunks += len(self._rows)
        self._groups_in_file += 1
        self._rows = []

    def close(self) -> None:
        if self.uri is not None:
            self._end_chunk()
            self._flush()
            if self._writer is not None:
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


def _refuse(cfg: LabelConfig, diff: list[str]) -> None:
    if diff:
        raise ConfigError(
            f"output: {cfg.output} holds results of another run ({', '.join(diff)} differ); "
            "use a new --output, or rerun with the same input, task, checkpoint and chunk_size"
        )


def _head(cfg: LabelConfig, layout: str) -> dict[str, Any]:
    return {
        "chunk_size": cfg.chunk_size, "task": cfg.task, "checkpoint": cfg.checkpoint,
        "layout": layout,
    }  # fmt: skip


def _generations(record: dict[str, Any], output: str) -> list[Generation]:
    """A saved plan's generations (a plan written before generations existed: one)."""
    if "generations" in record:
        return [Generation(*g) for g in record["generations"]]
    if record.get("mode") == "tars":
        return [Generation(st.join(output, "_UNITS.parquet"), 0, record["tars"], -1)]
    uri = st.join(output, INPUTS_NAME)
    return [Generation(uri, 0, record["chunks"], record["inputs"], record["inputs_sha256"])]


def old_layout(cfg: LabelConfig) -> str | None:
    """The layout an output's plan was made with (a ``--relist`` keeps it), or None."""
    old = _old_plan(cfg)
    return None if old is None else old.get("layout")


def saved_plan(cfg: LabelConfig) -> Plan | None:
    """The plan a first run saved, when this run is a plain rerun: nothing is listed, digested
    or read again. None when there is none, or ``--relist`` asks for a new look."""
    old = _old_plan(cfg)
    if old is None or cfg.relist:
        return None
    old.setdefault("layout", cfg.layout)  # plans written before layouts existed
    layout = old["layout"] if cfg.layout == "auto" else cfg.layout
    _refuse(cfg, [k for k, v in _head(cfg, layout).items() if old.get(k) != v])
    gens = _generations(old, cfg.output)
    return Plan.of(gens, cfg.chunk_size, old.get("mode", "members"), old["layout"])


def build_plan(cfg: LabelConfig, layout: str, listing: Units) -> Plan:
    """The plan of a listed input: the first run's (its inputs: one generation), or, with
    ``--relist`` on an output that has a plan, that plan plus a generation of the inputs the
    new listing holds and the one it was made from did not (they become new work; removed
    ones keep their rows). Containers are listed in Ray tasks when needed. Writes
    ``_PLAN.json`` after the generation's files."""
    old = _old_plan(cfg)
    head = _head(cfg, layout)
    streamed = layout in CONTAINER_LAYOUTS and st.is_remote(cfg.input)
    mode = "tars" if streamed else "members"
    gens: list[Generation] = []
    units = listing
    if old is not None:
        old.setdefault("layout", layout)
        mode = old.get("mode", "members")  # an output keeps the plan it was started with
        _refuse(cfg, [k for k, v in head.items() if old.get(k) != v])
        gens = _generations(old, cfg.output)
        units = _added(cfg, load_listing(cfg, old.get("listing", 0)), listing)
    index = len(gens)
    first = sum(g.chunks for g in gens)
    gen = _generation(cfg, layout, mode, units, index, first)
    if gen is None and not gens:
        raise ConfigError(f"input: no {layout} inputs found under {cfg.input}")
    if gen is not None:
        gens.append(gen)
    record = {**head, "mode": mode, "listing": listing.version}
    record["generations"] = [list(g) for g in gens]
    st.write_text(st.join(cfg.output, PLAN_NAME), json.dumps(record, indent=1), cfg.storage)
    return Plan.of(gens, cfg.chunk_size, mode, layout)


def _added(cfg: LabelConfig, before: Units | None, now: Units) -> Units:
    """The files of listing ``now`` that listing ``before`` lacks, as a listing: one merge of
    two sorted streams (nothing held but a batch of each). Says how many were added and
    removed."""
    writer = ListingWriter(st.join(now.uri, "_added.parquet"), cfg.storage)
    old_paths = (p for b in (before.batches(cfg.storage) if before else []) for p in _paths(b))
    cur = next(old_paths, None)
    removed = 0
    for batch in now.batches(cfg.storage):
        for p, s in zip(_paths(batch), batch.column("size").to_pylist(), strict=True):
            while cur is not None and cur < p:
                removed, cur = removed + 1, next(old_paths, None)
            if cur == p:
                cur = next(old_paths, None)
            else:
                writer.add(p, s)
    removed += sum(1 for _ in old_paths) + (cur is not None)
    writer.close()
    print0(
        f"label: relisted {now.count} files: {writer.count} new (labelled now), "
        f"{removed} gone since (their rows stay)"
    )
    return Units(writer.uri, writer.count, version=now.version)


def _paths(batch: pa.RecordBatch) -> list[str]:
    return batch.column("path").to_pylist()


def _generation(
    cfg: LabelConfig, layout: str, mode: str, units: Units, index: int, first: int
) -> Generation | None:
    """Plan ``units`` (a listing of files) as generation ``index`` from chunk / tar ``first``:
    its tars (streamed tars), else its inputs cut into chunks; None when it holds none."""
    name = "" if index == 0 else f"-{index}"
    if layout in CONTAINER_LAYOUTS:
        suffixes = (".parquet",) if layout == "parquet" else TAR_SUFFIXES
        before = units.count
        units = subset(units, suffixes, st.join(cfg.output, f"_UNITS{name}.parquet"), cfg.storage)
        if units.count < before:
            print0(f"label: {before - units.count} files beside the {layout} inputs are ignored")
    if not units.count:
        return None
    if mode == "tars":
        return Generation(units.uri, first, units.count, -1, _units_digest(units, cfg.storage))
    inputs_uri = st.join(cfg.output, INPUTS_NAME.replace(".parquet", name))  # a folder
    writer = PlanWriter(inputs_uri, cfg.chunk_size, cfg.storage)
    for e in _entries(cfg, layout, units):
        writer.add(e)
    writer.close()
    if writer.inputs == 0:
        if index == 0:
            raise ConfigError(f"input: no images inside the {units.count} {layout} files")
        return None
    chunks = -(-writer.inputs // cfg.chunk_size)
    return Generation(inputs_uri, first, chunks, writer.inputs, writer.digest.hexdigest())


def _entries(cfg: LabelConfig, layout: str, units: Units):  # noqa: ANN202
    """Every input in plan order: the listing itself, or each container's members."""
    if layout not in CONTAINER_LAYOUTS:
        for batch in units.batches(cfg.storage):
            for p, s in zip(
                batch.column("path").to_pylist(), batch.column("size").to_pylist(), strict=True
            ):
                yield Entry(p, size=s)
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
        uri, index = plan_uri, chunk // g
        if not plan_uri.endswith(".parquet"):  # a folder of files of GROUPS_PER_FILE groups
            uri = st.join(plan_uri, f"part-{index // GROUPS_PER_FILE:06d}.parquet")
            index %= GROUPS_PER_FILE
        fs, path = st.pyarrow_fs(uri, storage)

        def group() -> list[dict[str, Any]]:
            return pq.ParquetFile(path, filesystem=fs).read_row_group(index).to_pylist()

        _GROUP_CACHE.update(key=key, rows=st.retry(group, what=plan_uri))
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
    plan: Plan, done: set[int], marks: dict[int, int], storage: StorageConfig | None
) -> tuple[list[dict[str, Any]], int]:
    """The work items of the unfinished units (chunk ids; or tars, each with its URI and the
    chunks already written) and how many units are finished."""
    if plan.mode != "tars":
        items = [{"chunk": c} for c in range(plan.chunks) if c not in done]
        return items, plan.chunks - len(items)
    written: dict[int, list[int]] = defaultdict(list)
    for c in done:
        written[c // TAR_STRIDE].append(c % TAR_STRIDE)
    items = []
    for g in plan.generations:
        t = g.first
        for uri in (u for b in Units(g.uri, g.chunks).batches(storage) for u in _paths(b)):
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
            entries = plan.entries(int(chunk), storage)
            yield (int(chunk), entries, *fetch(entries, storage, image_column))
        return
    from beit_ray.infer.tars import stream

    for t, uri, skip in zip(batch["chunk"], batch["tar"], batch["skip"], strict=True):
        t, skipped = int(t), {int(k) for k in str(skip).split(",") if k}
        inputs = 0
        for k, (entries, blobs, errors) in enumerate(
            stream(str(uri), plan.layout, plan.chunk_size, storage, image_column)
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
