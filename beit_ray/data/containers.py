"""Read images in one place, for every job: loose files, tar members and parquet rows.

    read_files(uris, st)                   bytes of each file: one GET per object, concurrently
    members(uri, st, want=...)             a tar's regular members in tar order, one pass
    samples(uri, layout, members)          the inputs among them (the one rule, below)
    read_span(uri, start, end, st)         bytes by one ranged read (a member by its offset)
    parquet_rows / parquet_images          a parquet file's row count / some rows' image bytes
    peek_layout(uri, st)                   class tars or WebDataset, from the first headers

**How bytes are fetched.** A tar is opened here only (the project's one call of tarfile's ``open``).
A local tar seeks over the data it does not want (a header-only pass reads headers). An
object-store tar is read through a read-ahead buffer of ``TAR_BLOCK`` bytes: tarfile reads 10
KB at a time, and unbuffered each read would be a ranged GET (986 GETs for a 100-image tar);
buffered, a tar costs one GET per 8 MiB. A member whose offset a listing recorded is one
ranged read (:func:`read_span`).

**Failures.** Throttling (S3 ``SlowDown``, 503), other 5xx answers, timeouts and reset
connections are transient: each read is retried with backoff (:func:`storage.retry`), a tar
resuming at the header after the last member it gave. What still fails after the retries
raises :class:`~beit_ray.storage.TransientError`: never an error row, so nothing is recorded as
bad that a rerun could read. Permanent causes (a missing object, no permission, a damaged tar,
a parquet file without the image column) raise their own errors, which callers turn into rows.

**Which members are inputs** (:func:`samples`): class tars (ImageNet-22k, one tar per class):
every regular member with an image suffix, except hidden ones (macOS ``._x.jpg``) and repeats
of a name. WebDataset shards: members grouped by key (the name up to its first dot, runs of
consecutive members); a sample's input is its first image member, its label the ``.cls``
(an int) or ``.json`` (``label`` / ``cls``, ``class_name`` / ``class``) member; a sample with
no image is an error input; a key that comes back after other keys is ignored.
"""

from __future__ import annotations

import json
import os
import posixpath
import tarfile
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any, NamedTuple

from beit_ray import storage
from beit_ray.storage import StorageConfig

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".jfif")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
TAR_BLOCK = 8 << 20
"""Bytes an object-store tar is read ahead by: one GET per 8 MiB of tar."""


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def is_tar(name: str) -> bool:
    return name.lower().endswith(TAR_SUFFIXES)


def compressed(uri: str) -> bool:
    return uri.lower().endswith((".gz", ".tgz"))


class Member(NamedTuple):
    """A tar's regular member: ``offset`` is where its data starts (-1 in a compressed tar)."""

    name: str
    offset: int
    size: int
    data: bytes | None = None
    """The member's bytes when they were wanted, else None."""
    error: str = ""
    """Why the wanted bytes are missing: the tar ends inside them (the tar's error follows)."""


@dataclass
class Sample:
    """One input of a tar: its image member (None: the sample has none) and its label."""

    key: str
    """class tars: the member name; WebDataset: the sample key (folder/name up to the dot)."""
    image: Member | None
    label: int = -1
    class_name: str = ""
    error: str = ""
    """"" when fine; no_image / bad_label otherwise."""


# --------------------------------------------------------------------------- files


def read_files(
    uris: list[str], st: StorageConfig | None = None, concurrency: int = 32
) -> list[bytes | Exception]:
    """Each file's bytes, or the permanent exception (missing, no permission) for that file.
    Object-store files: one GET each (s3fs's ``cat`` would HEAD first), ``concurrency`` at once,
    transient failures retried; raises TransientError when one outlives the retries."""
    remote = [u for u in uris if storage.is_remote(u)]
    got: dict[str, bytes | Exception] = {}
    if remote:
        fs, _ = storage.filesystem(remote[0], st)
        keys = [storage.strip_scheme(u) for u in remote]
        if hasattr(fs, "_call_s3"):
            from fsspec.asyn import sync

            found = sync(fs.loop, _get_objects, fs, keys, concurrency)
        else:  # other object stores: fsspec's concurrent cat, retried as a whole
            cat = storage.retry(lambda: fs.cat(keys, on_error="return"), what=remote[0])
            found = [cat.get(k, FileNotFoundError(k)) for k in keys]
        got.update(zip(remote, found, strict=True))
    out: list[bytes | Exception] = []
    for u in uris:
        if u in got:
            out.append(got[u])
            continue
        try:
            with open(storage.strip_scheme(u), "rb") as f:
                out.append(f.read())
        except OSError as e:  # missing, permission: the row says so
            out.append(e)
    return out


async def _get_objects(fs: Any, keys: list[str], concurrency: int) -> list[bytes | Exception]:
    import asyncio

    gate = asyncio.Semaphore(concurrency)

    async def get_once(key: str) -> bytes:
        bucket, name, _ = fs.split_path(key)
        resp = await fs._call_s3("get_object", Bucket=bucket, Key=name)
        body = resp["Body"]
        try:
            return await body.read()
        finally:
            body.close()

    async def get(key: str) -> bytes | Exception:
        async with gate:
            try:
                return await storage.retry_async(get_once, key, what=key)
            except storage.TransientError:
                raise
            except Exception as e:  # permanent: the row says so
                return e

    return list(await asyncio.gather(*(get(k) for k in keys)))


