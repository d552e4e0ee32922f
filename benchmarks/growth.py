"""Insert latency while a cache grows: times each of N `set`s of a small dict into one RustCache
with no entry limit in reach, and prints the mean, the slowest inserts and how many took over
0.2 ms. Shows whether any insert pays for a step that grows with the number of entries (such as
rehashing a whole shard's index when it fills). One key is set and deleted before timing, so the
first insert's one-time costs are not counted; `--no-gc` turns Python's cyclic garbage collector
off, whose full collections (~10 ms here) are not the store's.

    python benchmarks/growth.py [--entries 5000000] [--no-gc]
"""

from __future__ import annotations

import argparse
import gc
import time

import django
from django.conf import settings


def main() -> None:
    """Fill one cache with `--entries` keys and report the insert latencies."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=5_000_000)
    parser.add_argument("--backend", default="django_rustcache.RustCache")
    parser.add_argument("--no-gc", action="store_true", help="disable the cyclic GC while timing")
    args = parser.parse_args()
    settings.configure(
        CACHES={
            "default": {
                "BACKEND": args.backend,
                "LOCATION": "growth",
                "OPTIONS": {"MAX_ENTRIES": 10**8},
            }
        }
    )
    django.setup()
    from django.core.cache import cache

    value = {"id": 42, "name": "apple", "price": 1.2}
    cache.set("warm-up", value)
    cache.delete("warm-up")
    if args.no_gc:
        gc.disable()
    clock = time.perf_counter_ns
    slow: list[tuple[int, int]] = []
    n = args.entries
    start = clock()
    for i in range(n):
        t = clock()
        cache.set(f"k{i}", value)
        d = clock() - t
        if d > 200_000:
            slow.append((d, i))
    print(f"mean ns per set: {(clock() - start) / n:.0f}")
    slow.sort(reverse=True)
    print("slowest (ms, at entry):", [(round(d / 1e6, 2), i) for d, i in slow[:10]])
    print("inserts over 0.2 ms:", len(slow))


if __name__ == "__main__":
    main()
