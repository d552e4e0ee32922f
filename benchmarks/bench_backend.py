"""Benchmark RustCache against Django's LocMemCache, side by side in one process.

Both backends run the same work on the same keys and values; the script prints a Markdown table of
nanoseconds per operation and the ratio LocMemCache / RustCache (higher is better for RustCache),
then one PASS/FAIL line per performance bar.

Timing: ``time.perf_counter_ns`` around a plain ``for`` loop over pre-built keys (the loop's own
cost, ~10-20 ns per iteration, is included for both backends and not subtracted). Each measurement
is calibrated to run for at least a target time, warmed up once, then repeated; the reported
figure is the **minimum** over the repeats (the least disturbed run, as ``timeit`` recommends).
The two backends are measured alternately, repeat by repeat, so drift affects both alike. The
garbage collector is disabled while timing. Async ``aget`` runs in one event loop for the whole
script (LocMemCache's ``aget`` goes through ``sync_to_async``).

Usage::

    python benchmarks/bench_backend.py [--quick] [--markdown PATH] [--check]

``RUSTCACHE_BENCH_BACKEND`` names the backend under test (default ``django_rustcache.RustCache``);
set it to ``django.core.cache.backends.locmem.LocMemCache`` to check the script itself.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import django
from django.conf import settings

BACKEND = os.environ.get("RUSTCACHE_BENCH_BACKEND", "django_rustcache.RustCache")
LOCMEM = "django.core.cache.backends.locmem.LocMemCache"
BATCH = 100

VALUES: dict[str, Any] = {
    "small dict": {"id": 42, "name": "apple", "price": 1.2},
    "20 KB str": ("lorem ipsum dolor sit amet " * 800)[: 20 * 1024],
    "short str": "hello world",
}

# (label, operation, value name) -> the ratio must be at least this.
BARS: list[tuple[str, str, str, float]] = [
    ("get small dict", "get (hit)", "small dict", 4.0),
    ("get short string", "get (hit)", "short str", 10.0),
    ("set small dict", "set", "small dict", 4.0),
    ("aget small dict", "aget (hit)", "small dict", 100.0),
]


@dataclass(frozen=True)
class Config:
    """How hard to measure."""

    keys: int  # distinct keys per pass for sync operations
    async_keys: int  # distinct keys per pass for aget (LocMemCache's is ~100 µs per call)
    repeats: int
    target_ns: int  # a measured repeat runs at least this long


FULL = Config(keys=1000, async_keys=200, repeats=7, target_ns=50_000_000)
QUICK = Config(keys=200, async_keys=50, repeats=3, target_ns=5_000_000)

# A runner performs `passes` passes over its work and returns the elapsed nanoseconds.
Runner = Callable[[int], int]


@dataclass
class Row:
    """One line of the table."""

    operation: str
    value: str
    locmem_ns: float
    rust_ns: float

    @property
    def ratio(self) -> float:
        return self.locmem_ns / self.rust_ns if self.rust_ns else float("inf")


def configure() -> None:
    """Configure Django with the two caches (same options for both)."""
    options = {"MAX_ENTRIES": 10_000_000, "CULL_FREQUENCY": 3}
    settings.configure(
        SECRET_KEY="bench",
        USE_TZ=True,
        INSTALLED_APPS=[],
        CACHES={
            "default": {"BACKEND": LOCMEM, "LOCATION": "bench-default"},
            "locmem": {"BACKEND": LOCMEM, "LOCATION": "bench-locmem", "OPTIONS": options},
            "rust": {"BACKEND": BACKEND, "LOCATION": "bench-rust", "OPTIONS": options},
        },
    )
    django.setup()


# ---- runners ---------------------------------------------------------------------------------


def run_get(cache: Any, keys: list[str]) -> Runner:
    get = cache.get

    def run(passes: int) -> int:
        start = time.perf_counter_ns()
        for _ in range(passes):
            for key in keys:
                get(key)
        return time.perf_counter_ns() - start

    return run


def run_set(cache: Any, keys: list[str], value: Any) -> Runner:
    set_ = cache.set

    def run(passes: int) -> int:
        start = time.perf_counter_ns()
        for _ in range(passes):
            for key in keys:
                set_(key, value)
        return time.perf_counter_ns() - start

    return run


def run_incr(cache: Any, keys: list[str]) -> Runner:
    incr = cache.incr

    def run(passes: int) -> int:
        start = time.perf_counter_ns()
        for _ in range(passes):
            for key in keys:
                incr(key)
        return time.perf_counter_ns() - start

    return run


def run_get_many(cache: Any, batches: list[list[str]]) -> Runner:
    get_many = cache.get_many

    def run(passes: int) -> int:
        start = time.perf_counter_ns()
        for _ in range(passes):
            for batch in batches:
                get_many(batch)
        return time.perf_counter_ns() - start

    return run


def run_set_many(cache: Any, batches: list[dict[str, Any]]) -> Runner:
    set_many = cache.set_many

    def run(passes: int) -> int:
        start = time.perf_counter_ns()
        for _ in range(passes):
            for batch in batches:
                set_many(batch)
        return time.perf_counter_ns() - start

    return run


def run_aget(cache: Any, keys: list[str], loop: asyncio.AbstractEventLoop) -> Runner:
    aget = cache.aget

    async def body(passes: int) -> int:
        start = time.perf_counter_ns()
        for _ in range(passes):
            for key in keys:
                await aget(key)
        return time.perf_counter_ns() - start

    def run(passes: int) -> int:
        coro: Coroutine[Any, Any, int] = body(passes)
        return loop.run_until_complete(coro)

    return run


# ---- measuring -------------------------------------------------------------------------------


def calibrate(run: Runner, target_ns: int) -> int:
    """The number of passes that makes one repeat last at least ``target_ns``."""
    passes = 1
    while True:
        elapsed = run(passes)
        if elapsed >= target_ns or passes >= 1 << 20:
            return passes
        passes = max(passes * 2, int(passes * target_ns / max(elapsed, 1) * 1.1))


def measure_pair(runners: tuple[Runner, Runner], ops_per_pass: int, config: Config) -> list[float]:
    """Min ns per op for each runner, measuring them alternately."""
    passes = [calibrate(run, config.target_ns) for run in runners]
    samples: list[list[float]] = [[], []]
    gc.collect()
    gc.disable()
    try:
        for index, run in enumerate(runners):  # warm-up
            run(passes[index])
        for _ in range(config.repeats):
            for index, run in enumerate(runners):
                samples[index].append(run(passes[index]) / (passes[index] * ops_per_pass))
    finally:
        gc.enable()
    return [min(s) for s in samples]


def run_benchmarks(config: Config) -> list[Row]:
    from django.core.cache import caches

    locmem, rust = caches["locmem"], caches["rust"]
    pair = (locmem, rust)
    keys = [f"bench:key:{i}" for i in range(config.keys)]
    miss_keys = [f"bench:missing:{i}" for i in range(config.keys)]
    batches = [keys[i : i + BATCH] for i in range(0, len(keys), BATCH)]
    async_keys = keys[: config.async_keys]
    loop = asyncio.new_event_loop()
    rows: list[Row] = []

    def add(operation: str, value: str, results: list[float], per_key: int = 0) -> None:
        rows.append(Row(operation, value, results[0], results[1]))
        if per_key:
            per = [r / per_key for r in results]
            rows.append(Row(f"{operation}, per key", value, per[0], per[1]))

    try:
        for value_name, value in VALUES.items():
            for cache in pair:
                cache.clear()
                for key in keys:
                    cache.set(key, value)
                assert cache.get(keys[0]) == value, f"{cache!r} lost the value"
                got = cache.get_many(batches[0])
                assert len(got) == len(batches[0]), f"{cache!r}: get_many missed keys"

            results = measure_pair(tuple(run_get(c, keys) for c in pair), len(keys), config)
            add("get (hit)", value_name, results)

            results = measure_pair(
                tuple(run_get_many(c, batches) for c in pair), len(batches), config
            )
            add(f"get_many ({BATCH} keys)", value_name, results, per_key=BATCH)

            results = measure_pair(
                tuple(run_aget(c, async_keys, loop) for c in pair), len(async_keys), config
            )
            add("aget (hit)", value_name, results)

            results = measure_pair(tuple(run_set(c, keys, value) for c in pair), len(keys), config)
            add("set", value_name, results)

            data = [{key: value for key in batch} for batch in batches]
            results = measure_pair(tuple(run_set_many(c, data) for c in pair), len(batches), config)
            add(f"set_many ({BATCH} keys)", value_name, results, per_key=BATCH)

        results = measure_pair(tuple(run_get(c, miss_keys) for c in pair), len(keys), config)
        add("get (miss)", "-", results)

        counters = [f"bench:counter:{i}" for i in range(config.keys)]
        for cache in pair:
            for key in counters:
                cache.set(key, 0)
        results = measure_pair(tuple(run_incr(c, counters) for c in pair), len(keys), config)
        add("incr", "int", results)
    finally:
        loop.close()
        for cache in pair:
            cache.clear()
    order = [
        "get (hit)",
        "get (miss)",
        "set",
        f"get_many ({BATCH} keys)",
        f"set_many ({BATCH} keys)",
    ]
    order += ["incr", "aget (hit)"]
    rows.sort(key=lambda row: order.index(row.operation.removesuffix(", per key")))  # stable
    return rows


# ---- output ----------------------------------------------------------------------------------


def backend_label() -> str:
    name = BACKEND.rsplit(".", 1)[-1]
    return f"{name} (under test)" if BACKEND == LOCMEM else name


def format_ns(ns: float) -> str:
    return f"{ns:,.0f}" if ns >= 100 else f"{ns:.1f}"


def markdown_table(rows: list[Row]) -> str:
    lines = [
        f"| operation | value | LocMemCache ns/op | {backend_label()} ns/op | LocMem / Rust |",
        "|---|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.operation} | {row.value} | {format_ns(row.locmem_ns)} | "
            f"{format_ns(row.rust_ns)} | {row.ratio:.1f}x |"
        )
    return "\n".join(lines)


def header(config: Config) -> str:
    return (
        f"Python {platform.python_version()}, Django {django.get_version()}, "
        f"{platform.machine()} x{os.cpu_count()}, backend {BACKEND}. "
        f"Min of {config.repeats} repeats (each >= {config.target_ns / 1e6:.0f} ms) after a "
        f"warm-up; {config.keys} keys per pass ({config.async_keys} for aget); "
        "the loop's own cost is included."
    )


def bar_lines(rows: list[Row]) -> tuple[list[str], bool]:
    lines: list[str] = []
    ok = True
    for label, operation, value, minimum in BARS:
        row = next(r for r in rows if r.operation == operation and r.value == value)
        passed = row.ratio >= minimum
        ok &= passed
        verdict = "PASS" if passed else "FAIL"
        lines.append(f"{verdict}: {label} is {row.ratio:.1f}x LocMemCache (bar >= {minimum:g}x)")
    return lines, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer keys, repeats, shorter runs")
    parser.add_argument("--markdown", metavar="PATH", help="also write the table to PATH")
    parser.add_argument("--check", action="store_true", help="exit 1 if a bar fails")
    args = parser.parse_args(argv)
    config = QUICK if args.quick else FULL

    configure()
    rows = run_benchmarks(config)
    table = markdown_table(rows)
    bars, ok = bar_lines(rows)
    print(header(config))
    print()
    print(table)
    print()
    print("\n".join(bars))
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as handle:
            handle.write(f"{header(config)}\n\n{table}\n\n")
            handle.write("\n".join(f"- {line}" for line in bars) + "\n")
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