def read_span(uri: str, start: int, end: int, st: StorageConfig | None = None) -> bytes:
    """Bytes [start, end) of a file: one ranged GET on an object store (retried)."""
    if storage.is_remote(uri):
        fs, path = storage.filesystem(uri, st)
        return storage.retry(fs.cat_file, path, start=start, end=end, what=uri)
    with open(storage.strip_scheme(uri), "rb") as f:
        f.seek(start)
        return f.read(end - start)


# --------------------------------------------------------------------------- tars


@contextmanager
def _open(uri: str, st: StorageConfig | None, at: int, block: int, size: int | None):  # noqa: ANN202
    """A tar at byte ``at``: seekable (a local file, or an object-store file read ahead by
    ``block`` bytes a GET; 0: exactly what tarfile asks for), or a stream when compressed."""
    mode = "r|*" if compressed(uri) else "r:"
    if storage.is_remote(uri):
        fs, path = storage.filesystem(uri, st)
        cache = "readahead" if block else "none"  # none: each read is its own ranged GET
        opened: IO[bytes] = fs.open(
            path, "rb", block_size=block or None, cache_type=cache, size=size
        )
    else:
        opened = open(storage.strip_scheme(uri), "rb")  # noqa: SIM115 - closed below
    try:
        total = getattr(opened, "size", None) or os.fstat(opened.fileno()).st_size
        if at:
            opened.seek(at)
        # the project's one open of a tar: member offsets are positions in the file
        with tarfile.open(fileobj=opened, mode=mode) as tar:
            yield tar, total
    finally:
        opened.close()


