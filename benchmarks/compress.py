"""NearCache's ``COMPRESS`` against django-redis's compressors: bytes in Redis, get miss, set.

    python benchmarks/compress.py [--quick] [--write-results]

Needs Django, django-rustcache, redis-py and a ``redis-server`` on PATH (the script starts its own
on a free loopback port with ``tests/servers.py`` and stops it by PID). django-redis columns
appear when it is installed: uncompressed, ``ZlibCompressor`` (level 6), ``ZStdCompressor``
(needs ``pip install pyzstd``) and ``Lz4Compressor`` (needs ``pip install lz4``).

Two payloads, the same for every column: a 20 KB HTML page (a str) and a 100 KB JSON-like dict
(a page of an API listing: ids, names, prices, tags, descriptions), both generated from a fixed
seed. For each: the bytes Redis holds for one value (``STRLEN``: NearCache's include its 37-byte
signature, django-redis's nothing), a ``get`` that misses L1 (NearCache's L1 is dropped before
each timed loop; every read is one round trip plus decompressing and unpickling), and a ``set``
(pickling, compressing, the round trip). Columns are timed interleaved, best of the repeats per
operation, as ``benchmarks/near.py`` does.
"""

from __future__ import annotations

import argparse
import os
import pickle
import platform
import random
import sys
import time
import timeit
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

import servers  # noqa: E402  (tests/servers.py: our own redis-server, stopped by PID)
from _sections import replace_section  # noqa: E402
from _values import WORDS, json_dict  # noqa: E402

RESULTS = REPO / "benchmarks" / "RESULTS.md"
SECTION_BEGIN, SECTION_END = "<!-- compress_bench:begin -->", "<!-- compress_bench:end -->"
README = REPO / "README.md"
README_BEGIN, README_END = "<!-- compress_readme:begin -->", "<!-- compress_readme:end -->"
TIMEOUT = 3600
POOL = 100  # keys per column and payload


def html_page(size: int = 20_000, seed: int = 1) -> str:
    """A product listing page of about ``size`` characters: repeated markup, varied text."""
    rnd = random.Random(seed)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Products</title>"
        "<link rel='stylesheet' href='/static/site.css'></head><body><main class='catalogue'>"
    ]
    length = len(parts[0])
    i = 0
    while length < size - 200:
        i += 1
        name = " ".join(rnd.choice(WORDS) for _ in range(3)).title()
        desc = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(8, 20)))
        part = (
            f"<article class='product' id='p{rnd.randint(1000, 99999)}'><h2><a href='/p/{i}/'>"
            f"{name}</a></h2><p class='desc'>{desc}.</p><span class='price'>"
            f"{rnd.randint(1, 500)}.{rnd.randint(0, 99):02d} EUR</span><form method='post' "
            f"action='/cart/add/{i}/'><input type='hidden' name='csrfmiddlewaretoken' "
            f"value='{rnd.getrandbits(128):032x}'><button>Add to cart</button></form></article>\n"
        )
        parts.append(part)
        length += len(part)
    parts.append("</main></body></html>")
    return "".join(parts)


def caches_for(url: str) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """({alias: CACHES entry}, {alias: column title}); each alias has its own KEY_PREFIX."""
    caches: dict[str, dict[str, Any]] = {}
    titles: dict[str, str] = {}

    def add(alias: str, title: str, backend: str, options: dict[str, Any]) -> None:
        caches[alias] = {
            "BACKEND": backend,
            "LOCATION": url,
            "KEY_PREFIX": alias,
            "TIMEOUT": TIMEOUT,
            "OPTIONS": options,
        }
        titles[alias] = title

    near = "django_rustcache.NearCache"
    add("near", "NearCache", near, {"MAX_ENTRIES": 10_000})
    add("near_zstd", "NearCache zstd", near, {"MAX_ENTRIES": 10_000, "COMPRESS": "zstd"})
    add("near_lz4", "NearCache lz4", near, {"MAX_ENTRIES": 10_000, "COMPRESS": "lz4"})
    try:
        import django_redis  # noqa: F401
    except ImportError:
        return caches, titles
    dr = "django_redis.cache.RedisCache"
    add("dr", "django-redis", dr, {})
    compressors = {"zlib": "zlib", "zstd": "pyzstd", "lz4": "lz4"}
    for name, module in compressors.items():
        try:
            __import__(module)
        except ImportError:
            print(f"note: no django-redis {name} column (pip install {module})")
            continue
        cls = {"zlib": "ZlibCompressor", "zstd": "ZStdCompressor", "lz4": "Lz4Compressor"}[name]
        add(
            f"dr_{name}",
            f"django-redis {name}",
            dr,
            {"COMPRESSOR": f"django_redis.compressors.{name}.{cls}"},
        )
    return caches, titles


