"""Epoch plans: which inputs an epoch reads, in which order, with which randomness, and how a
resumed epoch skips exactly what was trained on.

A training dataset is *one epoch* of raw rows. Ray Train runs it again for every pass, and
what makes each pass a new epoch comes from an :class:`EpochClock`, a small actor that rank 0
sets before each pass (the epoch, and on resume the :class:`EpochProgress` of it)::

    n positions ─ read_positions: position p of the epoch → clock → (epoch, progress) → the
                                epoch's read groups in a (seed, epoch) order (slices of listing
                                parts, or 8 class tars interleaved, or one tar / parquet file)
                                → group p → raw rows (+ epoch, pos, idx, total), which decide
                                every crop, flip, RandAugment op and mask

Nothing here grows with epochs × files: the driver holds the listing's units (parts of 1,024
files, or the tars themselves) and ``n`` read positions, n ≤ MAX_SLICES_PER_EPOCH (slices grow
past 64 files instead); each read task computes the epoch's order itself. The order is a pure
function of (seed, epoch) and the listing, whatever the number of workers.

**Exact resume** (the StreamingDataset idea: resume from what was consumed, not from a guess).
Every row carries its place in the epoch: ``pos`` (its read group) and ``idx`` (its index in
that group's stream), and the last row of a group its ``total`` (rows of the group; -1 on the
others). The training loop records the (pos, idx) of every row it trains on; each checkpoint
holds the union over all ranks (:class:`EpochProgress`: groups done, and the indices taken of
the groups in flight). A resumed epoch skips the groups done and, of a group in flight, the
rows taken: no row is trained on twice or dropped, with or without ``data.images_per_epoch``,
whatever the number of workers after the restart. Batches mix classes three ways: listing parts
are shuffled across up to 64 class folders (a read task interleaves 8 class tars), groups run
in a new order each epoch, and the consumer's local shuffle buffer (``data.shuffle_buffer``)
mixes the rows of the groups read at once.

Without a clock (library use, tests) the epoch is fixed: ``epoch_raw(..., epoch=3)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from beit_ray import storage
from beit_ray.config import StorageConfig
from beit_ray.data.config import DataConfig
from beit_ray.data.listing import PartsListing, in_val_split, read_part, unit_order

MAX_SLICES_PER_EPOCH = 512
"""Read tasks per epoch at most (``data.read_tasks`` overrides); slices grow past 64 files
instead. Each is a block the driver puts and schedules: 1,563 of them took the first batch of a
100k-file epoch from 12 s to 23 s here, 294 left it at 12 s. 512 concurrent reads are plenty
for a large cluster (decoding is a separate stage with its own parallelism)."""
FILES_PER_SLICE = 64
READ_CPUS = 0.5
"""CPUs a read task reserves."""
TARS_PER_TASK = 8
"""Class tars one read task interleaves, row by row: its blocks then hold 8 classes, and the
consumer's shuffle buffer mixes the blocks of the tasks running at once."""


POSITION_COLUMNS = ("pos", "idx", "total")
"""Where each training row sits in its epoch (all int64): read group, index in the group's
stream, and on the group's last row the group's row count (-1 on the others)."""


