"""List what is under a prefix, the one way every job lists: a first bounded look, then the
files in parallel tasks, in path order.

    look = first_look(root, st)            # dirs + files of the top level, or ``complete=False``
    parts = walk(root, st, handle)         # every file below root, in parallel tasks
    results = run_tasks(fn, items, kw)     # fn(item, **kw) per item: Ray tasks, else threads

:func:`walk` calls ``handle(name, [(uri, size), ...], **kwargs)`` in its tasks on consecutive
runs of files (hidden ones, a name under the root starting with ``.`` or ``_``, left out), and
returns ``(name, result)`` sorted by name, which is path order: training shuffles each run into
listing parts, labelling writes it as a part of its sorted listing, tar and parquet discovery
keeps the runs' containers. Nothing the driver holds grows with the files.

**S3** lists 1,000 keys a request, sorted. A bucket of 100 M objects is 100 k requests: ~1.5 h
in one stream at 50 ms a request, and ~120 GB if the listing is held in memory. Here a task
lists the keys in a range ``(lo, hi]`` page by page; after ``pages`` pages it hands what is left
of its range, ``(last key seen, hi]``, back cut into new ranges, which run as new tasks. The
cuts are spread evenly over the space of the bytes its keys use (digits, hex, ...), as many as
the density of the keys it saw says the rest holds (``FANOUT`` for an open-ended range). No
split needs to know the key distribution in advance: a range that proves big is cut again, an
empty one costs one request. After a few rounds most of the bucket is listed in parallel
(``bench/listing_ranges.py``), and neither a task nor the driver holds more than one task's
keys. A range's name is its place in the split tree (``0003.0012.0000``): sorting the names
sorts the parts in key order.

**Local folders** are cut at the top level: runs of top-level entries, sorted as their paths
sort, with at most ``DIRS_PER_TASK`` folders a run, are walked by one task each (the kernel
streams a folder: no request latency to hide, but a million files still take a while). A top
level of more than ``FIRST_LOOK_FILES`` files is walked by one task.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from beit_ray import storage
from beit_ray.config import StorageConfig

PAGE_KEYS = 1000
"""S3's largest page."""
PAGES_PER_TASK = 16
"""Pages a range task lists before cutting the rest of its range: 16 k keys, ~1 s of requests."""
FANOUT = 32
"""Ranges the rest of a big range is cut into."""
FIRST_LOOK_FILES = 10_000
"""Top-level files the first look holds at most; beyond it the top level is 'flat' and listed
by :func:`walk_ranges` in tasks."""
MAX_IN_FLIGHT = 256
DIRS_PER_TASK = 64
"""Top-level folders (e.g. classes) one local walking task lists."""
RUN_FILES = 65_536
"""Files a walking task hands to ``handle`` at once, at most (bounds a task's memory)."""
_CUT_DIGITS = 4
_LOW, _HIGH = 0x20, 0x7E  # printable ASCII: the cut alphabet (valid UTF-8, safe in a request)
_PRINTABLE = bytes(range(_LOW, _HIGH + 2))  # + DEL, the ceiling's byte


@dataclass
class Look:
    """The top level of a prefix, as far as the first look saw it."""

    dirs: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    """Full URIs, sorted; at most ``FIRST_LOOK_FILES`` when ``complete`` is False."""
    complete: bool = True
    """False: more top-level files than the first look holds (list them with walk_ranges)."""


@dataclass(frozen=True)
class KeyRange:
    """Keys ``k`` with ``lo < k <= hi`` under a prefix (``hi`` None: to the end)."""

    name: str
    lo: str = ""
    hi: str | None = None


# --------------------------------------------------------------------------- the first look


def _scheme(uri: str) -> str:
    return uri.split("://", 1)[0] + "://" if storage.is_remote(uri) else ""


def _is_s3(uri: str) -> bool:
    return uri.split("://", 1)[0] in ("s3", "s3a")


