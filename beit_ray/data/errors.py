"""Decode-failure records, buffered per Ray Data task: one jsonl file per task, not per batch.

A record is ``{"key", "path", "reason"}`` (plus ``epoch``/``shard`` when known). Inside a Ray
Data task, :func:`write_errors` appends to a buffer owned by that task and the buffer is written
as one ``errors-<uuid>.jsonl`` when the task ends (a finalizer on Ray Data's per-task context,
which runs before the task reports completion: a reader after the dataset finished sees every
record), or earlier once it holds ``FLUSH_RECORDS``. Outside a task (tests, the driver) records
are written at once.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
import weakref
from typing import Any

from beit_ray import storage
from beit_ray.config import StorageConfig

log = logging.getLogger(__name__)

FLUSH_RECORDS = 10_000
"""A task's buffer is written early at this size (memory bound for a task full of failures)."""

_lock = threading.Lock()
_buffers: dict[tuple[int, str], list[dict[str, Any]]] = {}


def _task_context() -> Any:
    try:
        from ray.data._internal.execution.interfaces.task_context import TaskContext
    except ImportError:  # pragma: no cover - ray is a dependency; kept import-safe
        return None
    return TaskContext.get_current()


def _write(records: list[dict[str, Any]], errors_uri: str, st: StorageConfig | None) -> None:
    body = "".join(json.dumps(r) + "\n" for r in records)
    storage.write_text(storage.join(errors_uri, f"errors-{uuid.uuid4().hex}.jsonl"), body, st)


def _flush(key: tuple[int, str], st: StorageConfig | None, final: bool) -> None:
    with _lock:
        records = _buffers.pop(key, None) if final else _buffers.get(key)
        if records and not final:
            _buffers[key] = []
    if records:
        try:
            _write(records, key[1], st)
        except Exception:  # a finalizer cannot raise: say so loudly instead
            log.exception("could not write %d error records under %s", len(records), key[1])


def write_errors(
    records: list[dict[str, Any]], errors_uri: str | None, st: StorageConfig | None
) -> None:
    """Record failures under ``errors_uri`` (buffered per Ray Data task), or log them when unset."""
    if not records:
        return
    if not errors_uri:
        for r in records:
            log.warning("skipped %s (%s): %s", r["key"], r["path"], r["reason"])
        return
    ctx = _task_context()
    if ctx is None:
        _write(records, errors_uri, st)
        return
    key = (id(ctx), errors_uri)
    with _lock:
        buf = _buffers.get(key)
        if buf is None:
            buf = _buffers[key] = []
            weakref.finalize(ctx, _flush, key, st, True)  # the task's end
        buf.extend(records)
        full = len(buf) >= FLUSH_RECORDS
    if full:
        _flush(key, st, final=False)


def read_errors(errors_uri: str, st: StorageConfig | None = None) -> list[dict[str, Any]]:
    """Every error record written under ``errors_uri``."""
    if not storage.exists(errors_uri, st):
        return []
    out = []
    for uri in storage.list_files(errors_uri, st, suffixes=(".jsonl",)):
        out += [
            json.loads(line) for line in storage.read_text(uri, st).splitlines() if line.strip()
        ]
    return out
