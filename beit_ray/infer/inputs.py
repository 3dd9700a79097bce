"""What to label: the input's layout → one :class:`Entry` per image → the chunk plan.

Layouts (``LabelConfig.layout``) and the identity (output ``path``) of each image:
    files        every file below the input                      its URI
    manifest     the URIs in a .parquet/.csv                     the URI
    class_tars   every member of every tar (ImageNet-22k)        <tar uri>/<member>
    webdataset   the image of every <key>.* sample of every tar  <tar uri>/<key>.<ext>
    parquet      every row of every .parquet's image column      <parquet uri>#<row index>
Containers are listed in parallel Ray tasks (tar headers; parquet footers), never by reading
images on the driver; the list is saved as ``_INPUTS.parquet`` so a rerun need not list again.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from beit_ray import storage as st
from beit_ray.config import ConfigError, StorageConfig
from beit_ray.infer.config import LabelConfig
from beit_ray.runtime import print0

PLAN_NAME, INPUTS_NAME, MASKS_DIR = "_PLAN.json", "_INPUTS.parquet", "_masks"
CONTAINER_LAYOUTS = ("class_tars", "webdataset", "parquet")


def _hidden(uri: str, root: str) -> bool:
    rel = uri[len(root) :].lstrip("/") if uri.startswith(root) else os.path.basename(uri)
    return any(part.startswith((".", "_")) for part in rel.split("/"))


class Entry(NamedTuple):
    """One input image: ``path`` names its output row; the rest says how to read it."""

    path: str
    kind: str = "file"
    """file (read ``path``), tar (member ``member`` of ``container``), parquet (row
    ``member`` of ``container``) or error (nothing to read; ``member`` is the reason)."""
    container: str = ""
    member: str = ""


def _list_folder(cfg: LabelConfig) -> list[str]:
    root = cfg.input.rstrip("/")
    out_root = cfg.output.rstrip("/") + "/"
    files = st.list_files(root, cfg.storage)
    # hidden files (.DS_Store, _SUCCESS) are not inputs; nor are our own outputs
    return [f for f in files if not _hidden(f, root) and not f.startswith(out_root)]


def resolve_layout(cfg: LabelConfig) -> tuple[str, list[str]]:
    """The input's layout (``auto`` resolved) and its units: image URIs (files, manifest) or the
    tar/parquet files to open (container layouts)."""
    from beit_ray.data.sources import IMAGE_SUFFIXES, TAR_SUFFIXES, detect_layout

    layout, lower = cfg.layout, cfg.input.lower()
    if not st.exists(cfg.input, cfg.storage):
        raise ConfigError(f"input: {cfg.input} does not exist")
    if not _is_dir(cfg.input, cfg.storage):  # one file
        if layout == "auto":
            if lower.endswith(".csv"):
                layout = "manifest"
            elif lower.endswith(".parquet"):
                layout = "parquet" if _holds_images(cfg) else "manifest"
            elif lower.endswith(TAR_SUFFIXES):
                layout = detect_layout([cfg.input], cfg.storage)
            else:
                layout = "files"
        if layout == "manifest":
            return layout, read_manifest(cfg.input, cfg.manifest_column, cfg.storage)
        return layout, [cfg.input]
    if layout == "manifest":
        raise ConfigError(f"layout: manifest needs a .parquet/.csv file; {cfg.input} is a folder")
    files = _list_folder(cfg)
    kinds = {
        "tar": [f for f in files if f.lower().endswith(TAR_SUFFIXES)],
        "parquet": [f for f in files if f.lower().endswith(".parquet")],
        "image": [f for f in files if f.lower().endswith(IMAGE_SUFFIXES)],
    }
    if layout == "auto":
        present = [k for k, v in kinds.items() if v]
        if len(present) > 1:  # picking one kind would silently drop the others
            found = ", ".join(f"{len(kinds[k])} {k} files" for k in present)
            raise ConfigError(
                f"layout: {cfg.input} mixes {found}; pass --layout files, class_tars, "
                "webdataset or parquet (the other kinds are then not inputs)"
            )
        layout = detect_layout(files, cfg.storage)
        layout = "files" if layout == "folders" else layout
    if layout == "files":
        return layout, files
    units = kinds["parquet" if layout == "parquet" else "tar"]
    if len(units) < len(files):
        print0(f"label: {len(files) - len(units)} files beside the {layout} inputs are ignored")
    return layout, units


def _holds_images(cfg: LabelConfig) -> bool:
    from beit_ray.data.sources import parquet_image_rows

    try:
        parquet_image_rows(cfg.input, cfg.image_column, cfg.storage)
        return True
    except ValueError:
        return False


def member_path(container: str, name: str) -> str:
    """A tar member's identity: ``<tar uri>/<member name>`` (``./`` prefixes dropped)."""
    return f"{container}/{posixpath.normpath(name).lstrip('/')}"


