"""Byte accounting: `stats()["bytes"]` charges what an entry really takes in memory (checked
against the growth of the resident set in a fresh process), and values are charged their real
object sizes."""

from __future__ import annotations

import itertools
import json
import pickle
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from django_rustcache import RustCache

_names = itertools.count()

# Stores `n` values of one kind in a fresh interpreter; prints the RSS growth and stats bytes.
_CHILD = textwrap.dedent(
    """
    import gc, json, os, sys
    import django
    from django.conf import settings
    settings.configure(CACHES={"default": {"BACKEND": "django_rustcache.RustCache",
                                           "LOCATION": "rss", "TIMEOUT": %(timeout)s,
                                           "OPTIONS": {"MAX_ENTRIES": 10**9}}})
    django.setup()
    from django.core.cache import cache

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    make = %(make)s
    cache.set("warm-up", make(0)); cache.delete("warm-up")
    gc.collect()
    before, used = rss(), cache.stats()["bytes"]
    for i in range(%(n)d):
        cache.set("key:%%d" %% i, make(i))
    gc.collect()
    print(json.dumps({"rss": rss() - before, "bytes": cache.stats()["bytes"] - used}))
    """
)

MAKERS = {
    "bytes": 'lambda i: b"%010d" % i * 10',
    "str": 'lambda i: "%010d" % i * 10',
    "non-ASCII str": 'lambda i: "é%09d" % i * 10',
    "small dict": 'lambda i: {"id": i, "name": "apple-%06d" % i, "price": 1.25}',
    # A plain-class instance (argparse.Namespace qualifies), copied structurally.
    "instance": 'lambda i: __import__("argparse").Namespace(id=i, name="a-%06d" % i, price=1.5)',
    "pickled": "lambda i: {i, i + 1}",
}


