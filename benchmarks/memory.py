# ruff: noqa: UP031
"""Memory of RustCache against LocMemCache, and MAX_BYTES under churn.

Two measurements, each in a fresh Python process so that one cannot inherit the other's heap:

* **Resident memory**: 1 million entries of a 100-byte value (``bytes``, ``str`` and a small
  dict) under ``user:N:profile`` keys, stored with a timeout, in RustCache and in LocMemCache.
  Reported: growth of the process's resident set per entry, the ratio, and how far
  ``RustCache.stats()["bytes"]`` is from the real growth. Targets (issue 12 item 3): RustCache
  takes at most 0.45x LocMemCache's memory for the bytes and str values and at most 1.0x for the
  small dict, and ``stats()["bytes"]`` is within 10% of the real growth.
* **MAX_BYTES churn**: a million operations (70% ``set``, 20% ``get``, 10% ``delete``) on 20,000
  keys with values from 1 byte to 1 MB (log-uniform sizes), under ``MAX_BYTES`` = 64 MB.
  ``stats()["bytes"]`` is read after every ``set`` and must never pass the bound; the peak growth of
  the resident set is reported next to the bound.

Usage (any venv with Django and django-rustcache installed)::

    python benchmarks/memory.py [--entries N] [--churn-ops N] [--out FILE]

The peer benchmark (``benchmarks/peers/bench.py --memory``) runs the same functions and puts the
tables into ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

RUST = "django_rustcache.RustCache"
LOCMEM = "django.core.cache.backends.locmem.LocMemCache"
MAX_BYTES = 64 * 1024 * 1024
VALUE_KINDS = ("bytes", "str", "small dict")
KEYFMT = "user:%d:profile"
# Issue 12 item 3: RustCache's resident memory per entry over LocMemCache's, at most.
MEMORY_BARS = {"bytes": 0.45, "str": 0.45, "small dict": 1.0}


def rss() -> int:
    """Resident set size of this process, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def setup(backend: str, options: dict[str, Any]) -> Any:
    """Configure Django with one cache and return it."""
    import django
    from django.conf import settings

    settings.configure(
        CACHES={
            "default": {
                "BACKEND": backend,
                "LOCATION": "memory-bench",
                "TIMEOUT": 3600,
                "OPTIONS": options,
            }
        },
        INSTALLED_APPS=[],
    )
    django.setup()
    from django.core.cache import cache

    return cache


def value_maker(kind: str) -> Callable[[int], Any]:
    """Distinct 100-byte values (as stored by a by-value cache: each entry owns its own)."""
    if kind == "bytes":
        return lambda i: b"%010d" % i * 10
    if kind == "str":
        return lambda i: "%010d" % i * 10
    return lambda i: {"id": i, "name": "apple-%06d" % i, "price": 1.25, "tags": "fruit,red"}


def child_resident(
    backend: str, kind: str, entries: int, policy: str | None = None
) -> dict[str, Any]:
    """Store ``entries`` values and report the growth of the resident set (under the store's
    default eviction policy, ``"tinylfu"`` at this size, unless ``policy`` names one)."""
    options: dict[str, Any] = {"MAX_ENTRIES": entries * 2}
    if policy:
        options["EVICTION_POLICY"] = policy
    cache = setup(backend, options)
    make = value_maker(kind)
    cache.set("warm-up", make(0))
    cache.delete("warm-up")
    gc.collect()
    before = rss()
    for i in range(entries):
        cache.set(KEYFMT % i, make(i))
    gc.collect()
    grown = rss() - before
    stats = cache.stats() if hasattr(cache, "stats") else None
    assert cache.get(KEYFMT % (entries - 1)) == make(entries - 1)
    return {"rss": grown, "stats_bytes": stats["bytes"] if stats else None}


def child_churn(ops: int, seed: int) -> dict[str, Any]:
    """MAX_BYTES churn: mixed sizes 1 B to 1 MB; the bound is checked after every set."""
    cache = setup(RUST, {"MAX_ENTRIES": 10**9, "MAX_BYTES": MAX_BYTES})
    rng = random.Random(seed)
    buf = os.urandom(1 << 20)
    keys = ["churn:%d" % i for i in range(20_000)]
    gc.collect()
    before = rss()
    peak_rss = 0
    peak_bytes = 0
    over = 0
    sets = gets = hits = 0
    log_max = math.log(1 << 20)
    for n in range(ops):
        key = keys[rng.randrange(len(keys))]
        r = rng.random()
        if r < 0.7:
            size = int(math.exp(rng.random() * log_max))
            start = rng.randrange(len(buf) - size + 1)
            cache.set(key, buf[start : start + size])
            sets += 1
            used = cache.stats()["bytes"]
            peak_bytes = max(peak_bytes, used)
            over += used > MAX_BYTES
        elif r < 0.9:
            gets += 1
            hits += cache.get(key) is not None
        else:
            cache.delete(key)
        if n % 10_000 == 0:
            peak_rss = max(peak_rss, rss() - before)
    gc.collect()
    peak_rss = max(peak_rss, rss() - before)
    stats = cache.stats()
    return {
        "ops": ops,
        "sets": sets,
        "over": over,
        "peak_bytes": peak_bytes,
        "peak_rss": peak_rss,
        "hit_ratio": hits / gets if gets else 0.0,
        "evictions": stats["evictions"],
        "entries": stats["entries"],
    }


