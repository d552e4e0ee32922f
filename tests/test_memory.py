"""Byte accounting: `stats()["bytes"]` charges what an entry really takes in memory (checked
against the growth of the resident set in a fresh process), and values are charged their real
object sizes."""

from __future__ import annotations

import itertools
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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

_BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "memory.py"


def resident(backend: str, kind: str, entries: int) -> dict[str, Any]:
    """``benchmarks/memory.py``'s measurement in a fresh interpreter: RSS growth and stats bytes
    after storing ``entries`` values of ``kind`` under ``user:N:profile`` keys."""
    out = subprocess.run(
        [sys.executable, str(_BENCH), "--child", "resident", backend, kind, str(entries)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind, bar", [("small dict", 1.0), ("bytes", 0.47)])
def test_an_entry_takes_less_memory_than_in_locmemcache(kind: str, bar: float) -> None:
    """The memory table of benchmarks/RESULTS.md, scaled down to 200,000 entries: resident memory
    against LocMemCache's (a small dict: at most LocMemCache's, measured 0.42x since it is kept
    as compact bytes, 1.17x before; 100-byte bytes: measured 0.435x at this size on 3.11 (0.51x
    before the 17-byte header, the elided ':1:' and the expiry sweep), issue 12's bar is 0.45x at
    1M entries; 0.47 leaves room for other Pythons' LocMemCache) and
    stats()['bytes'] within 10% of the growth. Memory, not time: the ratio holds on a busy box."""
    n = 200_000
    rust = resident("django_rustcache.RustCache", kind, n)
    loc = resident("django.core.cache.backends.locmem.LocMemCache", kind, n)
    assert rust["rss"] <= bar * loc["rss"], (kind, rust["rss"] / n, loc["rss"] / n)
    assert 0.9 <= rust["stats_bytes"] / rust["rss"] <= 1.1, rust


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
HEADER = 17


def stored_key_len(made_key: str) -> int:
    """Bytes of a made key in the entry's block: Django's default ``:1:`` prefix is left out."""
    n = len(made_key.encode())
    return n - 3 if made_key.startswith(":1:") else n


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
    key = stored_key_len(cache.make_key("k"))
    if isinstance(value, bytes):
        payload = len(value)
    elif isinstance(value, str):
        payload = len(value.encode())
    else:
        payload = len(pickle.dumps(value, pickle.HIGHEST_PROTOCOL))
    ref = charge(cache, b"r" * 40)  # inline too: 40 payload bytes
    assert charge(cache, value) - ref == chunk(HEADER + key + payload) - chunk(HEADER + key + 40)


def test_a_deadline_costs_nothing_but_a_far_one_its_tail() -> None:
    """Expiry keeps no index (the sweep reads deadlines from the entries' headers): a deadline
    within the header's 49 days is free; a farther one takes 8 bytes of tail in the block."""
    cache = make()
    forever = charge(cache, b"x")
    cache.clear()
    cache.set("k", b"x", timeout=60)
    assert cache.stats()["bytes"] == forever
    assert cache.touch("k", 60 * 86_400)
    far = int(cache.stats()["bytes"])
    assert far - forever in (0, 16)  # the tail's 8 bytes may take the next 16-byte chunk
    assert cache.touch("k", None)
    assert cache.stats()["bytes"] == forever
    assert cache.touch("k", 30)
    assert cache.stats()["bytes"] == forever
    cache.delete("k")
    assert cache.stats()["bytes"] == 0


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: {"a": s},
        lambda s: {"a": [s]},
        lambda s: [s, 1],
        lambda s: (s, 1),
        lambda s: __import__("argparse").Namespace(a=s),
    ],
    ids=["dict", "nested", "list", "tuple", "instance"],
)
def test_an_object_held_elsewhere_too_is_charged_in_full(wrap: Any) -> None:
    """What the store keeps alive is charged in full, whoever else holds it at set time: those
    holders may let go first (issue 10, defect 6: a share was charged)."""
    cache = make()
    n = 5_000  # a variable, or the compiler folds the strings into shared constants
    shared = "s" * n
    keep = [shared] * 9  # nine more holders
    assert charge(cache, wrap(shared)) == charge(cache, wrap("t" * n))
    assert keep