class EpochProgress:
    """What of one epoch has been trained on: read groups done, and of the groups in flight the
    row indices taken. Small: groups in flight × their rows, never the epoch's rows."""

    def __init__(
        self,
        done: set[int] | None = None,
        taken: dict[int, set[int]] | None = None,
        totals: dict[int, int] | None = None,
    ) -> None:
        self.done = done or set()
        self.taken = taken or {}
        self.totals = totals or {}

    def add(self, pos: Any, idx: Any, total: Any) -> None:
        """Rows trained on (arrays of equal length)."""
        rows = zip(
            np.asarray(pos).tolist(), np.asarray(idx).tolist(), np.asarray(total).tolist(),
            strict=True,
        )  # fmt: skip
        for p, i, t in rows:
            if p in self.done:
                continue
            self.taken.setdefault(p, set()).add(i)
            if t >= 0:
                self.totals[p] = t
            self._close(p)

    def _close(self, p: int) -> None:
        if p in self.totals and len(self.taken.get(p, ())) >= self.totals[p]:
            self.done.add(p)
            self.taken.pop(p, None)
            self.totals.pop(p, None)

    def merge(self, other: EpochProgress) -> EpochProgress:
        """The union of two ranks' progress (each row goes to one rank)."""
        out = EpochProgress(self.done | other.done, {}, {**self.totals, **other.totals})
        for p in set(self.taken) | set(other.taken):
            if p not in out.done:
                out.taken[p] = self.taken.get(p, set()) | other.taken.get(p, set())
        for p in list(out.taken):
            out._close(p)
        for p in out.done:
            out.totals.pop(p, None)
        return out

    def skip(self, pos: int) -> set[int] | None:
        """The row indices of group ``pos`` already trained on (all of them: None)."""
        return None if pos in self.done else self.taken.get(pos, set())

    @property
    def rows_in_flight(self) -> int:
        """Rows taken of the groups not yet done."""
        return sum(len(v) for v in self.taken.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "done": sorted(self.done),
            "taken": {str(p): _runs(sorted(v)) for p, v in self.taken.items()},
            "totals": {str(p): t for p, t in self.totals.items()},
        }

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> EpochProgress:
        if not d:
            return cls()
        taken = {int(p): {i for a, b in r for i in range(a, b)} for p, r in d["taken"].items()}
        totals = {int(p): int(t) for p, t in d.get("totals", {}).items()}
        return cls(set(d["done"]), taken, totals)


def _runs(xs: list[int]) -> list[list[int]]:
    """Sorted ints as [start, stop) runs: a group's taken rows are mostly a few runs."""
    out: list[list[int]] = []
    for x in xs:
        if out and out[-1][1] == x:
            out[-1][1] = x + 1
        else:
            out.append([x, x + 1])
    return out


class EpochClock:
    """The epoch the next pass reads, and what of it was trained on (a resumed epoch).

    A Ray actor (:func:`make_clock`); rank 0 calls ``set`` before each pass, each read task
    calls ``get`` once. Ray Train starts a pass on every worker together, after rank 0's set,
    so the pass's tasks all see the value set for it.
    """

    def __init__(self, epoch: int = 0, progress: dict[str, Any] | None = None) -> None:
        self.epoch, self.progress = epoch, progress

    def set(self, epoch: int, progress: dict[str, Any] | None = None) -> None:
        self.epoch, self.progress = epoch, progress

    def get(self) -> tuple[int, dict[str, Any] | None]:
        return self.epoch, self.progress


def make_clock(epoch: int = 0) -> Any:
    """A new :class:`EpochClock` actor (no CPU reserved: it only answers two calls a pass)."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=-1)(EpochClock).remote(epoch)


def slices(listing: PartsListing, cfg: DataConfig, split: str | None) -> list[tuple[int, int, int]]:
    """(unit, start, count) read slices of one epoch in listing order: listing parts cut into
    slices of ≥ 64 files (fewer than MAX_SLICES_PER_EPOCH in all), other units whole; units
    wholly in the other split (WebDataset, parquet) left out."""
    if _val_index(listing, split):  # the class tars' validation members, from their index
        rows = listing.val_part_rows or []
    elif not listing.parts:
        return [
            (i, 0, -1)
            for i, u in enumerate(listing.units)
            if split is None or listing.unit_split(u) in (None, split)
        ]
    else:
        rows = listing.rows or []
    total = sum(rows)
    cap = cfg.read_tasks or MAX_SLICES_PER_EPOCH
    per = max(FILES_PER_SLICE, -(-total // cap))
    return [(i, s, min(per, n - s)) for i, n in enumerate(rows) for s in range(0, n, per)]


def _val_index(listing: PartsListing, split: str | None) -> bool:
    """The split is read from the class tars' validation index (member offsets), not the tars."""
    return split == "val" and listing.val_parts is not None


