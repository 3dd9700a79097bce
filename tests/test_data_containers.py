"""The one container reader (beit_ray/data/containers.py) on moto's S3 server: requests and bytes
per image for the training reader of class tars and WebDataset shards, throttling that outlives
botocore's own retries, and what counts as transient."""

from __future__ import annotations

import tarfile

import numpy as np
import pytest
from conftest import moto_requests, tar_bytes

from beit_ray import storage
from beit_ray.data import containers, sources

pytestmark = pytest.mark.integration


def _images(n: int, size: int = 6000, seed: int = 0) -> list[bytes]:
    """Distinct incompressible "images" (the reader does not decode): sized like small JPEGs."""
    rng = np.random.default_rng(seed)
    return [b"\xff\xd8" + rng.bytes(size + 37 * i) for i in range(n)]


@pytest.fixture()
def tars(s3_bucket):
    """A 100-image class tar and a 50-sample WebDataset shard on S3; returns their URIs and
    the expected rows."""
    imgs = _images(100)
    ctar = f"s3://{s3_bucket}/ctars/n07.tar"
    storage.write_bytes(ctar, tar_bytes([(f"n07_{i:03d}.JPEG", d) for i, d in enumerate(imgs)]))
    wds = f"s3://{s3_bucket}/wds/shard-000000.tar"
    members = []
    for i, d in enumerate(imgs[:50]):
        members += [(f"s{i:03d}.jpg", d), (f"s{i:03d}.cls", str(i % 7).encode())]
    storage.write_bytes(wds, tar_bytes(members))
    return {"ctar": ctar, "wds": wds, "imgs": imgs}


def test_training_reads_a_tar_in_a_couple_of_gets(tars):
    """986 GETs for a 100-image tar before (tarfile's 10 KB reads, unbuffered); now the tar is
    read ahead 8 MiB a GET: a request and ~1x the tar's bytes."""
    for uri, layout, n in ((tars["ctar"], "class_tars", 100), (tars["wds"], "webdataset", 50)):
        size = len(storage.read_bytes(uri))
        root = uri.rsplit("/", 1)[0]
        with moto_requests() as got:
            rows = list(sources.iter_tar(uri, root, layout, {"n07": 3}, None))
        assert len(rows) == n and not any(r["error"] for r in rows)
        assert [r["image"] for r in rows] == tars["imgs"][:n]
        assert got["GET .tar"] <= 2, got  # the tar in one read-ahead block (+ nothing else)
        assert size <= got["bytes .tar"] <= 1.05 * size, (got, size)
        per_image = got["GET .tar"] / n
        assert per_image <= 0.05
        if layout == "webdataset":
            assert [r["label"] for r in rows] == [i % 7 for i in range(n)]
        else:
            assert {r["label"] for r in rows} == {3} and rows[0]["key"] == "n07/n07_000.JPEG"


def test_a_tar_read_resumes_after_throttling_at_the_next_header(tars, monkeypatch):
    """The tar's 4th to 11th GETs are throttled (8 in a row: more than the 6 tries s3fs and
    botocore make of a request),
    after its first blocks were read: the reader backs off and resumes at the header after the
    last member it gave; each member comes once, in order."""
    uri = tars["ctar"]
    local = list(containers.members(uri, want=lambda _: True))
    monkeypatch.setattr(storage, "RETRY_BASE_S", 0.01)

    def throttle(method: str, path: str, n: int) -> bool:
        return method == "GET" and path.endswith(".tar") and 4 <= n <= 11

    with moto_requests(throttle) as got:  # 64 KiB blocks: several GETs for this tar
        again = list(containers.members(uri, want=lambda _: True, block=64 << 10))
    assert got["throttled"] == 8  # the transport gave up once: our retry carried it
    assert [(m.name, m.data) for m in again] == [(m.name, m.data) for m in local]


def test_throttled_files_are_read_not_errors(s3_bucket, monkeypatch):
    """Loose files, one GET each: a share of objects throttled past the transport's tries still
    arrive; a missing one is a permanent error for its row; a store that never recovers raises
    TransientError (no error row that a rerun would trust)."""
    monkeypatch.setattr(storage, "RETRY_BASE_S", 0.01)
    imgs = _images(12, size=500)
    uris = [f"s3://{s3_bucket}/img/{i:02d}.jpg" for i in range(12)]
    for u, d in zip(uris, imgs, strict=True):
        storage.write_bytes(u, d)

    def throttle(method: str, path: str, n: int) -> bool:  # 3 objects, 8 times each
        return method == "GET" and path.endswith(("00.jpg", "03.jpg", "06.jpg")) and n <= 8

    missing = f"s3://{s3_bucket}/img/missing.jpg"
    with moto_requests(throttle) as got:
        found = containers.read_files([*uris, missing])
    assert got["throttled"] == 24
    assert found[:12] == imgs
    assert isinstance(found[12], FileNotFoundError)

    monkeypatch.setattr(storage, "RETRY_ATTEMPTS", 1)  # give up after the transport's tries
    with moto_requests(lambda m, p, n: m == "GET"), pytest.raises(storage.TransientError):
        containers.read_files(uris[:1])
    with moto_requests(lambda m, p, n: m == "GET"), pytest.raises(storage.TransientError):
        list(sources.iter_tar(uris[0], f"s3://{s3_bucket}/img", "class_tars", {}, None))


def test_what_is_transient():
    from botocore.exceptions import ClientError

    slow = ClientError(
        {"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "GetObject"
    )
    assert storage.is_transient(slow)
    assert storage.is_transient(OSError("AWS Error SLOW_DOWN: Please reduce your request rate."))
    assert storage.is_transient(ConnectionResetError("reset by peer"))
    assert storage.is_transient(TimeoutError())
    denied = ClientError(
        {"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "Get"
    )
    assert not storage.is_transient(denied)
    assert not storage.is_transient(FileNotFoundError("s3://b/k"))
    assert not storage.is_transient(tarfile.ReadError("unexpected end of data"))
    assert not storage.is_transient(storage.TransientError("gave up"))  # retried to the end
