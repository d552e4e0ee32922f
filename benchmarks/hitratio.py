"""Hit-ratio simulator: the same key streams through RustCache ("lru" and "s3fifo"), Django's
LocMemCache and a plain one-at-a-time LRU, all holding at most the same number of entries.

Each request is a ``get``; a miss is followed by a ``set`` (a read-through cache). The streams are
seeded, so a run is repeatable. Prints a Markdown table of hit ratios (percent) and PASS/FAIL lines
for the acceptance bars of the S3-FIFO policy, and exits with status 1 on a FAIL.

    python benchmarks/hitratio.py                 # default sizes, ~1 min
    python benchmarks/hitratio.py --quick         # smaller streams, for a smoke test

The "LRU, one at a time" column is an ``OrderedDict`` that evicts exactly one least recently used
entry per insert: it shows what Django's cull rule (a third of the entries at once) costs on its
own, apart from the choice of victims.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import django
from django.conf import settings

if not settings.configured:
    settings.configure(CACHES={}, USE_TZ=True)
    django.setup()

from django.core.cache.backends.base import BaseCache  # noqa: E402
from django.core.cache.backends.locmem import LocMemCache  # noqa: E402

from django_rustcache import RustCache  # noqa: E402

SCANS = "Zipf 1.0 + full scans"


@dataclass(frozen=True)
class Stream:
    """A named, seeded key stream."""

    name: str
    keys: list[str]
    #: For each request, whether the crawler made it (empty: no crawler in this stream).
    crawler: list[bool] = field(default_factory=list)


def zipf_ranks(rng: random.Random, n_keys: int, alpha: float, length: int) -> list[int]:
    """``length`` key ranks in ``[0, n_keys)``, rank r drawn with weight 1/(r+1)^alpha."""
    cum = list(itertools.accumulate(1.0 / (r + 1) ** alpha for r in range(n_keys)))
    return rng.choices(range(n_keys), cum_weights=cum, k=length)


def make_streams(n_keys: int, capacity: int, length: int, seed: int, scans: int) -> list[Stream]:
    """Zipf 0.8, Zipf 1.0, Zipf 1.0 with periodic full scans, and a loop larger than the cache."""
    rng = random.Random(seed)
    # Shuffle which key gets which popularity so that hot keys are not neighbours by name.
    names = [f"key:{i}" for i in range(n_keys)]
    rng.shuffle(names)

    def zipf(alpha: float, n: int) -> list[str]:
        return [names[r] for r in zipf_ranks(rng, n_keys, alpha, n)]

    streams = [Stream("Zipf 0.8", zipf(0.8, length)), Stream("Zipf 1.0", zipf(1.0, length))]

    # A crawler: `scans` times, after an equal stretch of Zipf traffic, one request for every key
    # in turn.
    scan_every = max(length // max(scans, 1), 1)
    crawled: list[str] = []
    by_crawler: list[bool] = []
    base = zipf(1.0, length)
    for start in range(0, length, scan_every):
        users = base[start : start + scan_every]
        crawled.extend(users)
        crawled.extend(f"key:{i}" for i in range(n_keys))
        by_crawler.extend([False] * len(users) + [True] * n_keys)
    streams.append(Stream(SCANS, crawled, by_crawler))

    loop = [f"loop:{i}" for i in range(capacity * 3 // 2)]
    streams.append(Stream("loop of 1.5x capacity", (loop * (length // len(loop) + 1))[:length]))
    return streams


class OneAtATimeLRU:
    """A plain LRU reference: evicts exactly the least recently used entry when full."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.data: OrderedDict[str, object] = OrderedDict()

    def get(self, key: str, default: object = None) -> object:
        try:
            self.data.move_to_end(key)
        except KeyError:
            return default
        return self.data[key]

    def set(self, key: str, value: object) -> None:
        if key in self.data:
            self.data.move_to_end(key)
        elif len(self.data) >= self.capacity:
            self.data.popitem(last=False)
        self.data[key] = value