def test_an_object_met_twice_in_one_value_is_charged_once() -> None:
    n = 5_000
    a, b = "a" * n, "b" * n
    cache = make()
    twice = charge(cache, {"x": a, "y": a, "z": [a, (a, 1)]})
    once = charge(cache, {"x": a, "y": b, "z": [b, (b, 1)]})
    assert once - twice == block(sys.getsizeof(b)) or once - twice == chunk(sys.getsizeof(b))
    assert charge(cache, [(a, 1), (a, 1)]) < charge(cache, [(a, 1), (b, 1)])


def test_objects_cpython_keeps_alive_cost_only_their_share() -> None:
    """Interned strings (identifier-like literals, attribute names), small ints, one-character
    strings and None cost an entry (nearly) nothing: CPython holds them for ever anyway."""
    cache = make()
    n = 600  # past the compact form's 512 bytes: the dict holds the str object itself
    fresh = charge(cache, {"k": "t" * n})
    name = sys.intern("u" * n)
    names = [name] * 9  # an interned name used elsewhere (in code, as an attribute name)
    assert fresh - charge(cache, {"k": name}) >= block(sys.getsizeof(name)) * 8 // 10
    assert names
    pad = "p" * n  # keeps the dicts below past the compact form, on the objects' path
    assert charge(cache, {"k": 7, "p": pad}) == charge(cache, {"k": None, "p": pad})
    assert charge(cache, {"k": "x", "p": pad}) == charge(cache, {"k": None, "p": pad})
    assert charge(cache, {"k": 10**6 + n, "p": pad}) > charge(cache, {"k": 7, "p": pad})


# Stores values holding big objects that something else holds too at set time (and lets go of
# right after); prints the RSS growth and stats bytes.
_SHARED_CHILD = textwrap.dedent(
    """
    import gc, json, os
    import django
    from django.conf import settings
    settings.configure(CACHES={"default": {"BACKEND": "django_rustcache.RustCache",
                                           "LOCATION": "shared", "TIMEOUT": None,
                                           "OPTIONS": {"MAX_BYTES": %(max_bytes)d}}})
    django.setup()
    from django.core.cache import cache

    def rss():
        # Freed 5 MB blocks stay in malloc's free lists (its mmap threshold rises after the first
        # free): give them back, to measure what is held.
        __import__("ctypes").CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    gc.collect()
    before = rss()
    for i in range(%(n)d):
        blob = %(make)s
        elsewhere = [blob] * 3  # other holders at set time, gone right after
        cache.set("k%%d" %% i, %(wrap)s)
        del elsewhere, blob
    gc.collect()
    print(json.dumps({"rss": rss() - before, "bytes": cache.stats()["bytes"]}))
    """
)