def list_container(
    uri: str, layout: str, image_column: str, storage: StorageConfig | None
) -> list[Entry]:
    """The images inside one tar or parquet file, in its own order (one Ray task per file)."""
    from beit_ray.data.sources import IMAGE_SUFFIXES, iter_tar_members, parquet_image_rows

    if layout == "parquet":
        try:
            n = parquet_image_rows(uri, image_column, storage)
        except Exception as e:
            return [Entry(uri, "error", member=f"read_failed: {type(e).__name__}: {e}"[:500])]
        return [Entry(f"{uri}#{i}", "parquet", uri, str(i)) for i in range(n)]
    names, error = [], None
    try:
        names.extend(iter_tar_members(uri, storage))
    except Exception as e:  # keep the members listed before the damage; the tar gets a row
        error = f"read_failed: {type(e).__name__}: {e}"[:500]
    out, seen = [], set()
    samples: dict[str, list[str]] = {}  # webdataset: key → member names, first-seen order
    for name in names:
        path = member_path(uri, name)
        if path in seen or posixpath.basename(name).startswith("."):  # AppleDouble ._x.jpg
            continue
        seen.add(path)
        if layout == "class_tars":
            out.append(Entry(path, "tar", uri, name))
            continue
        folder, base = posixpath.split(name)
        samples.setdefault(posixpath.join(folder, base.partition(".")[0]), []).append(name)
    for key, members in samples.items():
        image = next((m for m in members if m.lower().endswith(IMAGE_SUFFIXES)), None)
        if image is not None:
            out.append(Entry(member_path(uri, image), "tar", uri, image))
        else:
            exts = sorted(posixpath.basename(m).partition(".")[2] for m in members)
            reason = f"no_image: sample has only {exts}"
            out.append(Entry(member_path(uri, key), "error", member=reason))
    if error:
        out.append(Entry(uri, "error", member=error))
    return out


def plan_entries(cfg: LabelConfig, layout: str, units: list[str]) -> list[Entry]:
    """Every input image in plan order; container members listed in parallel Ray tasks, or
    taken from the first run's ``_INPUTS.parquet`` when the containers are the same."""
    if layout not in CONTAINER_LAYOUTS:
        return [Entry(u) for u in units]
    cached = _cached_entries(cfg, layout, units)
    if cached is not None:
        return cached
    import ray

    from beit_ray.runtime import init_ray

    init_ray(cfg.ray, cfg.storage)
    print0(f"label: listing the images in {len(units)} {layout} files")
    task = ray.remote(list_container).options(num_cpus=cfg.actors.decode_cpus)
    refs = [task.remote(u, layout, cfg.image_column, cfg.storage) for u in units]
    entries, seen = [], set()
    for listed in ray.get(refs):
        for e in listed:
            if e.path not in seen:
                seen.add(e.path)
                entries.append(Entry(*e))
    return entries