def interleaved(loops: dict[str, tuple[str, dict[str, Any], int, str]], repeats: int) -> dict:
    """{column: best ns per op}: each repeat runs every column's loop once, in an order rotated
    by one per repeat, so that all columns see the same machine state (see benchmarks/near.py)."""
    timers = {c: timeit.Timer(s, setup=su, globals=ns) for c, (s, ns, _, su) in loops.items()}
    cols = list(loops)
    best = dict.fromkeys(cols, float("inf"))
    for r in range(repeats):
        shift = r % len(cols)
        for c in cols[shift:] + cols[:shift]:
            best[c] = min(best[c], timers[c].timeit(number=1) * 1e9 / loops[c][2])
    return best


def measure(payloads: dict[str, Any], repeats: int, per_loop: int) -> dict[str, dict[str, Any]]:
    """{payload: {"bytes": {alias: n}, "miss": {alias: ns}, "set": {alias: ns}, "pickle": n}}."""
    import redis
    from django.core.cache import caches

    aliases = list(caches.settings)
    backends = {a: caches[a] for a in aliases}
    raw = redis.Redis.from_url(backends["near"]._options.location)
    out: dict[str, dict[str, Any]] = {}
    for n, (name, value) in enumerate(payloads.items()):
        keys = [f"p{n}:{i}" for i in range(POOL)]
        for cache in backends.values():
            cache.set_many(dict.fromkeys(keys, value), TIMEOUT)
            assert cache.get(keys[0]) == value
        sizes = {}
        for alias, cache in backends.items():
            made = cache.make_key(keys[0])
            sizes[alias] = raw.strlen(made)
        offset = [0]

        def next_keys(keys: list[str] = keys, offset: list[int] = offset) -> list[str]:
            start = offset[0]
            offset[0] = (start + per_loop) % (POOL - per_loop + 1)
            return keys[start : start + per_loop]

        loops = {}
        for alias, cache in backends.items():
            h = getattr(cache, "_h", None)
            ns = {
                "get": cache.get,
                "next_keys": next_keys,
                "clear_l1": h.clear if h is not None else (lambda: None),
            }
            loops[alias] = ("for k in ks: get(k)", ns, per_loop, "clear_l1(); ks = next_keys()")
        miss = interleaved(loops, repeats)
        for alias, cache in backends.items():
            if hasattr(cache, "_counters"):
                assert cache.stats()["misses"] == 0, f"{alias}: a miss loop found no value"
                assert cache.stats()["bad_frames"] == 0
        loops = {}
        for alias, cache in backends.items():
            ns = {"set": cache.set, "ks": keys[:per_loop], "v": value}
            loops[alias] = ("for k in ks: set(k, v)", ns, per_loop, "pass")
        sets = interleaved(loops, repeats)
        # Context: what NearCache's L1 fill of this value costs (part of its miss and set).
        h = backends["near"]._h
        blob = pickle.dumps(value, pickle.HIGHEST_PROTOCOL)

        def fill(h: Any = h, value: Any = value, blob: bytes = blob) -> None:
            h.fill("fill-probe").put("fill-probe", value, TIMEOUT, pickled=blob)

        fill_ns = min(timeit.repeat(fill, number=per_loop, repeat=repeats)) * 1e9 / per_loop
        loads_ns = (
            min(timeit.repeat(lambda b=blob: pickle.loads(b), number=per_loop, repeat=repeats))
            * 1e9
            / per_loop
        )
        out[name] = {
            "fill": fill_ns,
            "loads": loads_ns,
            "bytes": sizes,
            "miss": miss,
            "set": sets,
            "pickle": len(pickle.dumps(value, pickle.HIGHEST_PROTOCOL)),
        }
        raw.flushdb()
    raw.close()
    return out


def fmt_us(ns: float) -> str:
    return f"{ns / 1000:,.1f} µs"


