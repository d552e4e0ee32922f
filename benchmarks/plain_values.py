"""What ``set`` and ``get`` of plain values (dicts, lists, str, int, ... trees) cost RustCache,
against the pickle floor and LocMemCache, per value shape and size, all in one run.

RustCache stores plain values without pickle (``src/python/value/``): ``set`` walks the value into
the store's own form, ``get`` rebuilds a fresh copy. LocMemCache pickles on ``set`` and unpickles on
``get``, so ``pickle.dumps`` and ``pickle.loads`` of the same value (highest protocol) are the
floors a by-value cache is measured against. Columns:

- ``set``/``get``: RustCache ``set`` of the value to one key (overwriting, so the old copy is
  freed in the loop too) and ``get`` of it, microseconds per call;
- ``/dumps``, ``/loads``: those divided by ``pickle.dumps``/``pickle.loads`` of the same value
  (below 1.0: cheaper than the pickle floor);
- ``LocMem/``: LocMemCache's time divided by RustCache's (above 1.0: RustCache is faster).

Timing: the CPU time of the measuring thread (``time.thread_time_ns``), not the wall clock: on a
shared machine, time spent waiting for a core is not counted (caches shared with other processes
still are). Every runner is calibrated to last at least a target time, warmed up, then all
runners of a value are measured in turn, repeat after repeat (so drift hits them alike); the
figure is the minimum over the repeats. The garbage collector is off while timing.

Usage::

    python benchmarks/plain_values.py [--quick] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import gc
import pickle
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import django
from django.conf import settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _values import WORDS, json_dict  # noqa: E402  (benchmarks/_values.py)


def small_dicts(n: int) -> list[dict[str, Any]]:
    """A list of ``n`` flat rows (each a dict of scalars)."""
    return [{"id": i, "name": f"row {i}", "score": i * 0.5, "ok": i % 3 == 0} for i in range(n)]


def deep(levels: int) -> dict[str, Any]:
    """Dicts nested ``levels`` deep, each with a few scalars and a list beside the child."""
    v: dict[str, Any] = {"leaf": True}
    for i in range(levels):
        v = {"level": i, "name": f"node {i}", "items": [i, i + 1], "child": v}
    return v


def repeated_strings(n: int) -> list[dict[str, Any]]:
    """``n`` rows whose str values come from a few shared (not interned) strings."""
    states = [f"state-{s}-{'x' * 20}" for s in ("active", "pending", "closed", "archived")]
    owners = [f"owner {w}" for w in WORDS]
    return [
        {"state": states[i % len(states)], "owner": owners[i % len(owners)], "n": i}
        for i in range(n)
    ]


def values() -> dict[str, Any]:
    return {
        "small dict": {"id": 42, "name": "apple", "price": 1.2},
        "1 KB JSON": json_dict(1_000),
        "10 KB JSON": json_dict(10_000),
        "100 KB JSON": json_dict(100_000),
        "1 MB JSON": json_dict(1_000_000),
        "10,000 small dicts": small_dicts(10_000),
        "deep (30 levels)": deep(30),
        "repeated strs (5,000 rows)": repeated_strings(5_000),
    }


Runner = Callable[[int], int]


def loop(op: Callable[[], Any]) -> Runner:
    def run(n: int) -> int:
        start = time.thread_time_ns()
        for _ in range(n):
            op()
        return time.thread_time_ns() - start

    return run


def calibrate(run: Runner, target_ns: int) -> int:
    n = 1
    while True:
        elapsed = run(n)
        if elapsed >= target_ns or n >= 1 << 22:
            return n
        n = max(n * 2, int(n * target_ns / max(elapsed, 1) * 1.1))


def measure(runners: dict[str, Runner], repeats: int, target_ns: int) -> dict[str, float]:
    """Min ns per call of each runner, measured in turn, repeat after repeat."""
    counts = {name: calibrate(run, target_ns) for name, run in runners.items()}
    best = {name: float("inf") for name in runners}
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            for name, run in runners.items():
                best[name] = min(best[name], run(counts[name]) / counts[name])
    finally:
        gc.enable()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter repeats")
    parser.add_argument("--only", nargs="*", help="value names to run (default: all)")
    args = parser.parse_args()
    repeats, target_ns = (3, 10_000_000) if args.quick else (7, 40_000_000)

    settings.configure(SECRET_KEY="bench", USE_TZ=True, INSTALLED_APPS=[])
    django.setup()
    from django.core.cache.backends.locmem import LocMemCache

    from django_rustcache import RustCache

    options = {"MAX_ENTRIES": 1_000_000}
    rust = RustCache("plain-values-bench", {"TIMEOUT": None, "OPTIONS": options})
    locmem = LocMemCache("plain-values-bench", {"TIMEOUT": None, "OPTIONS": options})
    proto = pickle.HIGHEST_PROTOCOL
    print(
        f"Python {platform.python_version()}, Django {django.__version__}, "
        f"{platform.machine()}; min of {repeats} repeats of >= {target_ns / 1e6:.0f} ms each"
    )
    print()
    print("| value | pickle | set µs | set/dumps | LocMem/set | get µs | get/loads | LocMem/get |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, value in values().items():
        if args.only and name not in args.only:
            continue
        blob = pickle.dumps(value, proto)
        rust.set("k", value)
        locmem.set("k", value)
        assert rust.get("k") == value and locmem.get("k") == value, name
        t = measure(
            {
                "set": loop(lambda v=value: rust.set("k", v)),
                "dumps": loop(lambda v=value: pickle.dumps(v, proto)),
                "locmem set": loop(lambda v=value: locmem.set("k", v)),
                "get": loop(lambda: rust.get("k")),
                "loads": loop(lambda b=blob: pickle.loads(b)),
                "locmem get": loop(lambda: locmem.get("k")),
            },
            repeats,
            target_ns,
        )
        print(
            f"| {name} | {len(blob):,} B | {t['set'] / 1e3:,.2f} | {t['set'] / t['dumps']:.2f}x "
            f"| {t['locmem set'] / t['set']:.2f}x | {t['get'] / 1e3:,.2f} "
            f"| {t['get'] / t['loads']:.2f}x | {t['locmem get'] / t['get']:.2f}x |",
            flush=True,
        )
    print()
    print(f"command: {sys.executable} benchmarks/plain_values.py{' --quick' if args.quick else ''}")


if __name__ == "__main__":
    main()