@pytest.mark.parametrize(
    "make, wrap",
    [
        ('b"%d" % i + bytes(5_000_000)', '{"blob": blob}'),
        ('"%d" % i + "x" * 5_000_000', '[blob, {"again": blob}]'),
        ('"%d" % i + "x" * 5_000_000', '__import__("argparse").Namespace(blob=blob)'),
    ],
    ids=["bytes-in-dict", "str-twice", "str-in-instance"],
)
def test_max_bytes_holds_against_resident_memory_when_values_share_big_objects(
    make: str, wrap: str
) -> None:
    """20 values each holding a 5 MB object held elsewhere at set time, then let go, under a
    MAX_BYTES of 60 MB: the process grows by what stats() says (within 10%) and by no more than
    MAX_BYTES (+10%). Before issue 10's fix: 100 MB held under a charge of ~34 MB."""
    max_bytes = 60_000_000
    src = _SHARED_CHILD % {"make": make, "wrap": wrap, "n": 20, "max_bytes": max_bytes}
    out = subprocess.run([sys.executable, "-c", src], check=True, capture_output=True, text=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["bytes"] <= max_bytes
    assert got["rss"] <= max_bytes * 1.1, got
    assert 0.9 <= got["bytes"] / got["rss"] <= 1.1, got


@pytest.mark.parametrize("policy", ["lru", "s3fifo", "tinylfu"])
def test_a_tag_per_row_is_forgotten_with_its_row_and_what_tags_hold_is_under_max_bytes(
    policy: str,
) -> None:
    """100,000 sets each under a tag of its own with a short timeout, on a store of 100 entries:
    the tags of rows gone are forgotten (issue 10, defect 5: all 100,000 stayed, uncharged)."""
    cache = make(MAX_ENTRIES=100, MAX_BYTES=60_000, EVICTION_POLICY=policy)
    for i in range(100_000):
        cache.set(f"k{i}", i, timeout=0.002, tags=[f"row:{i}"])
        if i % 10 == 0:
            cache.invalidate_tags([f"row:{i - 5}"])
    s = cache.stats()
    assert s["tags"] <= s["entries"] + 1 <= 101, s
    assert s["bytes"] <= 60_000, s
    cache.clear()
    assert (cache.stats()["tags"], cache.stats()["bytes"]) == (0, 0)


def test_a_tag_costs_its_cell_until_its_last_entry_goes() -> None:
    """A tag's cell, name and member list are in stats()['bytes'], and leave with its last entry
    (deleted or invalidated); the tag can be used again afterwards."""
    cache = make()
    plain = charge(cache, 1)
    cache.clear()
    cache.set("k", 1, tags=["t"])
    # The entry's stamp (64), the Arc'd cell (112), its name (32), slot (16) and list (64).
    assert cache.stats()["bytes"] - plain >= 64 + 200
    cache.set("b", 1, tags=["t"])
    assert cache.stats()["tags"] == 1
    cache.delete("k")
    assert cache.stats()["tags"] == 1
    cache.delete("b")
    assert cache.stats()["tags"] == 0 and cache.stats()["bytes"] == 0
    cache.set("a", 1, tags=["t"])
    assert cache.invalidate_tags(["t"]) == 1
    assert cache.stats()["tags"] == 0 and cache.stats()["bytes"] == 0
    cache.set("a", 2, tags=["t"])
    assert cache.get("a") == 2, "a forgotten tag is not invalidated for ever"


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


# MAX_BYTES after every operation ------------------------------------------------------------

#: Examples per policy for the property test below (hunting runs raise it).
BOUND_EXAMPLES = int(os.environ.get("RUSTCACHE_BOUND_EXAMPLES", "150"))

_KEYS = st.sampled_from([f"k{i}" for i in range(12)])
_TAGS = st.lists(st.sampled_from([f"t{i}" for i in range(4)] + ["row"]), max_size=3)
#: None (no expiry), already past (stores nothing / removes), soon, later.
_TIMEOUTS = st.sampled_from([None, 0, -1, 0.001, 60])
_VALUES = st.one_of(
    st.integers(min_value=-(2**62), max_value=2**62),
    st.integers(min_value=0, max_value=1_500).map(lambda n: b"v" * n),
    st.integers(min_value=0, max_value=200).map(lambda n: "s" * n),
)
_OPS = st.one_of(
    st.tuples(st.just("set"), _KEYS, _VALUES, _TIMEOUTS, _TAGS),
    st.tuples(st.just("add"), _KEYS, _VALUES, _TIMEOUTS, _TAGS),
    st.tuples(st.just("set_many"), _KEYS, _VALUES, _TIMEOUTS, _TAGS),
    st.tuples(st.just("get_or_set"), _KEYS, _VALUES, _TIMEOUTS, _TAGS),
    st.tuples(st.just("incr"), _KEYS, st.integers(-5, 5)),
    st.tuples(st.just("touch"), _KEYS, _TIMEOUTS),
    st.tuples(st.just("delete"), _KEYS),
    st.tuples(st.just("get"), _KEYS),
    st.tuples(st.just("invalidate"), _TAGS),
    st.tuples(st.just("snapshot"), _TAGS),
)


def _apply(cache: RustCache, op: tuple[Any, ...], held: list[Any]) -> None:
    """Runs one drawn operation (`held` keeps tag snapshots alive, as a caller would)."""
    name, *args = op
    if name == "set":
        key, value, timeout, tags = args
        cache.set(key, value, timeout, tags=tags)
    elif name == "add":
        key, value, timeout, tags = args
        cache.add(key, value, timeout, tags=tags)
    elif name == "set_many":
        key, value, timeout, tags = args
        cache.set_many({key: value, key + "m": value}, timeout, tags=tags)
    elif name == "get_or_set":
        key, value, timeout, tags = args
        cache.get_or_set(key, lambda: value, timeout, tags=tags)
    elif name == "incr":
        key, delta = args
        try:
            cache.incr(key, delta)
        except (ValueError, TypeError):
            pass  # missing, or not a number
    elif name == "touch":
        key, timeout = args
        cache.touch(key, timeout)
    elif name == "delete":
        cache.delete(args[0])
    elif name == "get":
        cache.get(args[0])
    elif name == "invalidate":
        cache.invalidate_tags(args[0])
    else:
        held.append(cache.snapshot_tags(args[0]))
        del held[:-1]


@pytest.mark.parametrize("policy", ["lru", "s3fifo", "tinylfu"])
@settings(
    max_examples=BOUND_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    max_bytes=st.integers(min_value=3_000, max_value=8_000),
    ops=st.lists(_OPS, min_size=1, max_size=60),
)
def test_stats_bytes_never_pass_max_bytes_after_an_operation(
    policy: str, max_bytes: int, ops: list[tuple[Any, ...]]
) -> None:
    """Random sequences of every kind of write (tags, expiry, incr, touch, snapshots) on a tiny
    store: `stats()["bytes"]` is within MAX_BYTES once each operation has returned. (A member
    list's growth used to be charged after the insert that needed it, leaving the store over the
    bound until the next eviction: the soak test's rare 47 bytes over.) The smallest bound holds
    what a held snapshot's cells may take (up to 3 tags, with member lists of stale refs): the
    store cannot evict those, only refuse entries."""
    cache = make(MAX_ENTRIES=10**6, MAX_BYTES=max_bytes, EVICTION_POLICY=policy)
    held: list[Any] = []
    try:
        for i, op in enumerate(ops):
            _apply(cache, op, held)
            got = cache.stats()["bytes"]
            assert got <= max_bytes, f"{got} bytes > {max_bytes} after op {i}: {op}"
    finally:
        held.clear()
        cache.clear()


# Not "tinylfu": its sketch's size follows the bound (at most a quarter of it), so an unbounded
# probe cannot tell what a bounded store holds; src/store/tags.rs tests that policy in Rust.
@pytest.mark.parametrize("policy", ["lru", "s3fifo"])
def test_an_insert_whose_tag_list_must_grow_evicts_for_that_growth(policy: str) -> None:
    """A store exactly full of four entries under one tag (its member list full): a fifth entry
    that fits exactly must still evict for the room its ref takes in the list."""
    probe = make(MAX_ENTRIES=10**6, EVICTION_POLICY=policy)
    for i in range(4):
        probe.set(f"k{i}", i, tags=["g"])
    full = probe.stats()["bytes"]
    probe.set("k4", 4)
    fifth = probe.stats()["bytes"] - full  # untagged: less than the tagged entry's charge
    probe.clear()
    probe.set("k4", 4, tags=["g"])
    probe.set("x", 4, tags=["g"])
    tagged = probe.stats()["bytes"]
    probe.delete("x")
    tagged -= probe.stats()["bytes"]  # an entry's charge with one tag, its list unchanged
    assert tagged > fifth
    cache = make(MAX_ENTRIES=10**6, MAX_BYTES=full + tagged, EVICTION_POLICY=policy)
    for i in range(4):
        cache.set(f"k{i}", i, tags=["g"])
    assert cache.stats()["bytes"] == full
    cache.set("k4", 4, tags=["g"])
    assert cache.stats()["bytes"] <= full + tagged
    assert cache.get("k4") == 4
    assert cache.stats()["evictions"] == 1
