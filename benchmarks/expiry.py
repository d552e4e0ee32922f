"""The cost of expiry on hits and writes: RustCache against LocMemCache in the same run.

Three stores of each backend hold ``--entries`` live keys (timeout 3600) each. In "fresh" nothing
expires (RustCache's sweep is idle: no deadline has passed). In "expired" as many other keys
(timeout 1, interleaved) have expired before timing starts and were never read. In "churn" as many
other keys expire one after the other throughout the run (timeouts of 2 to 61 s): RustCache's
sweep works on every write (4 header reads, more where expired entries are dense). Prints
nanoseconds per ``get`` (hits), ``set`` (overwriting live keys) and ``set`` of new keys, and the
ratio LocMemCache / RustCache (higher is better for RustCache). The minimum over ``--repeats``.

Usage::

    python benchmarks/expiry.py [--entries 100000] [--ops 50000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import gc
import random
import time
from collections.abc import Callable
from typing import Any

import django
from django.conf import settings

LOCMEM = "django.core.cache.backends.locmem.LocMemCache"
RUST = "django_rustcache.RustCache"
SCENARIOS = ("fresh", "expired", "churn")


def make_caches(entries: int) -> dict[str, Any]:
    """Configure Django with one cache per (backend, scenario) and return them by alias."""
    caches = {}
    for backend in ("rust", "locmem"):
        for scenario in SCENARIOS:
            caches[f"{backend}-{scenario}"] = {
                "BACKEND": RUST if backend == "rust" else LOCMEM,
                "LOCATION": f"expiry-bench-{backend}-{scenario}",
                "TIMEOUT": 3600,
                "OPTIONS": {"MAX_ENTRIES": 8 * entries},
            }
    settings.configure(CACHES=caches, INSTALLED_APPS=[])
    django.setup()
    from django.core.cache import caches as handler

    return {alias: handler[alias] for alias in caches}


def fill(caches: dict[str, Any], entries: int) -> None:
    """Store the live keys everywhere and, but in "fresh", short-lived keys between them."""
    value = b"v" * 100
    for alias, cache in caches.items():
        for i in range(entries):
            cache.set(f"live:{i}", value)
            if alias.endswith("expired"):
                cache.set(f"short:{i}", value, timeout=1)
            elif alias.endswith("churn"):
                cache.set(f"short:{i}", value, timeout=2 + i % 60)
    time.sleep(2.5)


def timed(fn: Callable[[], None], ops: int) -> float:
    """Nanoseconds per operation of one call of ``fn`` (which runs ``ops`` operations)."""
    gc.disable()
    start = time.perf_counter_ns()
    fn()
    took = time.perf_counter_ns() - start
    gc.enable()
    return took / ops


def main() -> None:
    """Run the scenarios and print a Markdown table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--entries", type=int, default=100_000)
    p.add_argument("--ops", type=int, default=50_000)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    caches = make_caches(args.entries)
    fill(caches, args.entries)
    rng = random.Random(7)
    keys = [f"live:{rng.randrange(args.entries)}" for _ in range(args.ops)]
    value = b"w" * 100
    results: dict[tuple[str, str, str], float] = {}
    for rep in range(args.repeats):
        for scenario in SCENARIOS:
            for backend in ("rust", "locmem"):
                cache = caches[f"{backend}-{scenario}"]

                def gets(get: Callable[..., Any] = cache.get) -> None:
                    for k in keys:
                        get(k)

                def sets(set_: Callable[..., Any] = cache.set) -> None:
                    for k in keys:
                        set_(k, value)

                def inserts(set_: Callable[..., Any] = cache.set, rep: int = rep) -> None:
                    for i in range(args.ops):
                        set_(f"new:{rep}:{i}", value)

                for op, fn in (("get hit", gets), ("set", sets), ("set new", inserts)):
                    ns = timed(fn, args.ops)
                    key = (scenario, op, backend)
                    results[key] = min(results.get(key, ns), ns)
    print(f"entries {args.entries:,}, ops {args.ops:,}, min of {args.repeats}\n")
    print("| store | op | RustCache ns | LocMemCache ns | LocMem / Rust |")
    print("|---|---|---:|---:|---:|")
    for scenario in SCENARIOS:
        for op in ("get hit", "set", "set new"):
            rust, loc = results[(scenario, op, "rust")], results[(scenario, op, "locmem")]
            print(f"| {scenario} | {op} | {rust:.0f} | {loc:.0f} | {loc / rust:.2f}x |")
    for scenario in SCENARIOS:
        stats = caches[f"rust-{scenario}"].stats()
        print(
            f"\nRustCache {scenario} store after the run: {stats['entries']:,} entries, "
            f"{stats['expirations']:,} expirations"
        )


if __name__ == "__main__":
    main()