def _digest(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _cached_entries(cfg: LabelConfig, layout: str, units: list[str]) -> list[Entry] | None:
    plan_uri, inputs_uri = st.join(cfg.output, PLAN_NAME), st.join(cfg.output, INPUTS_NAME)
    if not (st.exists(plan_uri, cfg.storage) and st.exists(inputs_uri, cfg.storage)):
        return None
    plan = json.loads(st.read_text(plan_uri, cfg.storage))
    if plan.get("layout") != layout or plan.get("containers_sha256") != _digest(units):
        return None
    fs, path = st.pyarrow_fs(inputs_uri, cfg.storage)
    table = pq.read_table(path, filesystem=fs).to_pydict()
    return [Entry(*row) for row in zip(*(table[f] for f in Entry._fields), strict=True)]


def _is_dir(uri: str, storage: StorageConfig | None) -> bool:
    fs, path = st.filesystem(uri, storage)
    return fs.isdir(path)


def read_manifest(uri: str, column: str, storage: StorageConfig | None = None) -> list[str]:
    """Image URIs from a parquet/CSV manifest; relative entries are relative to its folder."""
    fs, path = st.pyarrow_fs(uri, storage)
    if uri.lower().endswith(".csv"):
        import pyarrow.csv as pacsv

        with fs.open_input_stream(path) as f:
            table = pacsv.read_csv(f)
    else:
        table = pq.read_table(path, filesystem=fs)
    name = column if column in table.column_names else "path"
    if name not in table.column_names:
        raise ConfigError(
            f"manifest_column: {uri} has no column {column!r} (columns: {table.column_names})"
        )
    base = uri.rsplit("/", 1)[0]
    entries = [
        str(u).strip() for u in table.column(name).to_pylist() if u is not None and str(u).strip()
    ]
    resolved = [u if st.is_remote(u) or os.path.isabs(u) else st.join(base, u) for u in entries]
    return sorted(set(resolved))


def plan_chunks(inputs: list[Any], chunk_size: int) -> list[list[Any]]:
    """The sorted inputs cut into consecutive chunks: the same list always gives the same plan."""
    return [inputs[i : i + chunk_size] for i in range(0, len(inputs), chunk_size)]


def mask_uri(output: str, root: str, uri: str) -> str:
    """Where a segment mask goes: the input's path under the input root, plus ``.png``."""
    if uri.startswith(root.rstrip("/") + "/"):
        rel = uri[len(root.rstrip("/")) + 1 :]
    else:  # manifest entries from anywhere: a stable, collision-free name
        rel = hashlib.sha1(uri.encode()).hexdigest()[:16] + "-" + os.path.basename(uri)
    return st.join(output, MASKS_DIR, rel.replace("#", "-row") + ".png")  # '#' reads as a fragment


def check_plan(
    cfg: LabelConfig, layout: str, units: list[str], entries: list[Entry], n_chunks: int
) -> None:
    """Write the plan on the first run; refuse to mix results of a different plan."""
    plan = {
        "inputs": len(entries),
        "inputs_sha256": _digest([e.path for e in entries]),
        "chunk_size": cfg.chunk_size,
        "chunks": n_chunks,
        "task": cfg.task,
        "checkpoint": cfg.checkpoint,
        "layout": layout,
    }
    if layout in CONTAINER_LAYOUTS:
        plan["containers_sha256"] = _digest(units)
    uri = st.join(cfg.output, PLAN_NAME)
    if st.exists(uri, cfg.storage):
        old = json.loads(st.read_text(uri, cfg.storage))
        old.setdefault("layout", layout)  # plans written before layouts existed
        diff = [k for k in plan if old.get(k) != plan[k]]
        if diff:
            raise ConfigError(
                f"output: {cfg.output} holds results of another run ({', '.join(diff)} differ); "
                "use a new --output, or rerun with the same input, task, checkpoint and chunk_size"
            )
        return
    if layout in CONTAINER_LAYOUTS:  # before the plan: a plan implies its inputs are saved
        table = pa.table({f: [getattr(e, f) for e in entries] for f in Entry._fields})
        fs, path = st.pyarrow_fs(st.join(cfg.output, INPUTS_NAME), cfg.storage)
        if not st.is_remote(cfg.output):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        pq.write_table(table, path, filesystem=fs)
    st.write_text(uri, json.dumps(plan, indent=1), cfg.storage)


def fetch(
    unit: dict[str, Any], storage: StorageConfig | None, image_column: str
) -> tuple[list[bytes | None], list[str]]:
    """The bytes of a read unit's images ("" error when fine); a tar or parquet file is opened
    once and only the unit's members are extracted."""
    from beit_ray.data.sources import read_parquet_rows, read_tar_members

    kind, container, members = unit["kind"], unit["container"], unit["members"]
    n = len(unit["paths"])
    blobs: list[bytes | None] = [None] * n
    errors = [""] * n
    if kind == "error":
        return blobs, list(members)
    if kind == "file":
        filesystems: dict[str, Any] = {}
        for i, uri in enumerate(unit["paths"]):
            scheme = uri.split("://", 1)[0] if st.is_remote(uri) else "file"
            try:
                if scheme not in filesystems:
                    filesystems[scheme] = st.filesystem(uri, storage)[0]
                blobs[i] = filesystems[scheme].cat_file(st.strip_scheme(uri))
            except Exception as e:  # missing, permission, network: the row says so
                errors[i] = f"read_failed: {type(e).__name__}: {e}"[:500]
        return blobs, errors
    got: dict[str, bytes | None] = {}
    failure = f"not found in {container}"
    try:
        if kind == "tar":
            for name, data in read_tar_members(container, members, storage):
                got[name] = data
        else:
            rows = read_parquet_rows(container, image_column, [int(m) for m in members], storage)
            got = {str(r): data for r, data in rows.items()}
    except Exception as e:  # a damaged tar keeps the members read before the damage
        failure = f"{type(e).__name__}: {e}"
    for i, m in enumerate(members):
        if m not in got:
            errors[i] = f"read_failed: {failure}"[:500]
        elif got[m] is None:
            errors[i] = "empty: null image"
        else:
            blobs[i] = got[m]
    return blobs, errors
