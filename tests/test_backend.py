"""RustCache's own contract beyond Django's suite: sharing, isolation, atomicity, expiry, bounds,
re-entrant pickling, bad input and settings."""

from __future__ import annotations

import asyncio
import pickle
import threading
import time
import uuid
from typing import Any

import pytest
from django.core.cache import caches
from django.core.exceptions import ImproperlyConfigured

from django_rustcache import RustCache


def make(options: dict[str, Any] | None = None, **params: Any) -> RustCache:
    """A backend on a fresh LOCATION of its own."""
    if options is not None:
        params["OPTIONS"] = options
    return RustCache(f"test-{uuid.uuid4().hex}", params)


# Sharing and isolation ---------------------------------------------------------------------


def test_same_location_shares_one_store_across_instances_and_threads():
    loc = f"shared-{uuid.uuid4().hex}"
    a = RustCache(loc, {})
    b = RustCache(loc, {"OPTIONS": {"MAX_ENTRIES": 10}})
    a.set("k", "v")
    seen = []
    t = threading.Thread(target=lambda: seen.append(RustCache(loc, {}).get("k")))
    t.start()
    t.join()
    assert b.get("k") == "v"
    assert seen == ["v"]
    assert RustCache(f"other-{loc}", {}).get("k") is None


def test_values_come_back_as_isolated_copies():
    c = make()
    value = {"items": [1, 2, 3], "nested": {"a": [1]}}
    c.set("k", value)
    value["items"].append(4)
    got = c.get("k")
    assert got == {"items": [1, 2, 3], "nested": {"a": [1]}}
    got["nested"]["a"].append(2)
    assert c.get("k") == {"items": [1, 2, 3], "nested": {"a": [1]}}
    assert c.get("k") is not c.get("k")


def test_miss_returns_the_very_default_and_stored_none_is_a_hit():
    c = make()
    sentinel = object()
    assert c.get("missing", sentinel) is sentinel
    c.set("none", None)
    assert c.get("none", sentinel) is None
    assert c.has_key("none")
    assert c.get_many(["none", "missing"]) == {"none": None}


def test_keys_of_every_type_django_allows():
    c = make()
    for key in ["plain", 42, -7, 10**30, "ünïcødé-ключ", 3.5]:
        c.set(key, repr(key))
        assert c.get(key) == repr(key)
        assert c.make_key(key) == f":1:{key}"
    assert c.get(True) is None  # str(True) == "True", not "1"


# Atomicity under threads -------------------------------------------------------------------


