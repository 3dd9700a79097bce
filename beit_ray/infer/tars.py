"""Tars as labelling inputs: which members are images, and reading an object-store tar once.

:func:`select_members` is the one rule for which members become inputs (class tars: every
regular file; WebDataset: each sample's first image member, or an error row for a sample with
none), used both by the header-only listing of local tars and by :func:`stream_tar`.

On an object store every seek is a request, so a tar there is not listed first and read again
by member offsets (2x its bytes): one task streams it once, in tar order, and cuts its members
into chunks as they arrive (:func:`stream_tar`). :func:`peek_layout` tells class tars from
WebDataset shards from the first members' headers alone (ranged reads), not their data.
"""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Callable, Iterable, Iterator

from beit_ray import storage as st
from beit_ray.config import StorageConfig
from beit_ray.infer.inputs import TAR_READ_BUFFER, Entry, member_path

# (name, data offset, size, bytes or None when only listed, "" or why the bytes are missing)
Member = tuple[str, int, int, "bytes | None", str]
# an input, its bytes (None: not read, or unreadable) and "" or its error
Item = tuple[Entry, "bytes | None", str]


def _image(name: str) -> bool:
    from beit_ray.data.sources import IMAGE_SUFFIXES

    return name.lower().endswith(IMAGE_SUFFIXES)


def select_members(
    uri: str, layout: str, members: Iterable[Member], error: str | Callable[[], str] = ""
) -> Iterator[Item]:
    """The inputs among a tar's members, in tar order (a WebDataset sample when its key ends;
    samples without an image as error rows at the end), then a row for the tar itself when it
    could not be read to its end (``error``, read after ``members`` is exhausted when callable)."""
    seen: set[str] = set()
    emitted: set[str] = set()  # WebDataset keys whose image was given
    no_image: dict[str, list[str]] = {}  # key → extensions seen, while it has no image
    key, group = None, []  # the current sample's members (WebDataset)

    def sample(key: str | None, group: list[Item]) -> Iterator[Item]:
        if key is None or key in emitted:  # a later run of a given key's members: ignored
            return
        image = next((it for it in group if _image(it[0].member)), None)
        if image is None:
            exts = [posixpath.basename(it[0].member).partition(".")[2] for it in group]
            no_image.setdefault(key, []).extend(exts)
            return
        emitted.add(key)
        no_image.pop(key, None)
        yield image

    for name, offset, size, data, why in members:
        path = member_path(uri, name)
        if path in seen or posixpath.basename(name).startswith("."):  # AppleDouble ._x.jpg
            continue
        seen.add(path)
        item = (Entry(path, "tar", uri, name, offset, size), data, why)
        if layout == "class_tars":
            yield item
            continue
        folder, base = posixpath.split(name)
        k = posixpath.join(folder, base.partition(".")[0])
        if k != key:
            yield from sample(key, group)
            key, group = k, []
        group.append(item)
    yield from sample(key, group)
    for k, exts in no_image.items():
        if member_path(uri, k) not in seen:
            reason = f"no_image: sample has only {sorted(exts)}"
            yield Entry(member_path(uri, k), "error", member=reason), None, reason
    why = error() if callable(error) else error
    if why:
        yield Entry(uri, "error", member=why), None, why


def _streamed(
    uri: str, storage: StorageConfig | None, want: Callable[[str], bool], failure: list[str]
) -> Iterator[Member]:
    """A tar's regular members with the bytes of the wanted ones, from one streamed pass (8 MiB
    GETs); why it stopped early goes to ``failure``."""
    compressed = uri.lower().endswith((".gz", ".tgz"))
    fs, path = st.pyarrow_fs(uri, storage)
    try:
        stream = fs.open_input_stream(path, buffer_size=TAR_READ_BUFFER)
        with stream as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                offset = -1 if compressed else m.offset_data
                if not want(m.name):  # its bytes are skipped by the next header read
                    yield m.name, offset, m.size, None, ""
                    continue
                try:
                    data = tar.extractfile(m).read()  # type: ignore[union-attr]
                except Exception as e:  # cut inside this member: it and the tar get a row
                    yield (
                        m.name,
                        offset,
                        m.size,
                        None,
                        f"read_failed: {type(e).__name__}: {e}"[:500],
                    )
                    raise
                yield m.name, offset, m.size, data, ""
    except Exception as e:
        failure.append(f"read_failed: {type(e).__name__}: {e}"[:500])


def stream_tar(
    uri: str, layout: str, chunk_size: int, storage: StorageConfig | None
) -> Iterator[tuple[list[Entry], list[bytes | None], list[str]]]:
    """A tar's inputs in chunks of ``chunk_size`` (entries, bytes, errors: "" when fine), read in
    one streamed pass; only the current chunk's bytes are held."""
    failure: list[str] = []
    want = (lambda _: True) if layout == "class_tars" else _image
    members = _streamed(uri, storage, want, failure)
    error = lambda: failure[0] if failure else ""  # noqa: E731 - known once members are read
    chunk: list[Item] = []
    for item in select_members(uri, layout, members, error):
        chunk.append(item)
        if len(chunk) == chunk_size:
            yield [e for e, _, _ in chunk], [d for _, d, _ in chunk], [w for _, _, w in chunk]
            chunk = []
    if chunk:
        yield [e for e, _, _ in chunk], [d for _, d, _ in chunk], [w for _, _, w in chunk]


def peek_layout(uri: str, storage: StorageConfig | None, n: int = 8) -> str:
    """webdataset when one of the first ``n`` members is a .cls/.json, else class_tars; an
    uncompressed object-store tar is read by its headers (ranged reads), never its members."""
    from beit_ray.data.sources import detect_layout

    if not st.is_remote(uri) or uri.lower().endswith((".gz", ".tgz")):
        return detect_layout([uri], storage)
    fs, path = st.pyarrow_fs(uri, storage)
    names: list[str] = []
    with fs.open_input_file(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for m in tar:  # seeks over member data: a header read each
            names.append(m.name)
            if len(names) >= n:
                break
    is_wds = any(x.lower().endswith((".cls", ".json")) for x in names)
    return "webdataset" if is_wds else "class_tars"