def members(
    uri: str,
    st: StorageConfig | None = None,
    want: Callable[[str], bool] | None = None,
    *,
    block: int = TAR_BLOCK,
    size: int | None = None,
) -> Iterator[Member]:
    """A tar's regular members in tar order, with the bytes of those ``want`` accepts (None:
    headers only). Transient failures resume at the next header (a compressed tar restarts and
    skips the members already given); a damaged tar raises after its last good member.
    ``size``: the object's size when known (saves a HEAD request)."""
    given, at, attempt = 0, 0, 0
    while True:
        try:
            skip = given if compressed(uri) else 0
            with _open(uri, st, 0 if compressed(uri) else at, block, size) as (tar, total):
                for m in tar:
                    # where a retry resumes once this member is done: the next header
                    following = m.offset_data + -(-m.size // 512) * 512
                    if not m.isfile():
                        at = following
                        continue
                    if skip:  # a compressed tar restarted: the members given before
                        skip -= 1
                        continue
                    data, offset = None, -1 if compressed(uri) else m.offset_data
                    if want is not None and want(m.name):
                        try:
                            data = tar.extractfile(m).read()  # type: ignore[union-attr]
                        except Exception as e:
                            if not storage.is_transient(
                                e
                            ):  # cut inside it: its row, then the tar's
                                why = f"read_failed: {type(e).__name__}: {e}"[:500]
                                yield Member(m.name, offset, m.size, None, why)
                            raise
                    if data is None and not compressed(uri) and m.offset_data + m.size > total:
                        # seeking past data does not notice a cut tar: its size does
                        why = f"read_failed: truncated: {m.name} runs past the end of the tar"
                        yield Member(m.name, offset, m.size, None, why)
                        raise tarfile.ReadError(why)
                    at, given, attempt = following, given + 1, 0
                    yield Member(m.name, offset, m.size, data)
            return
        except Exception as e:
            if not storage.is_transient(e):
                raise
            attempt += 1
            storage.backoff(attempt, e, uri)


def _wds_key(name: str) -> str:
    folder, base = posixpath.split(name)
    return posixpath.join(folder, base.partition(".")[0])


def _wds_label(parts: dict[str, Member]) -> tuple[int, str]:
    """(label, class name) of a WebDataset sample from its .cls or .json member's bytes."""
    cls = parts.get("cls")
    if cls is not None and cls.data is not None:
        return int(cls.data.decode().strip()), ""
    meta = parts.get("json")
    if meta is not None and meta.data is not None:
        d = json.loads(meta.data)
        label = d.get("label", d.get("cls", -1)) if isinstance(d, dict) else -1
        name = d.get("class_name", d.get("class", "")) if isinstance(d, dict) else ""
        return int(label), str(name)
    return -1, ""


def wanted(layout: str, labels: bool = True) -> Callable[[str], bool]:
    """The members whose bytes a reader of ``layout`` needs: images (+ labels: .cls / .json)."""
    if layout == "class_tars" or not labels:
        return is_image
    return lambda name: is_image(name) or name.lower().endswith((".cls", ".json"))


def samples(layout: str, tar_members: Iterable[Member]) -> Iterator[Sample]:
    """The inputs among a tar's members, in tar order (the rule in the module docstring).
    WebDataset samples without an image come at the end, as error samples."""
    seen: set[str] = set()
    if layout == "class_tars":
        for m in tar_members:
            name = posixpath.normpath(m.name).lstrip("/")
            if name in seen or posixpath.basename(name).startswith(".") or not is_image(name):
                continue
            seen.add(name)
            yield Sample(name, m, error=m.error)
        return
    done: set[str] = set()  # keys whose sample was given
    no_image: dict[str, list[str]] = {}  # key → extensions seen, while it has no image
    key: str | None = None
    parts: dict[str, Member] = {}

    def close(key: str | None, parts: dict[str, Member]) -> Iterator[Sample]:
        if key is None or key in done:  # a later run of a given key's members: ignored
            return
        image = next((m for ext, m in parts.items() if is_image("." + ext)), None)
        if image is None:
            no_image.setdefault(key, []).extend(parts)
            return
        done.add(key)
        no_image.pop(key, None)
        try:
            label, cls = _wds_label(parts)
        except (ValueError, UnicodeDecodeError) as e:
            yield Sample(key, None, error=f"bad_label: {type(e).__name__}: {e}"[:500])
            return
        yield Sample(key, image, label, cls, image.error)

    try:
        for m in tar_members:
            name = posixpath.normpath(m.name).lstrip("/")
            if name in seen or posixpath.basename(name).startswith("."):
                continue
            seen.add(name)
            k = _wds_key(name)
            if k != key:
                yield from close(key, parts)
                key, parts = k, {}
            parts.setdefault(posixpath.basename(name).partition(".")[2].lower(), m)
    except storage.TransientError:
        raise  # the reader fails and is retried: nothing partial is given
    except Exception as e:  # a damaged tar: the samples before the damage, then the error
        failure = e
    else:
        failure = None
    yield from close(key, parts)
    for k, exts in no_image.items():
        yield Sample(k, None, error=f"no_image: sample has only {sorted(exts)}")
    if failure is not None:
        raise failure


def tar_samples(
    uri: str, layout: str, st: StorageConfig | None = None, labels: bool = True
) -> Iterator[Sample]:
    """:func:`samples` of one tar read once, with the image (and label) bytes."""
    return samples(layout, members(uri, st, wanted(layout, labels)))


def read_members(
    uri: str, names: Collection[str], st: StorageConfig | None = None
) -> dict[str, bytes]:
    """The bytes of the named members (first copy of a name) from one pass that stops after the
    last one (a compressed tar cannot seek; an uncompressed one is better read by offsets)."""
    todo, out = set(names), {}
    if not todo:
        return out
    for m in members(uri, st, want=lambda n: n in todo and n not in out):
        if m.data is not None and m.name not in out:
            out[m.name] = m.data
            if len(out) == len(todo):
                break
    return out


def peek_layout(uri: str, st: StorageConfig | None = None, n: int = 8) -> str:
    """webdataset when one of the first ``n`` members is a .cls / .json, else class_tars (their
    headers only: an object-store tar costs a few small ranged reads)."""
    names = []
    for m in members(uri, st, block=0):  # no read-ahead: a 512-byte GET per header
        names.append(m.name)
        if len(names) >= n:
            break
    is_wds = any(x.lower().endswith((".cls", ".json")) for x in names)
    return "webdataset" if is_wds else "class_tars"


# --------------------------------------------------------------------------- parquet


def _parquet_file(uri: str, st: StorageConfig | None) -> Any:
    import pyarrow.parquet as pq

    fs, path = storage.pyarrow_fs(uri, st)
    return storage.retry(pq.ParquetFile, path, filesystem=fs, what=uri)


def _check_images(pf: Any, image_column: str) -> None:
    """ValueError (a permanent cause) when ``image_column`` is missing or not binary."""
    import pyarrow as pa

    schema = pf.schema_arrow
    if image_column not in schema.names:
        raise ValueError(f"no column {image_column!r} in {schema.names}")
    kind = schema.field(image_column).type
    if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        raise ValueError(f"column {image_column!r} is {kind}, not binary")


def parquet_rows(uri: str, image_column: str, st: StorageConfig | None = None) -> int:
    """Rows of a parquet file of images, from its footer."""
    pf = _parquet_file(uri, st)
    _check_images(pf, image_column)
    return pf.metadata.num_rows


def parquet_images(
    uri: str,
    image_column: str,
    rows: Collection[int] | None = None,
    st: StorageConfig | None = None,
    columns: Collection[str] = (),
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row index, {image_column: bytes or None, other ``columns``}) of the wanted rows (None:
    all), reading only the row groups that hold them, one at a time (retried)."""
    pf = _parquet_file(uri, st)
    _check_images(pf, image_column)
    names = set(pf.schema_arrow.names)
    cols = [image_column, *(c for c in columns if c in names and c != image_column)]
    wanted_rows = None if rows is None else sorted(set(rows))
    start = 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        here = (
            range(start, start + n)
            if wanted_rows is None
            else [r for r in wanted_rows if start <= r < start + n]
        )
        if here:
            table = storage.retry(pf.read_row_group, g, columns=cols, what=uri).to_pydict()
            for r in here:
                yield r, {c: table[c][r - start] for c in cols}
        start += n