def first_look(root: str, st: StorageConfig | None = None, limit: int | None = None) -> Look:
    """The top-level folders and files of ``root``, reading at most ``limit`` (default
    ``FIRST_LOOK_FILES``) files' worth of listing: a flat bucket of 100 M objects is not listed
    here."""
    root = root.rstrip("/")
    limit = limit or FIRST_LOOK_FILES
    look = Look()
    if not storage.is_remote(root):
        with os.scandir(storage.strip_scheme(root)) as it:  # unsorted: read to the end
            for e in it:
                if e.is_dir():
                    look.dirs.append(e.path)
                elif e.is_file():
                    if len(look.files) < limit:
                        look.files.append(e.path)
                    else:
                        look.complete = False
    elif _is_s3(root):
        fs, path = storage.filesystem(root, st)
        bucket, _, prefix = path.partition("/")
        prefix = prefix + "/" if prefix else ""
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "Delimiter": "/"}
        while True:  # class folders come as common prefixes: 21,841 of them is 22 pages
            page = storage.retry(
                fs.call_s3, "list_objects_v2", MaxKeys=PAGE_KEYS, **kwargs, what=root
            )
            scheme = _scheme(root)
            look.dirs += [
                f"{scheme}{bucket}/{p['Prefix'].rstrip('/')}"
                for p in page.get("CommonPrefixes", [])
            ]
            look.files += [
                f"{scheme}{bucket}/{o['Key']}"
                for o in page.get("Contents", [])
                if not o["Key"].endswith("/")
            ]
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                break
            if len(look.files) >= limit:
                look.complete = False
                break
            kwargs["ContinuationToken"] = token
    else:
        fs, path = storage.filesystem(root, st)
        scheme = _scheme(root)
        for e in fs.ls(path, detail=True):
            (look.dirs if e["type"] == "directory" else look.files).append(scheme + e["name"])
    look.dirs.sort()
    look.files.sort()
    return look


def hidden(uri: str, root: str) -> bool:
    """A name under ``root`` starting with . or _ (.DS_Store, ._x.jpg, _SUCCESS, _listing/)."""
    rel = uri[len(root.rstrip("/")) :].lstrip("/")
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def _sorted_entries(folder: str) -> list[os.DirEntry[str]]:
    """A folder's entries as their full paths sort: a folder's name sorts with its "/"."""
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []
    return [e for _, e in sorted((e.name + ("/" if e.is_dir() else ""), e) for e in entries)]


def iter_local(path: str) -> Iterator[tuple[str, int]]:
    """(path, size) of the files at or below a local ``path`` in path order, one folder's
    entries in memory at a time; hidden names skipped."""
    if os.path.isfile(path):
        yield path, os.path.getsize(path)
        return
    for e in _sorted_entries(path):
        if e.name.startswith((".", "_")):
            continue
        if e.is_dir():
            yield from iter_local(e.path)
        elif e.is_file():
            yield e.path, e.stat().st_size


# --------------------------------------------------------------------------- key ranges


def _alphabet(keys: list[str], skip: int) -> bytes:
    """The printable ASCII bytes the keys use after their first ``skip`` bytes (numbered keys
    use ~14, hex names 16): cuts drawn from them split the keys' own space evenly."""
    seen = {b for k in keys for b in k.encode()[skip:] if _LOW <= b <= _HIGH}
    # + DEL, the ceiling's byte: "above every key seen" keeps a digit of its own
    return bytes([*sorted(seen), 0x7F]) if len(seen) >= 2 else _PRINTABLE


def _digits(key: bytes, start: int, alphabet: bytes) -> int:
    """``_CUT_DIGITS`` bytes of ``key`` from ``start`` as a number in base len(alphabet) + 1,
    order kept: digit 0 is "the key has ended" (a prefix sorts first), alphabet byte j is
    j + 1, and a byte outside the alphabet takes the digit of the alphabet byte below it."""
    value = 0
    for i in range(start, start + _CUT_DIGITS):
        d = bisect.bisect_right(alphabet, key[i]) if i < len(key) else 0
        value = value * (len(alphabet) + 1) + d
    return value


