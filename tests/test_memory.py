"""Byte accounting: `stats()["bytes"]` charges what an entry really takes in memory (checked
against the growth of the resident set in a fresh process), and values are charged their real
object sizes."""

from __future__ import annotations

import itertools
import json
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
    "pickled": "lambda i: {i, i + 1}",
}


@pytest.mark.parametrize("timeout", ["3600", "None"])
@pytest.mark.parametrize("kind", list(MAKERS))
def test_stats_bytes_follow_resident_memory(kind: str, timeout: str) -> None:
    """150,000 entries: the store's own count is within 15% of what the process grew by."""
    src = _CHILD % {"make": MAKERS[kind], "n": 150_000, "timeout": timeout}
    out = subprocess.run([sys.executable, "-c", src], check=True, capture_output=True, text=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = got["bytes"] / got["rss"]
    assert 0.85 <= ratio <= 1.15, f"{kind}: stats {got['bytes']} vs RSS growth {got['rss']}"


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
    """pymalloc's block for an object of `size` bytes (16-byte steps up to 512)."""
    assert size <= 512
    return -(-size // 16) * 16


def object_charge(value: Any) -> int:
    """What the store should charge for `value`'s object(s), from `sys.getsizeof`: one block,
    plus for a non-ASCII str the block of the UTF-8 copy the store caches in it."""
    base = sys.getsizeof(value)
    if not isinstance(value, str):
        return block(base)
    make("scratch").set("s", value)  # caches the UTF-8 form, as storing it does
    utf8 = sys.getsizeof(value) - base
    return block(base) + (block(utf8) if utf8 else 0)


@pytest.mark.parametrize(
    "small, large",
    [
        (b"", b"x" * 200),
        ("ab", "x" * 200),
        (chr(0xE9) * 2, chr(0xE9) * 100),
        (chr(0x100) * 2, chr(0x100) * 100),
        (chr(0x10000) * 2, chr(0x10000) * 50),
        (1.5, b"x" * 300),
        (2**100, 2**200),
    ],
)
def test_values_are_charged_their_object_size(small: Any, large: Any) -> None:
    """The difference between two charges is that of the objects' real (rounded) sizes."""
    cache = make()
    expected = object_charge(large) - object_charge(small)
    assert charge(cache, large) - charge(cache, small) == expected


def test_a_deadline_costs_its_share_of_the_expiry_index() -> None:
    cache = make()
    forever = charge(cache, b"x")
    cache.clear()
    cache.set("k", b"x", timeout=60)
    timed = int(cache.stats()["bytes"])
    assert 20 <= timed - forever <= 48
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
    assert per_entry >= block(33 + 100) + 32  # the bytes object and the key, at least
    assert cache.stats()["entries"] <= 100_000 // per_entry
