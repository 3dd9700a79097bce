"""bench/scale.py's request counter: what it calls a LIST, a GET of an object, a plan read."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
import scale  # noqa: E402


def _app(environ, start_response):  # noqa: ANN001, ANN202 - a WSGI app answering 10 bytes
    start_response("200 OK", [])
    return [b"0123456789"]


def _call(counter: scale.Counting, method: str, path: str, query: str = "") -> None:
    env = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query}
    counter(env, lambda *a: None)


def test_counting_by_kind_and_bucket():
    c = scale.Counting(_app)
    _call(c, "GET", "/src/a/b.jpg")
    _call(c, "GET", "/src/a/b.tar", "")
    _call(c, "GET", "/src", "list-type=2&prefix=a%2F&max-keys=1000")
    _call(c, "GET", "/src/", "")  # ListObjects v1 without parameters
    _call(c, "GET", "/src", "location")  # not a listing
    _call(c, "HEAD", "/work/out/_INPUTS.parquet")
    _call(c, "PUT", "/work/out/part-00000.parquet")
    snap = c.snapshot()
    assert snap["by_requests"] == {
        "GET src": 2, "LIST src": 2, "BUCKET src": 1, "HEAD work:_INPUTS": 1, "PUT work": 1,
    }  # fmt: skip
    assert snap["by_bytes"]["GET src"] == 20
    assert snap["tars"] == {"requests": 1, "bytes": 10}
    assert snap["requests"] == {"GET": 5, "HEAD": 1, "PUT": 1}