def split_range(
    lo: str, hi: str | None, k: int, ceiling: str | None = None, alphabet: bytes | None = None
) -> list[str]:
    """Up to ``k - 1`` cut keys strictly between ``lo`` and ``hi``, sorted, spread evenly over
    the key space between them after their common prefix, in ``alphabet``'s bytes (default:
    printable ASCII). ``hi`` None: up to ``ceiling`` (the listing prefix + DEL: every key
    under the prefix that is ASCII after it sorts below). Empty when none fits."""
    alphabet = alphabet or _PRINTABLE
    base = len(alphabet) + 1
    top = hi if hi is not None else ceiling
    a = lo.encode()
    b = top.encode() if top is not None else None
    n = 0
    if b is not None:
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
    low = _digits(a, n, alphabet)
    high = _digits(b, n, alphabet) if b is not None else base**_CUT_DIGITS
    cuts: list[str] = []
    for i in range(1, k):
        v = low + (high - low) * i // k
        out = bytearray()
        for _ in range(_CUT_DIGITS):
            v, r = divmod(v, base)
            out.insert(0, alphabet[r - 1] if r else 0)
        # trailing 0s: the key ends there; inner 0s: the lowest byte (order kept, not strictly)
        tail = bytes(out).rstrip(b"\0").replace(b"\0", alphabet[:1])
        cut = (a[:n] + tail).decode()
        if not lo < cut or (top is not None and not cut < top):
            continue
        if not cuts or cut > cuts[-1]:
            cuts.append(cut)
    return cuts


def _estimate_rest(lo: str, last: str, top: str, seen: int, alphabet: bytes) -> int:
    """Keys left in (last, top], from the density of the ``seen`` keys in (lo, last] in the
    cut space; "many" when the keys seen are too dense to measure (a cut is then cheap: the
    empty ranges cost a request each)."""
    a, m, b = lo.encode(), last.encode(), top.encode()
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    low, mid, high = (_digits(k, n, alphabet) for k in (a, m, b))
    if mid <= low:
        return 1 << 62
    return seen * max(high - mid, 0) // (mid - low)


def _child(name: str, i: int) -> str:
    return f"{name}.{i:04d}" if name else f"{i:04d}"