def epoch_groups(
    listing: PartsListing,
    cfg: DataConfig,
    split: str | None,
    epoch: int,
    shuffle: bool = True,
) -> list[list[tuple[int, int, int]]]:
    """The epoch's read groups in order: each a list of (unit, start, count) slices (one, or
    ``TARS_PER_TASK`` class tars), the slices in a (seed, epoch) order."""
    key = (listing.uri, listing.root, split, epoch, shuffle, cfg.seed)
    if key in _GROUPS:
        return _GROUPS[key]
    plan = slices(listing, cfg, split)
    order = unit_order(len(plan), cfg.seed, epoch) if shuffle else np.arange(len(plan))
    todo = [plan[j] for j in order]
    # A class tar holds one class: a read task interleaves several (drawn anew each epoch).
    # Past the cap on read tasks, a task reads several slices.
    tars = listing.layout == "class_tars" and not _val_index(listing, split)
    size = TARS_PER_TASK if tars and shuffle else 1
    size = max(size, -(-len(plan) // (cfg.read_tasks or MAX_SLICES_PER_EPOCH)))
    groups = [todo[g : g + size] for g in range(0, len(todo), size)]
    _GROUPS.clear()  # one epoch at a time per worker process
    _GROUPS[key] = groups
    return groups


_GROUPS: dict[tuple[Any, ...], list[list[tuple[int, int, int]]]] = {}


def read_positions(
    batch: dict[str, np.ndarray],
    listing: PartsListing,
    cfg: DataConfig,
    st: StorageConfig | None,
    classes: list[str] | None,
    split: str | None,
    clock: Any,
    epoch: int,
    shuffle: bool,
):  # noqa: ANN201 - generator of raw-row blocks
    """Ray Data fn: read task positions (``id``) of the pass's epoch → raw rows
    (``sources.RAW_COLUMNS`` + ``epoch`` + :data:`POSITION_COLUMNS`), in chunks of 64; what a
    resumed epoch trained on already is left out."""
    from beit_ray.data.sources import RAW_COLUMNS, chunked

    progress = EpochProgress()
    if clock is not None:
        import ray

        epoch, saved = ray.get(clock.get.remote())
        progress = EpochProgress.from_json(saved)
    groups = epoch_groups(listing, cfg, split, epoch, shuffle)
    ids = {c: i for i, c in enumerate(classes or [])}
    for pos in batch["id"]:
        skip = progress.skip(int(pos))
        if pos >= len(groups) or skip is None:  # done before a restart
            continue
        rows = _placed(read_group(groups[pos], listing, cfg, st, ids, split), int(pos), skip)
        for block in chunked(rows, columns=(*RAW_COLUMNS, *POSITION_COLUMNS)):
            yield _with_epoch(block, epoch)


def _placed(rows: Iterator[dict[str, Any]], pos: int, skip: set[int]) -> Iterator[dict[str, Any]]:
    """Rows with their place in the epoch (pos, idx; total on the last), minus ``skip``."""
    idx, last = 0, None
    for row in rows:
        if last is not None and last["idx"] not in skip:
            yield last
        last = {**row, "pos": pos, "idx": idx, "total": -1}
        idx += 1
    if last is not None:
        last["total"] = idx
        if last["idx"] not in skip:
            yield last


def read_group(
    group: list[tuple[int, int, int]],
    listing: PartsListing,
    cfg: DataConfig,
    st: StorageConfig | None,
    ids: dict[str, int],
    split: str | None = None,
):  # noqa: ANN201 - generator of raw rows
    """Raw rows (``sources.RAW_COLUMNS``) of a read group's (unit, start, count) slices in
    ``split``: the one read of a listing, for every job (training epochs, materialized shards,
    tokenizer fitting). Class tars of one group are interleaved row by row."""
    from beit_ray.data.sources import iter_unit

    frac, seed = listing.val_fraction, listing.seed

    def wanted(key: str) -> bool:
        return split is None or frac is None or in_val_split(key, frac, seed) == (split == "val")

    if _val_index(listing, split):
        return (
            r
            for unit, start, count in group
            for r in _read_val_members(listing, unit, start, count, ids, st)
        )
    if listing.parts:
        return (
            r
            for unit, start, count in group
            for r in _read_part_slice(listing, unit, start, count, wanted, ids, st)
        )
    streams = [
        iter_unit(listing.units[u], listing.root, listing.layout, ids, cfg, st) for u, _, _ in group
    ]
    keyed = listing.layout == "class_tars" and split is not None and frac is not None
    return (r for r in _round_robin(streams) if not keyed or wanted(r["key"]))


def _read_part_slice(
    listing: PartsListing,
    unit: int,
    start: int,
    count: int,
    wanted: Any,
    ids: dict[str, int],
    st: StorageConfig | None,
):  # noqa: ANN202 - generator of raw rows
    """Raw rows of the files of one slice of a listing part (in this split)."""
    from beit_ray.data.sources import read_folder_files

    part = read_part(listing.units[unit], st, start, None if count < 0 else start + count)
    keys = part["key"]
    paths = [p for p, k in zip(part["path"], keys, strict=True) if wanted(k)]
    for j in range(0, len(paths), FILES_PER_SLICE):
        yield from read_folder_files(paths[j : j + FILES_PER_SLICE], listing.root, ids, st)


def _read_val_members(
    listing: PartsListing,
    unit: int,
    start: int,
    count: int,
    ids: dict[str, int],
    st: StorageConfig | None,
) -> list[dict[str, Any]]:
    """Raw rows of one slice of a class-tar validation part: each member's bytes by one ranged
    read of its tar (concurrent on an object store)."""
    from concurrent.futures import ThreadPoolExecutor

    from beit_ray.data.sources import _row

    stop = None if count < 0 else start + count
    part = read_part(listing.val_parts[unit], st, start, stop)  # type: ignore[index]
    todo = [{c: part[c][i] for c in part} for i in range(len(part["key"]))]

    remote = bool(todo) and storage.is_remote(todo[0]["path"])
    fs = storage.filesystem(todo[0]["path"], st)[0] if remote else None  # one client a slice

    def read(uri: str, start: int, end: int) -> bytes:
        if fs is not None:  # one ranged GET
            return fs.cat_file(storage.strip_scheme(uri), start=start, end=end)
        with open(storage.strip_scheme(uri), "rb") as f:
            f.seek(start)
            return f.read(end - start)

    def one(m: dict[str, Any]) -> dict[str, Any]:
        try:
            data = read(m["path"], m["offset"], m["offset"] + m["size"])
            if len(data) != m["size"]:
                raise EOFError(f"{m['member']} runs past the end of the tar")
        except Exception as e:
            return _row(m["key"], m["path"], error=f"read_failed: {type(e).__name__}: {e}")
        return _row(m["key"], m["path"], data, ids.get(m["class"], -1), m["class"])

    if remote:
        with ThreadPoolExecutor(max_workers=16) as pool:
            return list(pool.map(one, todo))
    return [one(m) for m in todo]


def _round_robin(streams: list[Any]):  # noqa: ANN202 - generator of rows
    """Rows of several streams, one from each in turn, until all are done."""
    live = list(streams)
    while live:
        for it in list(live):
            row = next(it, None)
            if row is None:
                live.remove(it)
            else:
                yield row


def _with_epoch(batch: dict[str, np.ndarray], epoch: int) -> dict[str, np.ndarray]:
    batch["epoch"] = np.full(len(batch["key"]), epoch, dtype=np.int64)
    return batch


def epoch_raw(
    listing: PartsListing,
    cfg: DataConfig,
    st: StorageConfig | None = None,
    classes: list[str] | None = None,
    *,
    split: str | None = None,
    clock: Any = None,
    epoch: int = 0,
    shuffle: bool = True,
):  # noqa: ANN201 - ray.data.Dataset
    """One epoch of raw rows of ``listing`` (``split`` of it), as the module docstring says:
    the epoch from ``clock`` when given, else ``epoch``."""
    import ray

    if not listing.units:
        raise ValueError(f"data.source: no {listing.layout} inputs found under {listing.root}")
    # One range block per read task of the epoch (positions in the epoch's order): the read
    # tasks are planned on the driver as these few numbers, their slices made in the tasks.
    n = max(1, len(epoch_groups(listing, cfg, split, epoch, shuffle)))
    # from_items: n one-row blocks put by the driver (ray.data.range would run a task each).
    positions = ray.data.from_items([{"id": i} for i in range(n)], override_num_blocks=n)
    return positions.map_batches(
        read_positions,
        fn_kwargs=dict(
            listing=listing, cfg=cfg, st=st, classes=classes, split=split, clock=clock,
            epoch=epoch, shuffle=shuffle,
        ),
        batch_size=1,  # one position a task
        # Reading is I/O: half a CPU lets more reads wait on storage at once. Its own resources
        # also keep Ray Data from fusing it with the decode stage, whose batch size (64 rows)
        # would then bundle 64 positions into one task and serialize the epoch's reads.
        num_cpus=READ_CPUS,
        **storage.TASK_RETRIES,  # a read that outlived its own retries: the task runs again
    )  # fmt: skip
