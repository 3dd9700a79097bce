"""Epoch plans: which inputs an epoch reads, in which order, with which randomness.

A training dataset is *one epoch* of raw rows. Ray Train runs it again for every pass, and
what makes each pass a new epoch comes from an :class:`EpochClock`, a small actor that rank 0
sets before each pass (the epoch, and on resume the rows already trained on)::

    range(1) ─ epoch_slices: clock → (epoch, skip) → the epoch's units in a (seed, epoch) order,
             │                cut into read slices; one block per slice
             └ read_slices:  a slice of a listing part / a tar / a parquet file → raw rows
                             (+ ``epoch``), which decide every crop, flip, RandAugment op and mask

Nothing here grows with epochs × files: the driver holds the listing's units (parts of 1,024
files, or the tars themselves) and one plan of O(1) operators; slices are made in a task.
A resumed epoch skips the slices whose rows were already consumed instead of reading and
dropping them (rows of slices in flight at the checkpoint may be read again: at most the
prefetch window). Batches mix classes three ways: listing parts are shuffled across up to 64
class folders, slices run in a new order each epoch, and the consumer's local shuffle buffer
(``data.shuffle_buffer``) mixes the rows of the slices read at once.

Without a clock (library use, tests) the epoch is fixed: ``epoch_raw(..., epoch=3)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from beit_ray.config import StorageConfig
from beit_ray.data.config import DataConfig
from beit_ray.data.listing import PartsListing, in_val_split, read_part, unit_order

MAX_SLICES_PER_EPOCH = 4096
"""Read slices (tasks) per epoch at most: enough for a large cluster, few enough that the
executor's queue of slices stays small on the driver; slices grow past ~64 files instead."""
FILES_PER_SLICE = 64
TARS_PER_TASK = 8
"""Class tars one read task interleaves, row by row: its blocks then hold 8 classes, and the
consumer's shuffle buffer mixes the blocks of the tasks running at once."""


class EpochClock:
    """The epoch the next pass reads, and the rows of it to skip (a resumed epoch).

    A Ray actor (:func:`make_clock`); rank 0 calls ``set`` before each pass, the epoch's plan
    task calls ``get`` once when the pass starts. Ray Train starts a pass on every worker
    together, so the plan always sees the value set for it.
    """

    def __init__(self, epoch: int = 0, skip_rows: int = 0) -> None:
        self.epoch, self.skip_rows = epoch, skip_rows

    def set(self, epoch: int, skip_rows: int = 0) -> None:
        self.epoch, self.skip_rows = epoch, skip_rows

    def get(self) -> tuple[int, int]:
        return self.epoch, self.skip_rows


