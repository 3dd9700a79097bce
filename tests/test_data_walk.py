"""Listing big prefixes: the first bounded look and S3 key ranges listed in parallel (moto)."""

from __future__ import annotations

import random
from pathlib import Path

import boto3
import pytest

from beit_ray.data import walk
from beit_ray.data.walk import KeyRange, first_look, split_range, walk_ranges


def test_split_range_cuts_are_sorted_and_strictly_inside() -> None:
    rnd = random.Random(0)
    chars = "ab0 9~\x01é/."
    checked = 0
    for _ in range(5000):
        lo = "".join(rnd.choice(chars) for _ in range(rnd.randint(0, 6)))
        hi = "".join(rnd.choice(chars) for _ in range(rnd.randint(0, 6)))
        if hi <= lo:
            continue
        alphabet = bytes(sorted({rnd.choice(b"abz09/. ~") for _ in range(5)}))
        cuts = split_range(
            lo, hi, rnd.randint(2, 40), None, alphabet if len(alphabet) > 1 else None
        )
        assert all(lo < c < hi for c in cuts) and cuts == sorted(set(cuts)), (lo, hi, cuts)
        checked += 1
    assert checked > 1000
    # an open range under a prefix spreads its cuts over the prefix's key space
    cuts = split_range("in/00001234.jpg", None, 32, "in/\x7f", b"./0123456789gjp")
    assert len(cuts) >= 20 and all(c.startswith("in/") for c in cuts)


def _put(client, bucket: str, keys: list[str]) -> None:
    for k in keys:
        client.put_object(Bucket=bucket, Key=k, Body=b"x" * (len(k) % 7))


def _collect(name: str, items: list[tuple[str, int]]) -> list[tuple[str, int]]:
    return items


def test_key_ranges_list_every_key_once_in_order(s3_server, s3_bucket, monkeypatch) -> None:
    """Small pages force many splits; the parts, read in name order, are the sorted listing,
    with keys on cut boundaries, non-ASCII keys and a folder marker."""
    client = boto3.client("s3", endpoint_url=s3_server)
    keys = [f"in/{i:06d}.jpg" for i in range(0, 600, 1)]
    keys += ["in/a b/é.jpg", "in/zz/\u4e2d.png", "in/~x", "in/0"]
    keys += ["out/not-mine.jpg", "inner.jpg"]  # other prefixes: never listed
    _put(client, s3_bucket, keys)
    client.put_object(Bucket=s3_bucket, Key="in/folder/", Body=b"")  # a console folder marker
    monkeypatch.setattr(walk, "PAGE_KEYS", 10)
    parts = walk_ranges(f"s3://{s3_bucket}/in", None, _collect, pages=2, threads=True)
    names = [n for n, _ in parts]
    got = [u for _, items in parts for u, _ in items]
    want = sorted(f"s3://{s3_bucket}/{k}" for k in keys if k.startswith("in/"))
    assert got == want  # every key once, in key order
    assert len(parts) > 10 and names == sorted(names) and len(set(names)) == len(names)
    sizes = dict(u for _, items in parts for u in items)
    assert sizes[f"s3://{s3_bucket}/in/000007.jpg"] == len("in/000007.jpg") % 7


def test_a_range_stops_at_its_upper_bound(s3_server, s3_bucket) -> None:
    client = boto3.client("s3", endpoint_url=s3_server)
    _put(client, s3_bucket, [f"p/{c}" for c in "abcdef"])
    items, rest = walk.list_range(f"s3://{s3_bucket}/p", KeyRange("x", "p/b", "p/d"), None)
    assert [u.rsplit("/", 1)[1] for u, _ in items] == ["c", "d"] and rest == []


