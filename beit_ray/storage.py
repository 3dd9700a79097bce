"""One place that turns a URI (local path, file://, s3://) into a filesystem.

Credentials and the endpoint come from a :class:`~beit_ray.config.StorageConfig` when given,
else from the standard AWS variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_REGION / AWS_DEFAULT_REGION). fsspec (s3fs) serves Python code;
:func:`pyarrow_fs` serves Ray Data and parquet. Secrets are never logged or printed.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any
from urllib.parse import urlparse

import fsspec

from beit_ray.errors import check

_ENV_KEYS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
)


@dataclass
class StorageConfig:
    """Object-store credentials and endpoint; empty fields fall back to the AWS_* environment."""

    endpoint_url: str | None = None
    """S3 endpoint (e.g. http://127.0.0.1:9000 for MinIO); default AWS_ENDPOINT_URL or AWS."""
    region: str | None = None
    """S3 region; default AWS_REGION / AWS_DEFAULT_REGION."""
    access_key_id: str | None = None
    """Access key; default AWS_ACCESS_KEY_ID. Prefer the environment for secrets."""
    secret_access_key: str | None = field(default=None, repr=False)
    """Secret key; default AWS_SECRET_ACCESS_KEY. Never printed."""
    anonymous: bool = False
    """Read public buckets without credentials."""
    shared_paths: list[str] = field(default_factory=list)
    """Local paths mounted at the same place on every node (NFS, EFS, a Kubernetes volume): on a
    multi-node cluster outputs may go under them; other local paths are refused there."""

    def __post_init__(self) -> None:
        if self.endpoint_url is not None:
            check(
                self.endpoint_url.startswith(("http://", "https://")),
                "storage.endpoint_url",
                f"must start with http:// or https://, got {self.endpoint_url!r}",
            )


def is_remote(uri: str) -> bool:
    """True for object-store URIs (s3://, gs://, ...), False for local paths and file://."""
    scheme = urlparse(str(uri)).scheme
    return scheme not in ("", "file") and len(scheme) > 1  # len>1: Windows drive letters


def strip_scheme(uri: str) -> str:
    """``s3://b/k`` → ``b/k``; ``file:///x`` → ``/x``; local paths made absolute."""
    uri = str(uri)
    if uri.startswith("file://"):
        return uri[len("file://") :]
    if is_remote(uri):
        return uri.split("://", 1)[1]
    return os.path.abspath(uri)


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI, keeping its scheme."""
    uri = str(uri)
    if is_remote(uri):
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://{posixpath.join(rest, *parts)}"
    return os.path.join(uri, *parts)


def _resolved(cfg: StorageConfig | None) -> dict[str, Any]:
    cfg = cfg or StorageConfig()
    env = os.environ
    return {
        "endpoint_url": cfg.endpoint_url
        or env.get("AWS_ENDPOINT_URL_S3")
        or env.get("AWS_ENDPOINT_URL"),
        "region": cfg.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
        "key": cfg.access_key_id or env.get("AWS_ACCESS_KEY_ID"),
        "secret": cfg.secret_access_key or env.get("AWS_SECRET_ACCESS_KEY"),
        "token": env.get("AWS_SESSION_TOKEN"),
        "anon": cfg.anonymous,
    }


def filesystem(uri: str, cfg: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """An fsspec filesystem for ``uri`` and the path inside it."""
    if not is_remote(uri):
        return fsspec.filesystem("file"), strip_scheme(uri)
    scheme = urlparse(uri).scheme
    if scheme in ("s3", "s3a"):
        r = _resolved(cfg)
        client_kwargs: dict[str, Any] = {}
        if r["endpoint_url"]:
            client_kwargs["endpoint_url"] = r["endpoint_url"]
        if r["region"]:
            client_kwargs["region_name"] = r["region"]
        fs = fsspec.filesystem(
            "s3",
            key=r["key"],
            secret=r["secret"],
            token=r["token"],
            anon=r["anon"],
            client_kwargs=client_kwargs,
            # the transport tries a request S3FS_TRIES × BOTO_TRIES times (SlowDown, 5xx,
            # resets); past that our retry() owns the policy (longer backoff, then a
            # TransientError): not 5 × 5 = 25 quick tries hidden below it
            config_kwargs={"retries": {"mode": "standard", "max_attempts": BOTO_TRIES}},
            # s3fs caches listings per instance; we list after writing, so keep it fresh.
            use_listings_cache=False,
            # one instance per process and credentials (fsspec's cache): a new one builds a
            # botocore client, ~0.1-0.6 s, which per slice of 64 images cost ~10 ms an image
        )
        fs.retries = S3FS_TRIES  # s3fs's own loop (a class attribute, not an argument)
        return fs, strip_scheme(uri)
    return fsspec.filesystem(scheme), strip_scheme(uri)


def pyarrow_fs(uri: str, cfg: StorageConfig | None = None) -> tuple[Any, str]:
    """A pyarrow filesystem (for Ray Data / parquet) and the path inside it."""
    import pyarrow.fs as pafs

    if not is_remote(uri):
        return pafs.LocalFileSystem(), strip_scheme(uri)
    r = _resolved(cfg)
    kwargs: dict[str, Any] = {}
    if r["endpoint_url"]:
        parsed = urlparse(r["endpoint_url"])
        kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        kwargs["scheme"] = parsed.scheme
    if r["region"]:
        kwargs["region"] = r["region"]
    if r["anon"]:
        kwargs["anonymous"] = True
    elif r["key"]:
        kwargs.update(access_key=r["key"], secret_key=r["secret"], session_token=r["token"])
    return pafs.S3FileSystem(**kwargs), strip_scheme(uri)


def worker_env(cfg: StorageConfig | None = None) -> dict[str, str]:
    """AWS_* variables for a Ray ``runtime_env`` so workers reach the same store as the driver."""
    r = _resolved(cfg)
    env = {k: os.environ[k] for k in _ENV_KEYS if os.environ.get(k)}
    if r["endpoint_url"]:
        env["AWS_ENDPOINT_URL"] = r["endpoint_url"]
    if r["region"]:
        env["AWS_REGION"] = env["AWS_DEFAULT_REGION"] = r["region"]
    if r["key"]:
        env["AWS_ACCESS_KEY_ID"] = r["key"]
    if r["secret"]:
        env["AWS_SECRET_ACCESS_KEY"] = r["secret"]
    return env


# --------------------------------------------------------------------------- small helpers


@contextmanager
def open_uri(uri: str, mode: str = "rb", cfg: StorageConfig | None = None) -> Iterator[IO[Any]]:
    """Open a file at a local path or URI; parent folders are made when writing locally."""
    fs, path = filesystem(uri, cfg)
    if "w" in mode and not is_remote(uri):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with fs.open(path, mode) as f:
        yield f


def read_bytes(uri: str, cfg: StorageConfig | None = None) -> bytes:
    fs, path = filesystem(uri, cfg)
    return retry(fs.cat_file, path, what=uri)


def write_bytes(uri: str, data: bytes, cfg: StorageConfig | None = None) -> None:
    def write() -> None:
        with open_uri(uri, "wb", cfg) as f:
            f.write(data)

    retry(write, what=uri)  # a whole object: a retry rewrites it


def read_text(uri: str, cfg: StorageConfig | None = None) -> str:
    return read_bytes(uri, cfg).decode("utf-8")


def write_text(uri: str, text: str, cfg: StorageConfig | None = None) -> None:
    write_bytes(uri, text.encode("utf-8"), cfg)


def exists(uri: str, cfg: StorageConfig | None = None) -> bool:
    fs, path = filesystem(uri, cfg)
    return retry(fs.exists, path, what=uri)


def makedirs(uri: str, cfg: StorageConfig | None = None) -> None:
    """Make a local folder; a no-op on object stores, which have no folders."""
    if not is_remote(uri):
        os.makedirs(strip_scheme(uri), exist_ok=True)


def list_files(
    uri: str, cfg: StorageConfig | None = None, suffixes: tuple[str, ...] = ()
) -> list[str]:
    """Every file under ``uri`` (recursively) as full URIs, sorted; filtered by suffix."""
    fs, path = filesystem(uri, cfg)
    found = fs.find(path)
    prefix = uri.split("://", 1)[0] + "://" if is_remote(uri) else ""
    out = [prefix + p for p in found if not suffixes or p.lower().endswith(suffixes)]
    return sorted(out)


def upload_dir(local_dir: str, uri: str, cfg: StorageConfig | None = None) -> None:
    """Copy a local folder's files to ``uri`` (local or remote)."""
    if not is_remote(uri):
        shutil.copytree(local_dir, strip_scheme(uri), dirs_exist_ok=True)
        return
    fs, path = filesystem(uri, cfg)
    for root, _, files in os.walk(local_dir):
        for name in files:
            src = os.path.join(root, name)
            rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
            fs.put_file(src, posixpath.join(path, rel))


def download_dir(uri: str, cfg: StorageConfig | None = None, dest: str | None = None) -> str:
    """A local folder holding the files under ``uri``: the folder itself when local."""
    if not is_remote(uri):
        return strip_scheme(uri)
    fs, path = filesystem(uri, cfg)
    dest = dest or tempfile.mkdtemp(prefix="beit_ray_")
    for src in fs.find(path):
        rel = posixpath.relpath(src, path)
        target = os.path.join(dest, *rel.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fs.get_file(src, target)
    return dest


# --------------------------------------------------------------------------- transient failures

S3FS_TRIES, BOTO_TRIES = 2, 3
"""Tries of one S3 request inside s3fs (its own loop) and botocore (standard mode): 6 in all."""
RETRY_ATTEMPTS = int(os.environ.get("BEIT_RETRY_ATTEMPTS", "8"))
"""Tries of one read before it is given up as transient (after s3fs's and botocore's own)."""
RETRY_BASE_S, RETRY_CAP_S = 0.25, 20.0
"""Backoff: ``base × 2^(try - 1)`` seconds, at most ``cap``, with full jitter (AWS's advice):
8 tries wait up to ~50 s in all, longer than a throttled prefix takes to scale up."""
_TRANSIENT_MARKERS = (  # matched in lower case with "_" read as " " (pyarrow: SLOW_DOWN)
    "slowdown",
    "slow down",
    "reduce your request rate",
    "throttl",
    "serviceunavailable",
    "service unavailable",
    "internalerror",
    "internal error",
    "internal failure",
    "requesttimeout",
    "request timeout",
    "timed out",
    "timeout",
    "network connection",
    "connection reset",
    "connection aborted",
    "connection refused",
    "broken pipe",
    "incompleteread",
    "incomplete read",
    "responsestreamingerror",
    "server disconnected",
    " 500",
    " 502",
    " 503",
    " 504",
    "(500)",
    "(502)",
    "(503)",
    "(504)",
)
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class TransientError(OSError):
    """A read that kept failing for a transient cause (throttling, 5xx, timeouts) after every
    retry: not the input's fault, so it is never recorded as a bad input; a rerun reads it."""


TASK_RETRIES: dict[str, Any] = {"max_retries": 3, "retry_exceptions": [TransientError]}
"""Ray task options of the read stages: a task whose read outlived its own retries runs again
from its start (at most 3 times) before the job fails, rather than recording a bad input."""


def is_transient(e: BaseException) -> bool:
    """Throttling, a 5xx answer, a timeout or a dropped connection: worth trying again. A
    missing object, a permission error or bad data is not."""
    if isinstance(e, TransientError):
        return False  # already retried to the end
    if isinstance(e, _PERMANENT):
        return False
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    code = ""
    response = getattr(e, "response", None)  # botocore's ClientError
    if isinstance(response, dict):
        err = response.get("Error", {})
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = f"{err.get('Code', '')} {status}"
        if isinstance(status, int) and status >= 500:
            return True
    text = f"{type(e).__name__} {code} {e}".lower().replace("_", " ")
    if any(m in text for m in _TRANSIENT_MARKERS):
        return True
    cause = e.__cause__ or e.__context__  # a library's own error around a throttled request
    return cause is not None and cause is not e and is_transient(cause)


def backoff(attempt: int, error: BaseException, what: str = "") -> None:
    """Sleep before try ``attempt + 1``; raise TransientError once ``RETRY_ATTEMPTS`` are spent."""
    import random
    import time

    if attempt >= RETRY_ATTEMPTS:
        raise TransientError(
            f"{what}: still failing after {attempt} tries: {type(error).__name__}: {error}"
        ) from error
    rng = random.Random()  # jitter only: spreads the retries of many tasks apart
    time.sleep(rng.uniform(0, min(RETRY_CAP_S, RETRY_BASE_S * 2 ** (attempt - 1))))


def retry(fn: Any, *args: Any, what: str = "", **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, tried again with backoff while it fails transiently."""
    attempt = 0
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if not is_transient(e):
                raise
            attempt += 1
            backoff(attempt, e, what)


async def retry_async(fn: Any, *args: Any, what: str = "", **kwargs: Any) -> Any:
    """:func:`retry` for a coroutine function (the wait does not block the event loop)."""
    import asyncio
    import random

    attempt = 0
    while True:
        try:
            return await fn(*args, **kwargs)
        except Exception as e:
            if not is_transient(e):
                raise
            attempt += 1
            if attempt >= RETRY_ATTEMPTS:
                backoff(attempt, e, what)  # raises TransientError
            cap = min(RETRY_CAP_S, RETRY_BASE_S * 2 ** (attempt - 1))
            await asyncio.sleep(random.Random().uniform(0, cap))
