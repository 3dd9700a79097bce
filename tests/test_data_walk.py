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
    parts = walk_ranges(f"s3://{s3_bucket}/in", None, _collect, pages=2)
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


@pytest.mark.parametrize("layout_kind", ["image"])
def test_labelling_listing_of_s3_is_key_range_parts(
    s3_server, s3_bucket, monkeypatch, layout_kind
) -> None:
    from beit_ray.infer.config import LabelConfig
    from beit_ray.infer.inputs import list_inputs

    client = boto3.client("s3", endpoint_url=s3_server)
    keys = [f"in/{i:05d}.jpg" for i in range(200)] + ["in/.DS_Store", "in/out/x.jpg", "in/_SUCCESS"]
    _put(client, s3_bucket, keys)
    monkeypatch.setattr(walk, "PAGE_KEYS", 20)
    monkeypatch.setattr(walk, "PAGES_PER_TASK", 2)
    cfg = LabelConfig(
        input=f"s3://{s3_bucket}/in", output=f"s3://{s3_bucket}/in/out", checkpoint="x"
    )
    units = list_inputs(cfg)
    paths = units.paths()
    assert paths == [
        f"s3://{s3_bucket}/in/{i:05d}.jpg" for i in range(200)
    ]  # hidden, own output: out
    assert units.count == 200 and units.kinds["image"] == 200 and len(units.parts) > 2