def report(res, titles, args, repeats, load, wall, versions) -> list[str]:
    cmd = "python benchmarks/compress.py" + (" --quick" if args.quick else "")
    out = [
        SECTION_BEGIN,
        "## Compression (`benchmarks/compress.py`)",
        "",
        "Command (starts and stops its own redis-server on a free loopback port):",
        "",
        f"    {cmd}",
        "",
        f"Wall time {wall:.0f} s; load average at start {', '.join(f'{x:.2f}' for x in load)} "
        f"(2 cores shared with other jobs: the times are noisy, compare columns of one row). "
        f"Best of {repeats} interleaved repeats per operation. {versions}.",
        "",
        "Bytes: what Redis holds for one value (`STRLEN`); NearCache's include its signature "
        "(37 bytes: NearCache signs by default, django-redis does not sign). `get` miss: "
        "NearCache's L1 dropped before each timed loop, so every read is a round trip, then "
        "decompressing and unpickling; django-redis has no L1. `set`: pickle, compress, round "
        "trip. NearCache compresses in Rust (zstd level 3, libzstd; lz4: lz4_flex); django-redis "
        "through Python packages (zlib level 6; pyzstd at its default level 3; lz4), its zstd "
        "and lz4 columns need `pip install pyzstd lz4` in the benchmark's venv.",
        "",
    ]
    for name, r in res.items():
        pickled = r["pickle"]
        out += [
            f"**{name}** (pickle: {pickled:,} bytes)",
            "",
            "| column | bytes in Redis | of the pickle | `get` miss | `set` |",
            "|---|---|---|---|---|",
        ]
        for alias, title in titles.items():
            n = r["bytes"][alias]
            out.append(
                f"| {title} | {n:,} | {n / pickled:.0%} | {fmt_us(r['miss'][alias])} | "
                f"{fmt_us(r['set'][alias])} |"
            )
        out += [
            "",
            f"Context: `pickle.loads` of it takes {fmt_us(r['loads'])}; NearCache's L1 fill "
            f"(`Fill.put`, part of NearCache's miss and `set`) {fmt_us(r['fill'])}.",
            "",
        ]
    out.append(SECTION_END)
    return out


def readme_table(res, titles) -> list[str]:
    """The README's short table: bytes and ``get`` miss per column and payload."""
    names = list(res)
    head = " | ".join(f"{n}: bytes | `get` miss" for n in names)
    out = [
        README_BEGIN,
        f"| column | {head} |",
        "|---|" + "---|---|" * len(names),
    ]
    for alias, title in titles.items():
        cells = " | ".join(
            f"{res[n]['bytes'][alias]:,} | {fmt_us(res[n]['miss'][alias])}" for n in names
        )
        out.append(f"| {title} | {cells} |")
    out.append(README_END)
    return out


def write_results(
    section: str,
    path: Path = RESULTS,
    begin: str = SECTION_BEGIN,
    end: str = SECTION_END,
) -> None:
    """Replace (or append) the section between ``begin`` and ``end`` in ``path``, nothing
    else."""
    replace_section(path, section, begin, end)


def versions() -> str:
    import django
    import redis

    parts = [f"Python {platform.python_version()}", f"Django {django.get_version()}"]
    parts.append(f"redis-py {redis.__version__}")
    for mod, label in (("django_redis", "django-redis"), ("pyzstd", "pyzstd"), ("lz4", "lz4")):
        try:
            m = __import__(mod)
            v = getattr(m, "__version__", None) or ".".join(map(str, getattr(m, "VERSION", ())))
            parts.append(f"{label} {v}")
        except ImportError:
            pass
    return ", ".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (~15 s)")
    ap.add_argument(
        "--write-results",
        action="store_true",
        help="put the tables into benchmarks/RESULTS.md (between the compress_bench markers) "
        "and the short one into README.md (between the compress_readme markers)",
    )
    args = ap.parse_args()
    repeats = 5 if args.quick else 15
    per_loop = 10 if args.quick else 25
    started = time.monotonic()
    load = os.getloadavg()
    server = servers.start("redis")
    try:
        import django
        from django.conf import settings

        caches, titles = caches_for(server.url)
        settings.configure(
            CACHES=caches, SECRET_KEY="compress-bench-" + "x" * 40, USE_TZ=True, INSTALLED_APPS=[]
        )
        django.setup()
        payloads = {"20 KB HTML page": html_page(), "100 KB JSON-like dict": json_dict()}
        res = measure(payloads, repeats, per_loop)
    finally:
        server.cleanup()
    lines = report(res, titles, args, repeats, load, time.monotonic() - started, versions())
    text = "\n".join(lines) + "\n"
    print(text)
    table = "\n".join(readme_table(res, titles)) + "\n"
    print(table)
    if args.write_results:
        write_results(text)
        if README_BEGIN in README.read_text():
            write_results(table, README, README_BEGIN, README_END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
