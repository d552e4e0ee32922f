"""``get`` hits under each eviction policy: nanoseconds per call, the best of 15 passes over 5,000
present keys (small dict values), at ``MAX_ENTRIES`` 10,000 (one shard) and 100,000 (16 shards).

    python benchmarks/bench_get_policies.py lru s3fifo tinylfu

Prints one JSON object (``"policy@max_entries": ns``). To compare two builds, run it alternately
in a venv of each and take each figure's minimum over the runs (the machine's noise only adds).
"""

from __future__ import annotations

import gc
import json
import sys
import time

import django
from django.conf import settings

if not settings.configured:
    settings.configure(CACHES={}, USE_TZ=True)
    django.setup()

from django_rustcache import RustCache  # noqa: E402


def best_get_ns(policy: str, max_entries: int, passes: int = 15) -> float:
    """The fastest pass's nanoseconds per ``get`` hit."""
    cache = RustCache(
        f"bench-get-{policy}-{max_entries}",
        {"TIMEOUT": None, "OPTIONS": {"MAX_ENTRIES": max_entries, "EVICTION_POLICY": policy}},
    )
    keys = [f"user:{i}:profile" for i in range(5_000)]
    for key in keys:
        cache.set(key, {"id": 1, "name": "x"})
    get = cache.get
    best = float("inf")
    gc.disable()
    try:
        for _ in range(passes):
            start = time.perf_counter_ns()
            for key in keys:
                get(key)
            best = min(best, (time.perf_counter_ns() - start) / len(keys))
    finally:
        gc.enable()
    cache.clear()
    return best


def main(policies: list[str]) -> None:
    out = {
        f"{p}@{n}": round(best_get_ns(p, n), 1)
        for p in policies or ["lru", "s3fifo", "tinylfu"]
        for n in (10_000, 100_000)
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
