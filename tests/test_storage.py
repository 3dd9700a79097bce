"""The storage layer against moto's real S3 server on loopback, and on local disk."""

import pyarrow.parquet as pq
import pytest

from beit_ray import storage
from beit_ray.config import StorageConfig


@pytest.mark.parametrize("remote", [False, True])
def test_read_write_list_upload_download(tmp_path, remote, request):
    if remote:
        bucket = request.getfixturevalue("s3_bucket")
        root = f"s3://{bucket}/data"
    else:
        root = str(tmp_path / "data")
    storage.write_text(storage.join(root, "a", "x.txt"), "hello")
    storage.write_bytes(storage.join(root, "b.bin"), b"\x00\x01")
    assert storage.read_text(storage.join(root, "a", "x.txt")) == "hello"
    assert storage.exists(storage.join(root, "b.bin"))
    assert not storage.exists(storage.join(root, "missing"))
    files = storage.list_files(root)
    assert [f.rsplit("/", 1)[1] for f in files] == ["x.txt", "b.bin"]
    assert all(f.startswith("s3://") == remote for f in files)
    assert storage.list_files(root, suffixes=(".bin",)) == [storage.join(root, "b.bin")]

    local = tmp_path / "up"
    (local / "sub").mkdir(parents=True)
    (local / "sub" / "w.txt").write_text("w")
    storage.upload_dir(str(local), storage.join(root, "up"))
    back = storage.download_dir(storage.join(root, "up"))
    with open(f"{back}/sub/w.txt") as f:
        assert f.read() == "w"


def test_pyarrow_filesystem_reads_parquet_from_s3(s3_bucket, tmp_path):
    import pyarrow as pa

    table = pa.table({"x": [1, 2, 3]})
    pq.write_table(table, tmp_path / "t.parquet")
    storage.upload_dir(str(tmp_path), f"s3://{s3_bucket}/tables")
    fs, path = storage.pyarrow_fs(f"s3://{s3_bucket}/tables/t.parquet")
    assert path == f"{s3_bucket}/tables/t.parquet"
    assert pq.read_table(path, filesystem=fs).column("x").to_pylist() == [1, 2, 3]


def test_explicit_config_beats_environment_and_worker_env(s3_server, monkeypatch):
    cfg = StorageConfig(
        endpoint_url="http://127.0.0.9:1",
        region="eu-west-1",
        access_key_id="k",
        secret_access_key="s3cr3t-value",
    )
    env = storage.worker_env(cfg)
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.9:1"
    assert env["AWS_REGION"] == "eu-west-1" and env["AWS_ACCESS_KEY_ID"] == "k"
    assert "s3cr3t-value" not in repr(cfg)
    fs, _ = storage.pyarrow_fs("s3://b/k", cfg)
    assert fs.region == "eu-west-1"
    # Without a config the environment (set by the s3_server fixture) is used.
    assert storage.worker_env()["AWS_ENDPOINT_URL"] == s3_server


def test_uri_helpers(tmp_path):
    assert (
        storage.is_remote("s3://b/k")
        and not storage.is_remote("/x")
        and not storage.is_remote("file:///x")
    )
    assert storage.strip_scheme("file:///x/y") == "/x/y"
    assert storage.join("s3://b", "k", "v") == "s3://b/k/v"