def run_child(*args: str) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter and return its JSON result."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_section(
    entries: int, churn_ops: int, log: Callable[[str], None]
) -> tuple[str, list[str]]:
    """The Markdown tables and the PASS/FAIL lines."""
    lines = [
        "## Memory",
        "",
        f"{entries:,} entries of a 100-byte value under `{KEYFMT % 123}`-style keys (timeout "
        "3600 s), each backend in a fresh process; RustCache under its default policy at this size "
        '(`"tinylfu"`, whose frequency sketch is charged too) unless a row names one. '
        "`RSS/entry` is the growth of the resident set divided by the entries; `stats/RSS` "
        "compares RustCache's own accounting (`stats()['bytes']`) with that growth.",
        "",
        "| value | RustCache RSS/entry | LocMemCache RSS/entry | Rust/LocMem | stats bytes/entry "
        "| stats/RSS |",
        "|---|---|---|---|---|---|",
    ]
    targets: list[str] = []
    locmem: dict[str, float] = {}
    for kind, policy in [*((k, "") for k in VALUE_KINDS), ("bytes", "lru")]:
        label = f'{kind}, `"{policy}"`' if policy else kind
        log(f"[memory] {entries:,} x {label}")
        rust = run_child("resident", RUST, kind, str(entries), *([policy] if policy else []))
        if kind not in locmem:
            locmem[kind] = run_child("resident", LOCMEM, kind, str(entries))["rss"] / entries
        r, m, s = rust["rss"] / entries, locmem[kind], rust["stats_bytes"] / entries
        cells = f"{r:.0f} B | {m:.0f} B | {r / m:.3f}x | {s:.0f} B | {s / r:.2f}"
        lines.append(f"| {label} | {cells} |")
        bar = MEMORY_BARS[kind]
        word = "PASS" if r <= bar * m else "FAIL"
        targets.append(
            f"{word}  memory, {entries:,} x 100-byte {label}: RustCache {r:.0f} B/entry = "
            f"{r / m:.3f}x LocMemCache ({m:.0f} B); target <= {bar}x"
        )
        word = "PASS" if abs(s / r - 1) <= 0.10 else "FAIL"
        targets.append(
            f"{word}  stats()['bytes'] vs resident growth, {kind}: {s / r:.2f}; target within 10%"
        )
    log(f"[memory] MAX_BYTES churn, {churn_ops:,} operations")
    c = run_child("churn", str(churn_ops), "1")
    mb = 1024 * 1024
    lines += [
        "",
        "### MAX_BYTES under churn",
        "",
        f"{c['ops']:,} operations (70% set, 20% get, 10% delete) on 20,000 keys, values of 1 B to "
        f"1 MB (log-uniform), `MAX_BYTES` = {MAX_BYTES // mb} MB; `stats()['bytes']` read after "
        "every set.",
        "",
        "| sets | sets over the bound | peak stats bytes | peak RSS growth | evictions | "
        "entries at end | get hit ratio |",
        "|---|---|---|---|---|---|---|",
        f"| {c['sets']:,} | {c['over']} | {c['peak_bytes'] / mb:.1f} MB | "
        f"{c['peak_rss'] / mb:.1f} MB | {c['evictions']:,} | {c['entries']:,} | "
        f"{c['hit_ratio']:.2f} |",
    ]
    word = "PASS" if c["over"] == 0 and c["peak_bytes"] <= MAX_BYTES else "FAIL"
    targets.append(
        f"{word}  MAX_BYTES churn: {c['over']} of {c['sets']:,} sets left the store over "
        f"{MAX_BYTES // mb} MB (peak {c['peak_bytes'] / mb:.1f} MB by its accounting, "
        f"{c['peak_rss'] / mb:.1f} MB resident growth)"
    )
    return "\n".join(lines) + "\n", targets


def main(argv: list[str] | None = None) -> int:
    """Command line: run both measurements and print the report."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--entries", type=int, default=1_000_000)
    p.add_argument("--churn-ops", type=int, default=1_000_000)
    p.add_argument("--out", type=Path, help="also write the report to this file")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        what, *rest = args.child
        if what == "resident":
            result = child_resident(rest[0], rest[1], int(rest[2]), *rest[3:4])
        else:
            result = child_churn(int(rest[0]), int(rest[1]))
        print(json.dumps(result))
        return 0
    section, targets = memory_section(
        args.entries, args.churn_ops, lambda m: print(m, file=sys.stderr)
    )
    report = section + "\n" + "\n".join(targets) + "\n"
    if args.out:
        args.out.write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
