"""Containers (tars, parquet files) as labelling inputs: their images as plan entries, listed
or read once.

Which members are inputs is :func:`beit_ray.data.containers.samples`' rule, the one every job
uses; this module turns them into labelling :class:`~beit_ray.infer.inputs.Entry` rows. A local
tar is listed from its headers (member offsets: labelling reads each member span once, by
ranged reads), a local parquet file from its footer. On an object store every seek is a request
and a parquet row group is read whole, so a container there is not listed first and read
again (2x a tar's bytes; a row group once per chunk that touches it, ~3x): one task reads it
once, in its own order, and cuts its inputs into chunks as they arrive (:func:`stream`).
"""

from __future__ import annotations

from collections.abc import Iterator

from beit_ray.data import containers
from beit_ray.infer.inputs import Entry, member_path
from beit_ray.storage import StorageConfig, TransientError

# an input, its bytes (None: not read, or unreadable) and "" or its error
Item = tuple[Entry, "bytes | None", str]


def tar_items(uri: str, layout: str, storage: StorageConfig | None, read: bool) -> Iterator[Item]:
    """A tar's inputs in tar order (WebDataset samples without an image at the end), with their
    bytes when ``read``, then a row for the tar itself when it could not be read to its end.
    Entries of inputs that cannot be read (cut inside their data) are error entries."""
    want = containers.wanted(layout, labels=False) if read else None
    tar_members = containers.members(uri, storage, want)
    try:
        for s in containers.samples(layout, tar_members):
            m = s.image
            if m is None or (s.error and not read):
                path = member_path(uri, s.key if m is None else m.name)
                yield Entry(path, "error", member=s.error), None, s.error
            else:
                entry = Entry(member_path(uri, m.name), "tar", uri, m.name, m.offset, m.size)
                yield entry, m.data, s.error
    except TransientError:
        raise  # not the tar's fault: the task fails and is retried, no row is written
    except Exception as e:  # damaged: the inputs before the damage keep their rows
        why = f"read_failed: {type(e).__name__}: {e}"[:500]
        yield Entry(uri, "error", member=why), None, why


def parquet_items(uri: str, image_column: str, storage: StorageConfig | None) -> Iterator[Item]:
    """A parquet file's rows in order, with their bytes, one row group read at a time; a file
    that cannot be read (no image column, damaged) ends with a row for the file itself."""
    try:
        for r, row in containers.parquet_images(uri, image_column, None, storage):
            data = row[image_column]
            yield (
                Entry(f"{uri}#{r}", "parquet", uri, str(r)),
                data,
                "" if data is not None else "empty: null image",
            )
    except TransientError:
        raise  # not the file's fault: the task fails and is retried, no row is written
    except Exception as e:  # damaged: the rows before the damage keep their rows
        why = f"read_failed: {type(e).__name__}: {e}"[:500]
        yield Entry(uri, "error", member=why), None, why


def stream(
    uri: str, layout: str, chunk_size: int, storage: StorageConfig | None, image_column: str
) -> Iterator[tuple[list[Entry], list[bytes | None], list[str]]]:
    """A container's inputs in chunks of ``chunk_size`` (entries, bytes, errors: "" when fine),
    read in one pass; only the current chunk's bytes are held."""
    items = (
        parquet_items(uri, image_column, storage)
        if layout == "parquet"
        else tar_items(uri, layout, storage, read=True)
    )
    chunk: list[Item] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == chunk_size:
            yield [e for e, _, _ in chunk], [d for _, d, _ in chunk], [w for _, _, w in chunk]
            chunk = []
    if chunk:
        yield [e for e, _, _ in chunk], [d for _, d, _ in chunk], [w for _, _, w in chunk]


def list_container(
    uri: str, layout: str, image_column: str, storage: StorageConfig | None
) -> list[Entry]:
    """The images inside one tar or parquet file, in its own order (one Ray task per file); a
    tar's from its headers, with each member's offset."""
    if layout == "parquet":
        try:
            n = containers.parquet_rows(uri, image_column, storage)
        except TransientError:
            raise
        except Exception as e:
            return [Entry(uri, "error", member=f"read_failed: {type(e).__name__}: {e}"[:500])]
        return [Entry(f"{uri}#{i}", "parquet", uri, str(i)) for i in range(n)]
    return [e for e, _, _ in tar_items(uri, layout, storage, read=False)]