@pytest.mark.parametrize("timeout", ["3600", "None"])
@pytest.mark.parametrize("kind", list(MAKERS))
def test_stats_bytes_follow_resident_memory(kind: str, timeout: str) -> None:
    """150,000 entries: the store's own count is within 15% of what the process grew by (20% for
    values that are pickled or copied: the temporaries of pickling and copying leave partly used
    pymalloc pools behind, which the process keeps and the store cannot own; measured 0.84-0.93)."""
    src = _CHILD % {"make": MAKERS[kind], "n": 150_000, "timeout": timeout}
    out = subprocess.run([sys.executable, "-c", src], check=True, capture_output=True, text=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = got["bytes"] / got["rss"]
    slack = 0.20 if kind in ("pickled", "small dict", "instance") else 0.15
    assert 1 - slack <= ratio <= 1 + slack, (
        f"{kind}: stats {got['bytes']} vs RSS growth {got['rss']}"
    )


def make(name: str | None = None, **options: Any) -> RustCache:
    """A RustCache on a LOCATION of its own, emptied."""
    cache = RustCache(name or f"test-memory-{next(_names)}", {"TIMEOUT": None, "OPTIONS": options})
    cache.clear()
    return cache


def charge(cache: RustCache, value: Any) -> int:
    """Bytes charged for `value` under a fixed key (the store emptied first)."""
    cache.clear()
    cache.set("k", value)
    return int(cache.stats()["bytes"])


def block(size: int) -> int:
    """The block for an object of `size` bytes: pymalloc's 16-byte steps up to 512, then malloc."""
    return -(-size // 16) * 16 if size <= 512 else chunk(size)


def object_charge(value: Any) -> int:
    """What the store should charge for `value`'s object(s), from `sys.getsizeof`: one block,
    plus for a non-ASCII str the block of the UTF-8 copy the store caches in it."""
    base = sys.getsizeof(value)
    if not isinstance(value, str):
        return block(base)
    make("scratch").set("s", value)  # caches the UTF-8 form, as storing it does
    utf8 = sys.getsizeof(value) - base
    return block(base) + (block(utf8) if utf8 else 0)


#: Bytes of an entry's header: an inline value's block is this, the key and the payload.
HEADER = 22


def chunk(n: int) -> int:
    """glibc malloc's chunk for a request of `n` bytes."""
    return max(32, (n + 8 + 15) // 16 * 16) if n else 0


@pytest.mark.parametrize(
    "small, large",
    [
        (b"", b"x" * 600),
        ("ab", "x" * 600),
        (chr(0xE9) * 2, chr(0xE9) * 600),
        (chr(0x100) * 2, chr(0x100) * 300),
        (chr(0x10000) * 2, chr(0x10000) * 200),
        (1.5, b"x" * 700),
        (2**100, 2**200),
    ],
)
def test_values_held_as_objects_are_charged_their_object_size(small: Any, large: Any) -> None:
    """The difference between two charges is that of the objects' real (rounded) sizes."""
    cache = make()
    expected = object_charge(large) - object_charge(small)
    assert charge(cache, large) - charge(cache, small) == expected


@pytest.mark.parametrize(
    "value",
    [b"x" * 32, b"x" * 100, b"x" * 512, "y" * 100, "\u00e9" * 60, "\u20ac" * 170, {1, 2, 3}],
)
def test_small_values_are_charged_their_bytes_in_the_entry_block(value: Any) -> None:
    """Inline values cost their bytes (UTF-8, or the pickle) in one malloc chunk with the entry's
    header and key."""
    cache = make()
    key = len(cache.make_key("k"))
    if isinstance(value, bytes):
        payload = len(value)
    elif isinstance(value, str):
        payload = len(value.encode())
    else:
        payload = len(pickle.dumps(value, pickle.HIGHEST_PROTOCOL))
    ref = charge(cache, b"r" * 40)  # inline too: 40 payload bytes
    assert charge(cache, value) - ref == chunk(HEADER + key + payload) - chunk(HEADER + key + 40)


def test_a_deadline_costs_its_share_of_the_expiry_index() -> None:
    cache = make()
    forever = charge(cache, b"x")
    cache.clear()
    cache.set("k", b"x", timeout=60)
    timed = int(cache.stats()["bytes"])
    assert 8 <= timed - forever <= 48  # an (second, slot) heap element, maybe a far deadline
    assert cache.touch("k", None)
    assert cache.stats()["bytes"] == forever
    assert cache.touch("k", 30)
    assert cache.stats()["bytes"] == timed
    cache.delete("k")
    assert cache.stats()["bytes"] == 0


def test_shared_objects_in_a_dict_are_charged_their_share() -> None:
    """Interned keys and a constant held elsewhere cost less than fresh objects of the same size."""
    cache = make()
    n = 50  # a variable, or the compiler folds the strings into shared constants
    shared = "s" * n
    keep = [shared] * 9  # nine more holders
    fresh = charge(cache, {"a": "t" * n})
    cheap = charge(cache, {"a": shared})
    assert fresh - cheap >= block(sys.getsizeof(shared)) * 8 // 10
    assert keep


def test_max_bytes_counts_the_real_sizes() -> None:
    """MAX_BYTES bounds the charges above: 100-byte values each take well over 100 bytes."""
    cache = make(MAX_BYTES=100_000)
    for i in range(2_000):
        cache.set(f"k{i}", b"%0100d" % i)
        assert cache.stats()["bytes"] <= 100_000
    per_entry = cache.stats()["bytes"] / cache.stats()["entries"]
    # The block (header, key and the 100 bytes), its slab pointer and hash cell, at least.
    assert per_entry >= chunk(HEADER + 100) + 16
    assert cache.stats()["entries"] <= 100_000 // per_entry


INLINE_EDGES = [
    b"b" * 31,
    b"b" * 32,
    b"b" * 512,
    b"b" * 513,
    "s" * 31,
    "s" * 32,
    "s" * 512,
    "s" * 513,
    "\u00e9" * 16,  # 32 UTF-8 bytes
    "\u20ac" * 170,  # 510 UTF-8 bytes, 2 bytes a character in memory
    "\U0001f600" * 128,  # 512 UTF-8 bytes
    "x\ud800y" * 20,  # a lone surrogate: no UTF-8 form
    b"",
    "",
]


@pytest.mark.parametrize("value", INLINE_EDGES, ids=lambda v: f"{type(v).__name__}{len(v)}")
def test_values_round_trip_on_both_sides_of_the_inline_bounds(value: Any) -> None:
    cache = make()
    cache.set("k", value)
    for _ in range(2):
        got = cache.get("k")
        assert type(got) is type(value) and got == value
    assert cache.get_many(["k"]) == {"k": value}
    assert cache.get_or_set("k", "other") == value


def test_small_pickles_round_trip_and_incr_replaces_them() -> None:
    """A small pickle is kept inline: get unpickles a fresh copy; incr (Python's addition, then
    a replacement of the entry) keeps the books right."""
    from decimal import Decimal

    cache = make()
    cache.set("set", {1, 2})
    a, b = cache.get("set"), cache.get("set")
    assert a == b == {1, 2} and a is not b
    cache.set("d", Decimal("1.5"))
    assert cache.incr("d") == Decimal("2.5")
    assert cache.incr("d", 10) == Decimal("12.5")
    assert cache.get("d") == Decimal("12.5")
    held = cache.stats()["bytes"]
    cache.set("d", Decimal("12.5"))
    assert cache.stats()["bytes"] == held, "a replaced entry is charged as a fresh one"


def test_inline_values_under_threads() -> None:
    """Concurrent sets and gets of inline values of varying size never mix up payloads."""
    import threading

    cache = make(MAX_ENTRIES=500)
    errors: list[str] = []

    def work(t: int) -> None:
        for i in range(3_000):
            k = f"k{(i * 7 + t) % 200}"
            v = (k + "|") * (1 + i % 40)
            cache.set(k, v)
            got = cache.get(k)
            if got is not None and not got.startswith(k + "|"):
                errors.append(f"{k}: {got[:30]!r}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[:3]
