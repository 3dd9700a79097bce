"""How the key-range listing of an S3 prefix (beit_ray/data/walk.py) scales, against one stream.

    .venv/bin/python bench/listing_ranges.py --sizes 100000,1000000,5000000

A simulation of S3's ``list_objects_v2`` paging over in-memory sorted keys (moto scans its
whole bucket for every page, so it cannot show this at millions of keys), driving the real
cut and sizing functions of ``walk.py`` (``split_range``, ``_alphabet``, ``_estimate_rest``)
as ``list_range`` does. Three key shapes: numbered (``in/000001234.jpg``), hex-random
(``in/<32 hex>.jpg``) and class folders of 1,300 (``in/n00000012/00015999.JPEG``).

Reported per N and shape: range tasks, rounds of splitting, total requests, and the longest
chain of sequential requests (the wall time at a fixed request latency when tasks run in
parallel), against one stream (N / 1,000 requests, all sequential).
"""

from __future__ import annotations

import argparse
import bisect
import os
import random
import sys
from collections import deque

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from beit_ray.data import walk  # noqa: E402

PREFIX = "in/"


def simulate(keys: list[str], pages: int, page_keys: int) -> dict[str, int]:
    """Run the range tasks over ``keys`` (sorted) breadth-first, as the driver dispatches them."""
    queue = deque([(walk.KeyRange(""), 0, 0)])
    tasks = rounds = requests = chain = listed = 0
    while queue:
        r, depth, before = queue.popleft()
        tasks, rounds = tasks + 1, max(rounds, depth)
        i = bisect.bisect_right(keys, r.lo) if r.lo else 0
        items, last, done, made = [], r.lo, False, 0
        for _ in range(pages):
            page = keys[i : i + page_keys]
            i, made = i + page_keys, made + 1
            for k in page:
                if r.hi is not None and k > r.hi:
                    done = True
                    break
                items.append(k)
                last = k
            if done or i >= len(keys):
                done = True
                break
        requests, chain, listed = requests + made, max(chain, before + made), listed + len(items)
        if done:
            continue
        alphabet = walk._alphabet(items[-page_keys:], len(PREFIX))
        fanout = walk.FANOUT
        if r.hi is not None:
            rest = walk._estimate_rest(r.lo, last, r.hi, len(items), alphabet)
            fanout = max(1, min(walk.FANOUT, -(-rest // (pages * page_keys))))
        cuts = walk.split_range(last, r.hi, fanout, PREFIX + "\x7f", alphabet)
        bounds = [last, *cuts, r.hi]
        for j in range(len(bounds) - 1):
            queue.append(
                (walk.KeyRange(f"{r.name}.{j}", bounds[j], bounds[j + 1]), depth + 1, before + made)
            )
    assert listed == len(keys), (listed, len(keys))  # every key once
    return {"tasks": tasks, "rounds": rounds, "requests": requests, "chain": chain}


def shapes(n: int, rng: random.Random) -> dict[str, list[str]]:
    return {
        "numbered": [f"{PREFIX}{i:09d}.jpg" for i in range(n)],
        "hex": sorted(f"{PREFIX}{rng.getrandbits(128):032x}.jpg" for _ in range(n)),
        "class folders": [f"{PREFIX}n{i // 1300:08d}/{i:08d}.JPEG" for i in range(n)],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="100000,1000000")
    args = p.parse_args()
    rng = random.Random(0)
    print(
        "| keys | shape | range tasks | rounds | requests (x one stream) | longest chain (one stream) |"
    )
    print("|---|---|---|---|---|---|")
    for n in (int(s) for s in args.sizes.split(",")):
        one = -(-n // walk.PAGE_KEYS)
        for shape, keys in shapes(n, rng).items():
            r = simulate(keys, walk.PAGES_PER_TASK, walk.PAGE_KEYS)
            print(f"| {n:,} | {shape} | {r['tasks']} | {r['rounds']} | "
                  f"{r['requests']} ({r['requests'] / one:.2f}x) | {r['chain']} ({one}) |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