def run(cache: BaseCache | OneAtATimeLRU, keys: Iterable[str]) -> list[bool]:
    """Whether each request of a read-through pass of ``keys`` over ``cache`` was a hit."""
    missing = object()
    hits = []
    get, set_ = cache.get, cache.set
    for key in keys:
        if get(key, missing) is missing:
            set_(key, 1)
            hits.append(False)
        else:
            hits.append(True)
    return hits


def contenders(capacity: int, run_id: str) -> dict[str, Callable[[], BaseCache | OneAtATimeLRU]]:
    """Fresh caches of equal capacity, by column name."""

    def rust(policy: str) -> Callable[[], BaseCache]:
        def make() -> BaseCache:
            cache = RustCache(
                f"hitratio-{run_id}-{policy}-{time.monotonic_ns()}",
                {"TIMEOUT": None, "OPTIONS": {"MAX_ENTRIES": capacity, "EVICTION_POLICY": policy}},
            )
            cache.clear()
            return cache

        return make

    return {
        'RustCache "s3fifo"': rust("s3fifo"),
        'RustCache "lru"': rust("lru"),
        "LocMemCache": lambda: LocMemCache(
            f"hitratio-{run_id}", {"TIMEOUT": None, "OPTIONS": {"MAX_ENTRIES": capacity}}
        ),
        "LRU, one at a time": lambda: OneAtATimeLRU(capacity),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=8_000, help="distinct keys of the Zipf streams")
    parser.add_argument("--capacity", type=int, default=2_000, help="MAX_ENTRIES of every cache")
    parser.add_argument("--length", type=int, default=200_000, help="requests per Zipf stream")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--scans", type=int, default=20, help="full scans in the crawler stream (its share)"
    )
    parser.add_argument("--quick", action="store_true", help="a tenth of the default sizes")
    args = parser.parse_args(argv)
    if args.quick:
        args.keys, args.capacity, args.length = (
            n // 10 for n in (args.keys, args.capacity, args.length)
        )

    streams = make_streams(args.keys, args.capacity, args.length, args.seed, args.scans)
    makers = contenders(args.capacity, str(args.seed))
    results: dict[str, dict[str, float]] = {}
    user_only: dict[str, float] = {}
    for stream in streams:
        row = results[stream.name] = {}
        for name, make in makers.items():
            cache = make()
            hits = run(cache, stream.keys)
            row[name] = 100.0 * sum(hits) / len(hits)
            if stream.crawler:
                users = [h for h, crawler in zip(hits, stream.crawler, strict=True) if not crawler]
                user_only[name] = 100.0 * sum(users) / len(users)

    cols = list(makers)
    print(
        f"Capacity {args.capacity:,} entries; Zipf streams of {args.length:,} requests over "
        f"{args.keys:,} keys; {args.scans} full scans in the crawler stream; seed {args.seed}. "
        "Hit ratio, percent:\n"
    )
    print("| stream | requests | " + " | ".join(cols) + " |")
    print("|---|---:|" + "---:|" * len(cols))
    for stream in streams:
        row = results[stream.name]
        cells = " | ".join(f"{row[c]:.1f}" for c in cols)
        print(f"| {stream.name} | {len(stream.keys):,} | {cells} |")
        if stream.crawler:
            cells = " | ".join(f"{user_only[c]:.1f}" for c in cols)
            users = stream.crawler.count(False)
            print(f"| {stream.name}: user requests only | {users:,} | {cells} |")
    print()

    s3, lru = cols[0], cols[1]
    checks = [
        (
            "s3fifo beats lru by >= 10 points on Zipf 1.0 + full scans",
            results["Zipf 1.0 + full scans"][s3] - results["Zipf 1.0 + full scans"][lru] >= 10,
        ),
        *(
            (
                f"s3fifo loses <= 1 point to lru on {name}",
                results[name][s3] >= results[name][lru] - 1,
            )
            for name in ("Zipf 0.8", "Zipf 1.0")
        ),
    ]
    for text, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}: {text}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