def test_first_look_stops_at_a_flat_top_level(
    tmp_path: Path, s3_server, s3_bucket, monkeypatch
) -> None:
    for i in range(30):
        (tmp_path / f"{i:03d}.jpg").write_bytes(b"x")
    (tmp_path / "cls").mkdir()
    look = first_look(str(tmp_path), limit=10)
    assert not look.complete and len(look.files) == 10 and look.dirs == [str(tmp_path / "cls")]
    assert first_look(str(tmp_path), limit=100).complete
    client = boto3.client("s3", endpoint_url=s3_server)
    _put(
        client,
        s3_bucket,
        [f"r/c{i}/x.jpg" for i in range(5)] + [f"r/{i:04d}.jpg" for i in range(250)],
    )
    monkeypatch.setattr(walk, "PAGE_KEYS", 20)
    look = first_look(f"s3://{s3_bucket}/r", limit=100)
    assert not look.complete and 100 <= len(look.files) < 250
    full = first_look(f"s3://{s3_bucket}/r")
    assert full.complete and len(full.files) == 250
    assert full.dirs == [f"s3://{s3_bucket}/r/c{i}" for i in range(5)]


@pytest.mark.parametrize("output", ["s3", "local"])
def test_labelling_listing_of_s3_is_key_range_parts(
    s3_server, s3_bucket, monkeypatch, tmp_path: Path, output: str
) -> None:
    """Labelling lists an S3 input as key-range parts, into an S3 or a local output."""
    from beit_ray.infer.config import LabelConfig
    from beit_ray.infer.inputs import list_inputs

    client = boto3.client("s3", endpoint_url=s3_server)
    keys = [f"in/{i:05d}.jpg" for i in range(200)]
    _put(client, s3_bucket, keys + ["in/.DS_Store", "in/out/x.jpg", "in/_SUCCESS"])
    monkeypatch.setattr(walk, "PAGE_KEYS", 20)
    monkeypatch.setattr(walk, "PAGES_PER_TASK", 2)
    out = f"s3://{s3_bucket}/in/out" if output == "s3" else str(tmp_path / "out")
    units = list_inputs(LabelConfig(input=f"s3://{s3_bucket}/in", output=out, checkpoint="x"))
    # hidden files and the output's own files are not inputs (in/out is an input folder when
    # the output is elsewhere)
    want = keys + (["in/out/x.jpg"] if output == "local" else [])
    assert units.paths() == [f"s3://{s3_bucket}/{k}" for k in want]
    assert units.count == len(want) == units.kinds["image"] and len(units.parts) > 2


def test_training_listing_of_flat_tops(tmp_path: Path, s3_server, s3_bucket, monkeypatch) -> None:
    """A flat top level (more files than the first look holds) is listed by a streaming task
    (local) or key-range tasks (S3, folders included), into shuffled parts: every image once."""
    from beit_ray.data.config import DataConfig
    from beit_ray.data.listing import list_parts, read_part

    monkeypatch.setattr(walk, "FIRST_LOOK_FILES", 20)
    monkeypatch.setattr(walk, "PAGE_KEYS", 20)
    monkeypatch.setattr(walk, "PAGES_PER_TASK", 2)
    local = tmp_path / "flat"
    (local / "sub").mkdir(parents=True)
    names = [f"{i:04d}.jpg" for i in range(150)] + ["sub/x.png"]
    for n in names:
        (local / n).write_bytes(b"x")
    (local / "notes.txt").write_bytes(b"not an image")
    client = boto3.client("s3", endpoint_url=s3_server)
    _put(client, s3_bucket, [f"flat/{n}" for n in names] + ["flat/notes.txt"])
    for src in (str(local), f"s3://{s3_bucket}/flat"):
        cfg = DataConfig(source=src, seed=3)
        listing = list_parts(cfg, uri=str(tmp_path / f"l{len(src)}"), val_fraction=0.2)
        assert listing.layout == "folders" and listing.images() == len(names)
        keys = [k for u in listing.units for k in read_part(u)["key"]]
        assert sorted(keys) == sorted(names)
        assert 0 < listing.images("val") < len(names)
        if src.startswith("s3://"):
            assert len(listing.units) > 2  # one part a key range at least
            first = read_part(listing.units[0])["key"]
            assert first != sorted(first)  # shuffled in its range