def _hammer(n_threads: int, work: Any) -> list[Any]:
    barrier = threading.Barrier(n_threads)
    results: list[Any] = [None] * n_threads

    def run(i: int) -> None:
        barrier.wait()
        results[i] = work(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_incr_loses_no_update_under_threads():
    c = make()
    c.set("n", 0)
    c.set("f", 0.5)  # a float goes through Python's + with compare-and-swap

    def work(_: int) -> None:
        for _ in range(2000):
            c.incr("n")
            c.decr("f", -1)

    _hammer(8, work)
    assert c.get("n") == 16000
    assert c.get("f") == 16000.5


def test_incr_of_a_float_is_exact_while_other_keys_are_deleted_and_set_again():
    """A float's incr reads, adds and stores back only if the entry is still the one read:
    writers churning same-sized entries (whose freed blocks the allocator hands out again,
    possibly at the float's old address) must never let an increment be lost."""
    c = make()
    c.set("f", 0.5)
    incrementers, writers, rounds = 4, 4, 1500

    def work(i: int) -> None:
        if i < incrementers:
            for _ in range(rounds):
                c.incr("f", 1)
        else:
            for j in range(rounds):
                key = f"w{i}:{j % 8}"
                c.set(key, float(j))
                c.delete(key)
                c.set(key, float(j) + 0.25)

    _hammer(incrementers + writers, work)
    assert c.get("f") == incrementers * rounds + 0.5
    assert c.get(f"w{incrementers}:{(rounds - 1) % 8}") == rounds - 1 + 0.25


class SlowSum:
    """A pickled number whose addition sleeps (letting other threads run), so that an `incr` of
    it is interleaved with others between its read and its write."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __add__(self, other: int) -> SlowSum:
        time.sleep(0.0002)
        return SlowSum(self.n + other)


def test_incr_of_a_value_replaced_meanwhile_at_a_reused_address_loses_no_update():
    """Each incr's read and write are interleaved with other incrs of the key, which replace its
    entry (a new block; the old one freed, and its address handed out again): only the entry
    read may be overwritten, never one that took its address since."""
    c = make()
    c.set("s", SlowSum(0))
    threads, rounds = 4, 300

    def work(_: int) -> None:
        for _ in range(rounds):
            c.incr("s", 1)

    _hammer(threads, work)
    assert c.get("s").n == threads * rounds


def test_add_has_exactly_one_winner():
    c = make()
    for round_ in range(20):
        wins = _hammer(8, lambda i, r=round_: c.add(f"k{r}", i))
        assert wins.count(True) == 1
        assert c.get(f"k{round_}") == wins.index(True)


def test_get_or_set_under_threads_everyone_sees_the_stored_value():
    c = make()
    results = _hammer(8, lambda i: c.get_or_set("k", lambda: {"by": i}))
    assert all(r == results[0] for r in results)
    assert c.get("k") == results[0]


# incr / decr --------------------------------------------------------------------------------


def test_incr_past_64_bits_and_back():
    c = make()
    c.set("n", 2**63 - 1)
    assert c.incr("n") == 2**63
    assert c.incr("n", 2**64) == 2**63 + 2**64
    assert c.decr("n", 2**64 + 2**63) == 0
    assert c.incr("n", -(2**70)) == -(2**70)
    assert c.get("n") == -(2**70)


def test_incr_matches_python_addition_on_other_types():
    c = make()
    c.set("b", True)
    assert c.incr("b") == 2
    c.set("f", 1.5)
    assert c.incr("f") == 2.5
    c.set("s", "a")
    with pytest.raises(TypeError):
        c.incr("s")
    assert c.get("s") == "a"
    c.set("n", 1)
    with pytest.raises(TypeError):
        c.incr("n", "x")
    with pytest.raises(TypeError):
        c.decr("n", "x")
    assert c.get("n") == 1
    with pytest.raises(ValueError, match="Key ':1:missing' not found"):
        c.incr("missing")


def test_incr_keeps_the_expiry():
    c = make()
    c.set("n", 1, timeout=1000)
    before = c._expire_info[c.make_key("n")]
    assert c.incr("n", 5) == 6
    assert c.incr("n", 2**64) == 2**64 + 6
    assert c._expire_info[c.make_key("n")] == before
    assert 990 < c.ttl("n") <= 1000


# Pickling -----------------------------------------------------------------------------------


class ReentrantValue:
    """Reads and writes the cache while being pickled and unpickled."""

    cache: RustCache | None = None

    def __init__(self, payload: int) -> None:
        self.payload = payload

    def __getstate__(self) -> dict[str, Any]:
        assert self.cache is not None
        assert not self.cache._lock.locked()
        self.cache.set("side-effect", self.payload)
        return {"payload": self.payload, "peek": self.cache.get("side-effect")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        assert self.cache is not None
        assert not self.cache._lock.locked()
        self.cache.incr("unpickled") if self.cache.has_key("unpickled") else self.cache.set(
            "unpickled", 1
        )
        self.payload = state["payload"]


def test_pickling_that_reenters_the_cache_does_not_deadlock():
    c = make()
    ReentrantValue.cache = c
    try:
        c.set("v", ReentrantValue(7))
        assert c.add("w", ReentrantValue(8))
        assert c.get("v").payload == 7
        assert c.get("w").payload == 8
        assert c.get("unpickled") == 2
        assert c.get("side-effect") == 8
    finally:
        ReentrantValue.cache = None


class Unpicklable:
    def __reduce__(self) -> Any:
        raise pickle.PicklingError("nope")


def test_unpicklable_value_raises_and_keeps_the_old_value():
    c = make()
    c.set("k", "old")
    with pytest.raises(pickle.PicklingError):
        c.set("k", Unpicklable())
    with pytest.raises(pickle.PicklingError):
        c.add("new", Unpicklable())
    with pytest.raises(TypeError):
        c.set("k", threading.Lock())
    assert c.get("k") == "old"
    assert not c.has_key("new")


# Expiry -------------------------------------------------------------------------------------


def test_expired_entries_are_never_returned():
    c = make()
    c.set("short", "v", timeout=0.15)
    c.set("zero", "v", timeout=0)
    c.set("negative", "v", timeout=-1)
    c.set("forever", "v", timeout=None)
    assert c.get("short") == "v"
    assert c.get("zero") is None and c.get("negative") is None
    time.sleep(0.3)
    assert c.get("short") is None
    assert not c.has_key("short")
    assert c.get_many(["short", "forever"]) == {"forever": "v"}
    assert c.ttl("forever") is None
    assert c.ttl("short") == 0


def test_expired_entries_are_reclaimed_without_being_read():
    c = make({"MAX_ENTRIES": 100_000})
    c.set_many({f"k{i}": i for i in range(2000)}, timeout=0.1)
    assert c.stats()["entries"] == 2000
    time.sleep(0.2)
    for i in range(2000):  # unrelated traffic reclaims a few expired entries per operation
        c.set(f"other{i % 10}", i)
    stats = c.stats()
    assert stats["entries"] == 10
    assert stats["expirations"] >= 2000


# Eviction and MAX_BYTES ---------------------------------------------------------------------


def test_cull_follows_django_rule_lru_first():
    c = make({"MAX_ENTRIES": 9, "CULL_FREQUENCY": 3})
    for i in range(9):
        c.set(i, i)
    for i in range(6):
        assert c.get(i) == i
    c.set(9, 9)
    assert [c.has_key(i) for i in range(10)] == [True] * 6 + [False] * 3 + [True]
    assert c.stats()["evictions"] == 3


def test_max_bytes_is_never_exceeded_and_oversized_values_are_refused():
    limit = 20_000
    c = make({"MAX_ENTRIES": 10**6, "MAX_BYTES": limit})
    for i in range(3000):
        c.set(f"k{i}", "x" * (i % 700))
        assert c.stats()["bytes"] <= limit
    c.set("small", "s")
    c.set("huge", "x" * (limit + 1))
    assert not c.has_key("huge")
    assert c.get("small") == "s"
    assert c.add("huge", "x" * (limit + 1)) is False
    assert c.set_many({"huge": "x" * (limit + 1), "ok": 1}) == ["huge"]
    assert c.get("ok") == 1 and c.get("small") == "s"
    c.set("small", b"y" * (limit * 2))  # an oversized replacement does not leave the old value
    assert c.get("small") is None
    stats = c.stats()
    assert stats["max_bytes"] == limit
    assert 0 < stats["bytes"] <= limit


# Bad input and settings ---------------------------------------------------------------------


def test_bad_timeout_and_tags_raise_type_errors():
    c = make()
    with pytest.raises(TypeError, match="timeout"):
        c.set("k", 1, timeout="soon")
    with pytest.raises(TypeError, match="timeout"):
        c.touch("k", timeout=[1])
    with pytest.raises(TypeError, match="tags"):
        c.set("k", 1, tags="not-a-list")
    with pytest.raises(TypeError, match="tag"):
        c.set("k", 1, tags=[1])
    assert not c.has_key("k")


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"OPTIONS": {"MAX_ENTRYS": 5}}, "MAX_ENTRYS"),
        ({"OPTIONS": {"MAX_BYTES": -1}}, "MAX_BYTES"),
        ({"OPTIONS": {"MAX_BYTES": 0.5}}, "MAX_BYTES"),
        ({"OPTIONS": {"MAX_BYTES": "1e3"}}, "MAX_BYTES"),
        ({"OPTIONS": {"MAX_ENTRIES": "3e2"}}, "MAX_ENTRIES"),
        ({"OPTIONS": {"CULL_FREQUENCY": -1}}, "CULL_FREQUENCY"),
        ({"OPTIONS": ["MAX_ENTRIES"]}, "OPTIONS"),
        ({"KEY_PREFX": "x"}, "KEY_PREFX"),
    ],
)
def test_invalid_settings_raise_improperly_configured_naming_the_setting(params, named):
    with pytest.raises(ImproperlyConfigured, match=named):
        make(**params)


def test_invalid_settings_raise_on_first_use_through_caches(settings):
    settings.CACHES = {
        **settings.CACHES,
        "broken": {"BACKEND": "django_rustcache.RustCache", "OPTIONS": {"MAX_BYTE": 10}},
    }
    with pytest.raises(ImproperlyConfigured, match="MAX_BYTE"):
        caches["broken"].get("k")


# Stats, tags, patterns ------------------------------------------------------------------------


def test_stats_count_operations():
    c = make({"MAX_ENTRIES": 1000, "MAX_BYTES": 10**6})
    c.set("a", 1)
    c.get("a")
    c.get("b")
    c.delete("a")
    s = c.stats()
    for field in (
        "hits",
        "misses",
        "sets",
        "deletes",
        "evictions",
        "expirations",
        "entries",
        "bytes",
        "max_entries",
        "max_bytes",
    ):
        assert field in s
    assert (s["hits"], s["misses"], s["sets"], s["deletes"], s["entries"]) == (1, 1, 1, 1, 0)
    assert (s["max_entries"], s["max_bytes"]) == (1000, 10**6)


def test_tags_are_namespaced_by_key_prefix_and_reset_by_clear():
    loc = f"tags-{uuid.uuid4().hex}"
    site_a = RustCache(loc, {"KEY_PREFIX": "a"})
    site_b = RustCache(loc, {"KEY_PREFIX": "b"})
    site_a.set("k", 1, tags=["products"])
    site_b.set("k", 2, tags=["products"])
    site_a.set_many({"x": 1, "y": 2}, tags=["products", "list"])
    assert site_a.invalidate_tags(["products"]) == 3
    assert site_a.get("k") is None and site_a.get_many(["x", "y"]) == {}
    assert site_b.get("k") == 2
    assert site_b.invalidate_tags(["products", "products"]) == 1
    site_a.set("t", 1, tags=["t"])
    site_a.clear()
    site_a.set("t2", 1, tags=["t"])
    assert site_a.invalidate_tags(["t"]) == 1


def test_snapshot_refuses_a_value_computed_across_an_invalidation():
    c = make()
    snap = c.snapshot_tags(["p"])
    c.invalidate_tags(["p"])
    c.set("k", "stale", tags=snap)
    assert c.get("k") is None
    assert c.get_or_set("k", lambda: c.invalidate_tags(["p"]) or "computed", tags=["p"]) == (
        "computed"
    )
    assert c.get("k") is None  # returned to the caller, not stored
    assert c.get_or_set("k", "fresh", tags=["p"]) == "fresh"
    assert c.get("k") == "fresh"


def test_ttl_iter_keys_and_delete_pattern():
    c = make(KEY_PREFIX="site")
    c.set_many({"user:1": 1, "user:2": 2, "post:1": 3})
    c.set("user:3", 3, version=2)
    assert sorted(c.iter_keys("user:*")) == ["user:1", "user:2"]
    assert c.keys("user:*", version=2) == ["user:3"]
    assert c.delete_pattern("user:?") == 2
    assert c.keys("*") == ["post:1"]
    assert c.get("user:3", version=2) == 3


# Async twins ----------------------------------------------------------------------------------


def test_async_twins():
    c = make()

    async def scenario() -> list[Any]:
        out = [await c.aset("k", {"v": 1}), await c.aget("k"), await c.aadd("k", 2)]
        out += [await c.aset_many({"a": 1, "b": 2}), await c.aget_many(["a", "b", "z"])]
        out += [await c.aincr("a", 5), await c.adecr("a", 2), await c.ahas_key("a")]
        out += [await c.atouch("a", 100), await c.adelete("a"), await c.aget("a", "miss")]
        out += [await c.aget_or_set("g", lambda: "made"), await c.aincr_version("g")]
        out += [await c.aget("g", version=2), await c.adelete_many(["b"]), await c.ahas_key("b")]
        out += [await c.ainvalidate_tags(["none"]), await c.aclear(), await c.aget("k")]
        return out

    assert asyncio.run(scenario()) == [
        None,
        {"v": 1},
        False,
        [],
        {"a": 1, "b": 2},
        6,
        4,
        True,
        True,
        True,
        "miss",
        "made",
        2,
        "made",
        None,
        False,
        0,
        None,
        None,
    ]


def test_keys_with_lone_surrogates_work_in_both_key_modes():
    c = make()
    c.set("a\udcff", 1)
    assert c.get("a\udcff") == 1
    assert c.get("a\udcfe") is None
    raw = make(KEY_FUNCTION=lambda key, prefix, version: key)
    raw.set("b\udcff", 2)
    assert raw.get("b\udcff") == 2 and raw.get("b\udcfe") is None