def make_clock(epoch: int = 0, skip_rows: int = 0) -> Any:
    """A new :class:`EpochClock` actor (no CPU reserved: it only answers two calls a pass)."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=-1)(EpochClock).remote(epoch, skip_rows)


def slices(listing: PartsListing, cfg: DataConfig, split: str | None) -> list[tuple[int, int, int]]:
    """(unit, start, count) read slices of one epoch in listing order: listing parts cut into
    slices of ≥ 64 files (fewer than MAX_SLICES_PER_EPOCH in all), other units whole; units
    wholly in the other split (WebDataset, parquet) left out."""
    if not listing.parts:
        return [
            (i, 0, -1)
            for i, u in enumerate(listing.units)
            if split is None or listing.unit_split(u) in (None, split)
        ]
    rows = listing.rows or []
    total = sum(rows)
    cap = cfg.read_tasks or MAX_SLICES_PER_EPOCH
    per = max(FILES_PER_SLICE, -(-total // cap))
    return [(i, s, min(per, n - s)) for i, n in enumerate(rows) for s in range(0, n, per)]


def epoch_slices(
    batch: dict[str, np.ndarray],
    listing: PartsListing,
    cfg: DataConfig,
    split: str | None,
    clock: Any,
    epoch: int,
    shuffle: bool,
):  # noqa: ANN201 - generator of blocks
    """Ray Data fn (one input row): the epoch's read slices, one block each, in the epoch's
    order, minus the slices a resumed epoch has consumed."""
    import ray

    skip = 0
    if clock is not None:
        epoch, skip = ray.get(clock.get.remote())
    plan = slices(listing, cfg, split)
    order = unit_order(len(plan), cfg.seed, epoch) if shuffle else np.arange(len(plan))
    per_row = _rows_per_slice(listing, plan, split)
    done, todo = 0, []
    for j in order:
        if skip and done + per_row[j] <= skip:
            done += per_row[j]
            continue
        todo.append(plan[j])
    # A class tar holds one class: a read task interleaves several (drawn anew each epoch).
    group = TARS_PER_TASK if listing.layout == "class_tars" and shuffle else 1
    for g in range(0, len(todo), group):
        units, starts, counts = zip(*todo[g : g + group], strict=True)
        yield {
            "unit": np.array([listing.units[u] for u in units], dtype=object),
            "start": np.array(starts, np.int64),
            "count": np.array(counts, np.int64),
            "epoch": np.full(len(units), epoch, np.int64),
        }


def _rows_per_slice(
    listing: PartsListing, plan: list[tuple[int, int, int]], split: str | None
) -> list[float]:
    """Expected rows of each slice in ``split`` (for skipping consumed rows on resume)."""
    if listing.rows is None:
        return [0.0] * len(plan)
    out = []
    for unit, _, count in plan:
        n = listing.rows[unit]
        v = (listing.val_rows or [0] * len(listing.rows))[unit] if listing.val_fraction else 0
        frac = 1.0 if split is None or n == 0 else (v if split == "val" else n - v) / n
        out.append((n if count < 0 else count) * frac)
    return out


def read_slices(
    batch: dict[str, np.ndarray],
    listing: PartsListing,
    cfg: DataConfig,
    st: StorageConfig | None,
    classes: list[str] | None,
    split: str | None,
):  # noqa: ANN201 - generator of raw-row blocks
    """Ray Data fn: read slices → raw rows (``sources.RAW_COLUMNS`` + ``epoch``) in chunks."""
    from beit_ray.data.sources import (
        FILES_PER_READ_TASK,
        _rows,
        chunked,
        iter_unit,
        read_folder_files,
    )

    ids = {c: i for i, c in enumerate(classes or [])}
    frac, seed = listing.val_fraction, listing.seed

    def wanted(key: str) -> bool:
        return split is None or frac is None or in_val_split(key, frac, seed) == (split == "val")

    streams: list[Any] = []
    epochs: list[int] = []
    for uri, start, count, epoch in zip(
        batch["unit"], batch["start"], batch["count"], batch["epoch"], strict=True
    ):
        if listing.parts:
            part = read_part(str(uri), st)
            stop = len(part["path"]) if count < 0 else int(start + count)
            paths = [
                p
                for p, k in zip(part["path"][start:stop], part["key"][start:stop], strict=True)
                if wanted(k)
            ]
            for j in range(0, len(paths), FILES_PER_READ_TASK):
                rows = read_folder_files(paths[j : j + FILES_PER_READ_TASK], listing.root, ids, st)
                yield _with_epoch(_rows(rows), int(epoch))
            continue
        streams.append(iter_unit(str(uri), listing.root, listing.layout, ids, cfg, st))
        epochs.append(int(epoch))
    keyed = listing.layout == "class_tars" and split is not None and frac is not None
    rows = (r for r in _round_robin(streams) if not keyed or wanted(r["key"]))
    for block in chunked(rows):
        yield _with_epoch(block, epochs[0])


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
    plan = ray.data.range(1, override_num_blocks=1).map_batches(
        epoch_slices,
        fn_kwargs=dict(
            listing=listing, cfg=cfg, split=split, clock=clock, epoch=epoch, shuffle=shuffle
        ),
        batch_size=1,
        # Its own resources keep Ray Data from fusing the plan into the read tasks: the
        # slices must reach as many read tasks as there are free CPUs.
        num_cpus=0.01,
    )
    return plan.map_batches(
        read_slices,
        fn_kwargs=dict(listing=listing, cfg=cfg, st=st, classes=classes, split=split),
        batch_size=None,  # a whole block: one slice, or a group of class tars
    )