def list_range(
    root: str,
    r: KeyRange,
    st: StorageConfig | None,
    pages: int | None = None,
    page_keys: int | None = None,
) -> tuple[list[tuple[str, int]], list[KeyRange]]:
    """The (uri, size) of up to ``pages`` pages of keys of range ``r`` under ``root``, and the
    ranges left to list (the rest of ``r`` cut in ``FANOUT``; none when ``r`` is done)."""
    pages, page_keys = pages or PAGES_PER_TASK, page_keys or PAGE_KEYS
    fs, path = storage.filesystem(root, st)
    bucket, _, prefix = path.rstrip("/").partition("/")
    prefix = prefix + "/" if prefix else ""
    scheme = _scheme(root)
    items: list[tuple[str, int]] = []
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": page_keys}
    if r.lo:
        kwargs["StartAfter"] = r.lo
    last = r.lo
    for _ in range(pages):
        page = storage.retry(fs.call_s3, "list_objects_v2", **kwargs, what=root)
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if r.hi is not None and key > r.hi:
                return items, []
            last = key
            if not key.endswith("/"):
                items.append((f"{scheme}{bucket}/{key}", int(obj["Size"])))
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            return items, []
        kwargs.pop("StartAfter", None)
        kwargs["ContinuationToken"] = token
    ceiling = prefix + "\x7f"  # every key under the prefix that is ASCII after it sorts below
    alphabet = _alphabet([k for k, _ in items[-page_keys:]], len(f"{scheme}{bucket}/{prefix}"))
    fanout = FANOUT  # an open range: its size is unknown, explore it
    if r.hi is not None:  # a bounded one: as many ranges as its key density says it needs
        rest = _estimate_rest(r.lo, last, r.hi, len(items), alphabet)
        fanout = max(1, min(FANOUT, -(-rest // (pages * page_keys))))
    cuts = split_range(last, r.hi, fanout, ceiling, alphabet)
    bounds = [last, *cuts, r.hi]
    return items, [
        KeyRange(_child(r.name, i + 1), bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)
    ]


def _range_task(
    r: KeyRange,
    root: str,
    st: StorageConfig | None,
    handle: Callable[..., Any],
    kwargs: dict[str, Any],
    pages: int,
    page_keys: int,
) -> tuple[Any, list[KeyRange]]:
    items, rest = list_range(root, r, st, pages, page_keys)
    own = _child(r.name, 0) if rest else r.name or "0000"
    return handle(own, items, **kwargs), rest


def walk_ranges(
    root: str,
    st: StorageConfig | None,
    handle: Callable[..., Any],
    kwargs: dict[str, Any] | None = None,
    pages: int | None = None,
    threads: bool = False,
) -> list[tuple[str, Any]]:
    """Every key below ``root`` (an ``s3://`` prefix), listed by range tasks: each calls
    ``handle(name, [(uri, size), ...], **kwargs)`` on its keys, in the task, and the driver
    keeps only what ``handle`` returns. Returns (name, result) sorted by name = key order.
    Ray tasks when Ray is up (unless ``threads``), else threads."""
    if not _is_s3(root):
        raise ValueError(f"walk_ranges lists s3:// prefixes; {root} is not one")
    kwargs = kwargs or {}
    # sizes read here, on the driver, and sent with each task (a worker has its own module)
    args = (root.rstrip("/"), st, handle, kwargs, pages or PAGES_PER_TASK, PAGE_KEYS)
    out: list[tuple[str, Any]] = []
    queue = [KeyRange("")]
    submit, wait_any, close, _ = _executor(threads)
    pending: dict[Any, KeyRange] = {}
    try:
        while queue or pending:
            while queue and len(pending) < MAX_IN_FLIGHT:
                r = queue.pop()
                pending[submit(_range_task, r, *args)] = r
            for ref, result in wait_any(list(pending)):
                r = pending.pop(ref)
                value, rest = result
                out.append((_child(r.name, 0) if rest else r.name or "0000", value))
                queue.extend(rest)
    finally:
        close()
    return sorted(out, key=lambda t: t[0])


# --------------------------------------------------------------------------- the one walk


def walk(
    root: str,
    st: StorageConfig | None,
    handle: Callable[..., Any],
    kwargs: dict[str, Any] | None = None,
    threads: bool = False,
) -> list[tuple[str, Any]]:
    """Every file below ``root`` (hidden ones left out), listed in parallel tasks that call
    ``handle(name, [(uri, size), ...], **kwargs)`` on consecutive runs of files; returns
    (name, result) sorted by name, which is path order. Ray tasks when Ray is up (unless
    ``threads``), else threads."""
    root = root.rstrip("/")
    args = {"handle": handle, "root": root, "kwargs": kwargs or {}}
    if _is_s3(root):
        return walk_ranges(root, st, _visible_only, args, threads=threads)
    # the run size is read here and sent with each task (a Ray worker has its own module)
    args["run_files"] = RUN_FILES
    if storage.is_remote(root):  # other object stores: fsspec's listing, in one task
        return _flat(run_tasks(_walk_store, [(0, root)], {**args, "st": st}, threads))
    look = first_look(root, st)
    if not look.complete:  # a flat folder of many files: one task walks it all
        return _flat(run_tasks(_walk_paths, [(0, [root])], args, threads))
    entries = [e.path for e in _sorted_entries(storage.strip_scheme(root))]
    entries = [e for e in entries if not hidden(e, storage.strip_scheme(root))]
    tasks: list[tuple[int, list[str]]] = []
    run: list[str] = []
    dirs = 0
    for e in entries:
        if os.path.isdir(e):
            if dirs == DIRS_PER_TASK:
                tasks.append((len(tasks), run))
                run, dirs = [], 0
            dirs += 1
        run.append(e)
    if run or not tasks:
        tasks.append((len(tasks), run))
    return _flat(run_tasks(_walk_paths, tasks, args, threads))


def _flat(results: list[list[tuple[str, Any]]]) -> list[tuple[str, Any]]:
    return sorted((x for r in results for x in r), key=lambda t: t[0])


def _runs(
    k: int,
    files: Iterator[tuple[str, int]],
    handle: Callable[..., Any],
    kwargs: dict[str, Any],
    run_files: int,
) -> list[tuple[str, Any]]:
    """``handle`` on consecutive runs of at most ``run_files`` files, named ``<k>.<j>``."""
    out, run = [], []
    for f in files:
        run.append(f)
        if len(run) == run_files:
            out.append(
                (f"{k:05d}.{len(out):05d}", handle(f"{k:05d}.{len(out):05d}", run, **kwargs))
            )
            run = []
    if run or not out:
        out.append((f"{k:05d}.{len(out):05d}", handle(f"{k:05d}.{len(out):05d}", run, **kwargs)))
    return out


def _walk_paths(
    task: tuple[int, list[str]],
    handle: Callable[..., Any],
    root: str,
    kwargs: dict[str, Any],
    run_files: int,
) -> list[tuple[str, Any]]:
    """A local walking task: the files at or below its top-level entries, in path order."""
    k, paths = task
    files = (f for p in paths for f in iter_local(p))
    return _runs(k, files, handle, kwargs, run_files)


def _walk_store(
    task: tuple[int, str],
    handle: Callable[..., Any],
    root: str,
    kwargs: dict[str, Any],
    run_files: int,
    st: StorageConfig | None,
) -> list[tuple[str, Any]]:
    k, uri = task
    fs, path = storage.filesystem(uri, st)
    scheme = _scheme(uri)
    found = sorted(fs.find(path, detail=True).items())
    files = (
        (scheme + p, int(info.get("size") or -1))
        for p, info in found
        if not hidden(scheme + p, root)
    )
    return _runs(k, files, handle, kwargs, run_files)


def _visible_only(
    name: str, items: list[tuple[str, int]], handle: Callable[..., Any], root: str,
    kwargs: dict[str, Any],
) -> Any:  # fmt: skip
    """A key range's files without the hidden ones, to ``handle``."""
    return handle(name, [(u, s) for u, s in items if not hidden(u, root)], **kwargs)


def run_tasks(
    fn: Callable[..., Any], items: list[Any], kwargs: dict[str, Any], threads: bool = False
) -> list[Any]:
    """``fn(item, **kwargs)`` for every item, in item order: Ray tasks of 0.25 CPU when Ray is
    up (at most MAX_IN_FLIGHT at once; unless ``threads``), else 16 threads."""
    submit, wait_any, close, share = _executor(threads or len(items) <= 1)
    kw = share(kwargs)  # once, not with every task (it may hold a listing)
    out: dict[int, Any] = {}
    pending: dict[Any, int] = {}
    queue = list(enumerate(items))[::-1]
    try:
        while queue or pending:
            while queue and len(pending) < MAX_IN_FLIGHT:
                i, item = queue.pop()
                pending[submit(_call_kw, fn, item, kw)] = i
            for ref, result in wait_any(list(pending)):
                out[pending.pop(ref)] = result
    finally:
        close()
    return [out[i] for i in range(len(items))]


def _call_kw(fn: Callable[..., Any], item: Any, kwargs: dict[str, Any]) -> Any:
    return fn(item, **kwargs)


def _executor(
    threads: bool = False,
) -> tuple[Callable[..., Any], Callable[[list[Any]], list[tuple[Any, Any]]], Any, Any]:
    """(submit, wait for some, close, share): Ray tasks of 0.25 CPU when Ray is up, else
    threads; ``share`` puts an argument every task gets into the object store once."""
    import ray

    if ray.is_initialized() and not threads:
        remote = ray.remote(num_cpus=0.25, max_retries=3)(_call)

        def submit(fn: Callable[..., Any], *a: Any) -> Any:
            return remote.remote(fn, *a)

        def wait_ray(refs: list[Any]) -> list[tuple[Any, Any]]:
            done, _ = ray.wait(refs, num_returns=1)
            return [(ref, ray.get(ref)) for ref in done]

        return submit, wait_ray, lambda: None, ray.put
    pool = ThreadPoolExecutor(max_workers=16)

    def wait_threads(futures: list[Future[Any]]) -> list[tuple[Any, Any]]:
        done, _ = wait(futures, return_when=FIRST_COMPLETED)
        return [(f, f.result()) for f in done]

    return pool.submit, wait_threads, pool.shutdown, lambda x: x


def _call(fn: Callable[..., Any], *a: Any) -> Any:
    return fn(*a)
