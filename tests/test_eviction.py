"""OPTIONS["EVICTION_POLICY"]: option checking, bounds, scan resistance and the cache API under
the S3-FIFO and W-TinyLFU policies (the ``s3`` fixture runs each test under both), and Django's
cull rule kept under the default "lru"."""

from __future__ import annotations

import itertools
import pickle
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from django_rustcache import RustCache

_names = itertools.count()


def make(policy: str | None = "s3fifo", location: str | None = None, **options: Any) -> RustCache:
    """A RustCache on a LOCATION of its own (unless given), emptied."""
    if policy is not None:
        options["EVICTION_POLICY"] = policy
    loc = location or f"test-eviction-{next(_names)}"
    cache = RustCache(loc, {"TIMEOUT": None, "OPTIONS": options})
    cache.clear()
    return cache


#: The policies that take MAX_ENTRIES as a capacity and evict one entry at a time.
CAPACITY_POLICIES = ("s3fifo", "tinylfu")


@pytest.fixture(params=CAPACITY_POLICIES)
def s3(request: pytest.FixtureRequest) -> Iterator[Callable[..., RustCache]]:
    """A factory of caches under each capacity policy in turn."""
    made: list[RustCache] = []

    def factory(**options: Any) -> RustCache:
        cache = make(policy=request.param, **options)
        made.append(cache)
        return cache

    yield factory
    for cache in made:
        cache.clear()


# Option checking ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["LRU", "s3-fifo", "TinyLFU", "w-tinylfu", "", 3, None, ["lru"]])
def test_invalid_policy_names_the_option(bad: Any) -> None:
    with pytest.raises(ImproperlyConfigured, match="EVICTION_POLICY") as info:
        RustCache("test-eviction-bad", {"OPTIONS": {"EVICTION_POLICY": bad}})
    assert "'lru', 's3fifo', 'tinylfu'" in str(info.value)


def test_default_policy_is_lru_and_every_name_is_accepted() -> None:
    assert make(policy=None)._h.eviction_policy == "lru"
    assert make(policy=None, MAX_ENTRIES=65_536)._h.eviction_policy == "lru"
    assert make(policy="lru")._h.eviction_policy == "lru"
    assert make(policy="s3fifo")._h.eviction_policy == "s3fifo"
    assert make(policy="tinylfu")._h.eviction_policy == "tinylfu"


@pytest.mark.parametrize("policy", CAPACITY_POLICIES)
@pytest.mark.parametrize("bad", [0, -1])
def test_s3fifo_needs_a_capacity_of_at_least_one(bad: int, policy: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=f"MAX_ENTRIES.*>= 1.*'{policy}'"):
        make(policy=policy, MAX_ENTRIES=bad)
    # Django's own meaning of MAX_ENTRIES <= 0 under "lru" stays allowed.
    make(policy="lru", MAX_ENTRIES=bad)


def test_aliases_sharing_a_location_must_agree_on_the_policy() -> None:
    first = make(policy="s3fifo")
    loc = first._options.location
    assert make(policy="s3fifo", location=loc)._h.eviction_policy == "s3fifo"
    # An alias naming no policy takes the store's.
    assert make(policy=None, location=loc)._h.eviction_policy == "s3fifo"
    for other in ("lru", "tinylfu"):
        with pytest.raises(ImproperlyConfigured, match="EVICTION_POLICY.*'s3fifo'"):
            make(policy=other, location=loc)


def test_the_default_above_65536_entries_is_tinylfu_decided_by_a_locations_first_alias() -> None:
    """A store of 16 shards (its first alias's MAX_ENTRIES above 65,536) whose first alias names
    no policy is W-TinyLFU's (by the hit ratios of benchmarks/hitratio_optimum.py); later aliases
    of its LOCATION naming none take it whatever their MAX_ENTRIES, like the shards."""
    big = make(policy=None, MAX_ENTRIES=65_537)
    assert big._h.eviction_policy == "tinylfu"
    loc = big._options.location
    assert make(policy=None, location=loc, MAX_ENTRIES=300)._h.eviction_policy == "tinylfu"
    with pytest.raises(ImproperlyConfigured, match="EVICTION_POLICY.*'tinylfu'"):
        make(policy="lru", location=loc, MAX_ENTRIES=100_000)
    small = make(policy=None, MAX_ENTRIES=300)
    loc = small._options.location
    assert make(policy=None, location=loc, MAX_ENTRIES=100_000)._h.eviction_policy == "lru"
    # Naming "lru" above 65,536 keeps it (one eviction per insert, see below).
    assert make(policy="lru", MAX_ENTRIES=100_000)._h.eviction_policy == "lru"
    # The default store behaves as one: a loop over more keys than it holds keeps hitting.
    cache = make(policy=None, MAX_ENTRIES=70_000)
    keys = [f"loop{i}" for i in range(80_000)]
    hits = 0
    for rnd in range(3):
        for k in keys:
            if cache.get(k) is None:
                cache.set(k, 1)
            elif rnd == 2:
                hits += 1
        assert cache.stats()["entries"] <= 70_000
    assert hits > 40_000, hits


# Bounds ------------------------------------------------------------------------------------


def test_s3fifo_max_entries_is_the_capacity(s3: Callable[..., RustCache]) -> None:
    cache = s3(MAX_ENTRIES=50, CULL_FREQUENCY=2)
    for i in range(1000):
        cache.set(f"k{i}", i)
        assert len(cache._cache) <= 50
    assert len(cache._cache) == 50, "evicts just enough: the store stays full"
    assert cache.stats()["evictions"] == 950
    assert cache.get("k999") == 999, "the newest entry is kept"


def test_lru_keeps_djangos_cull_rule() -> None:
    cache = make(policy="lru", MAX_ENTRIES=30, CULL_FREQUENCY=3)
    for i in range(30):
        cache.set(f"k{i}", i)
    cache.get("k0")
    cache.set("new", 1)
    assert len(cache._cache) == 30 - 30 // 3 + 1
    assert cache.stats()["evictions"] == 10
    assert cache.has_key("k0") and not cache.has_key("k1")


def test_s3fifo_max_bytes_is_never_passed(s3: Callable[..., RustCache]) -> None:
    max_bytes = 20_000
    cache = s3(MAX_ENTRIES=10_000, MAX_BYTES=max_bytes)
    for i in range(2000):
        cache.set(f"k{i % 300}", "x" * (50 + (i * 37) % 400))
        assert cache.stats()["bytes"] <= max_bytes
    assert cache.stats()["evictions"] > 0
    before = dict(cache.stats())
    kept = [k for k in (f"k{i}" for i in range(300)) if cache.has_key(k)]
    cache.set("huge", "y" * max_bytes)
    assert cache.set_many({"huge2": "z" * (2 * max_bytes)}) == ["huge2"]
    assert not cache.has_key("huge") and not cache.has_key("huge2")
    assert all(cache.has_key(k) for k in kept), "nothing else was lost for the large values"
    assert cache.stats()["bytes"] == before["bytes"]
    assert cache.stats()["evictions"] == before["evictions"]


def test_s3fifo_prefers_expired_entries_as_victims(s3: Callable[..., RustCache]) -> None:
    cache = s3(MAX_ENTRIES=300)
    for i in range(150):
        cache.set(f"short{i}", i, timeout=0.05)
        cache.set(f"long{i}", i)
    time.sleep(0.1)
    for i in range(150):
        cache.set(f"new{i}", i)
    assert all(cache.has_key(f"long{i}") for i in range(150))
    stats = cache.stats()
    assert stats["evictions"] == 0 and stats["expirations"] == 150


@pytest.mark.parametrize("policy", ["tinylfu", "lru", "s3fifo"])
def test_writes_to_other_keys_reclaim_a_large_store_of_expired_entries(policy: str) -> None:
    """Expired entries nobody reads again are reclaimed by the sweep that writes drive: after
    `n` entries expire, `n // 8` writes to 100 other keys leave only those (16 shards)."""
    cache = make(policy=policy, MAX_ENTRIES=2_000_000)
    n = 40_000
    for i in range(n):
        cache.set(f"gone{i}", b"x" * 100, timeout=1)
    full = cache.stats()
    time.sleep(1.1)  # the last one set expires 1 s after it was set
    for i in range(n // 8):
        cache.set(f"other{i % 100}", b"y" * 100)
    stats = cache.stats()
    assert stats["entries"] == 100
    assert stats["expirations"] == n and stats["evictions"] == 0
    one = make(policy="lru")
    one.set("gone0", b"x" * 100, timeout=1)
    # Their bytes went too (all but the 100 new entries' worth; W-TinyLFU's sketch stays).
    assert full["bytes"] - stats["bytes"] >= (n - 100) * one.stats()["bytes"]
    assert all(cache.get(f"other{i}") == b"y" * 100 for i in range(100))
    assert cache.get("gone0") is None


# Scan resistance ---------------------------------------------------------------------------


def _read_through(cache: RustCache, key: str) -> bool:
    """A get that stores on a miss, as a view would; True on a hit."""
    if cache.get(key) is None:
        cache.set(key, key)
        return False
    return True


@pytest.mark.parametrize("policy", ["s3fifo", "tinylfu", "lru"])
def test_hot_set_survives_a_scan_only_under_s3fifo_and_tinylfu(policy: str) -> None:
    """A crawler requests 40 times the capacity in one-time keys. Under "tinylfu" the hot keys
    are used again every 2,000 crawled keys: W-TinyLFU forgets counts as it ages its sketch, so
    keys left unused through dozens of capacities' worth of requests may go (S3-FIFO keeps them
    as long as nothing that is used pushes them out)."""
    cache = make(policy=policy, MAX_ENTRIES=500)
    hot = [f"hot{i}" for i in range(100)]
    for _ in range(3):
        for key in hot:
            _read_through(cache, key)
    for i in range(20_000):  # a crawler: 40 times the capacity in one-time keys
        _read_through(cache, f"crawl{i}")
        if policy == "tinylfu" and i % 2_000 == 1_999 and i < 19_999:
            for key in hot:
                _read_through(cache, key)
    kept = sum(cache.has_key(key) for key in hot)
    if policy != "lru":
        assert kept == len(hot)
        assert sum(_read_through(cache, key) for key in hot) == len(hot)
    else:
        assert kept == 0
    cache.clear()


# Concurrency -------------------------------------------------------------------------------


class CallsTheCache:
    """A value whose pickling reads and writes the cache: must not deadlock under eviction."""

    def __init__(self, cache: RustCache, n: int) -> None:
        self.cache = cache
        self.n = n

    def __reduce__(self) -> tuple[Any, ...]:
        self.cache.get(f"k{self.n % 7}")
        self.cache.set(f"side{self.n % 11}", self.n)
        return (int, (self.n,))


def test_threads_hammering_a_small_s3fifo_cache(s3: Callable[..., RustCache]) -> None:
    cap = 16
    cache = s3(MAX_ENTRIES=cap, MAX_BYTES=cap * 400)
    errors: list[BaseException] = []
    over: list[int] = []

    def worker(t: int) -> None:
        try:
            for i in range(3000):
                key = f"k{(i * 7 + t * 13) % 100}"
                op = i % 6
                if op == 0:
                    cache.delete(key)
                elif op in (1, 2):
                    cache.get(key)
                elif op == 3:
                    cache.set(key, CallsTheCache(cache, i))
                else:
                    cache.set(key, "v" * (i % 200), tags=[f"t{t}"])
                if len(cache._cache) > cap:
                    over.append(len(cache._cache))
                if i % 500 == 0:
                    cache.invalidate_tags([f"t{(t + 1) % 8}"])
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not any(th.is_alive() for th in threads), "deadlock: a thread never finished"
    assert errors == []
    assert over == [], f"more than {cap} entries: {max(over)}"
    assert cache.stats()["bytes"] <= cap * 400
    assert not cache._lock.locked()
    assert cache.get("k0", "miss") is not None


# The cache API under the policy ------------------------------------------------------------


def test_api_works_under_s3fifo(s3: Callable[..., RustCache]) -> None:
    cache = s3(MAX_ENTRIES=100)
    cache.set("a", {"x": [1, 2]}, tags=["t"])
    cache.set("b", 1, tags=["t", "u"])
    cache.set("c", 2, tags=["u"])
    value = cache.get("a")
    value["x"].append(3)
    assert cache.get("a") == {"x": [1, 2]}, "values come back as isolated copies"
    assert cache.invalidate_tags(["t"]) == 2
    assert cache.get("a") is None and cache.get("b") is None and cache.get("c") == 2
    assert cache.delete("c") and not cache.delete("c")
    assert cache.add("n", 1) and not cache.add("n", 5)
    assert cache.incr("n", 10) == 11
    assert cache.get_or_set("g", lambda: "computed") == "computed"
    assert cache.get_or_set("g", lambda: "again") == "computed"
    assert cache.touch("g", 100) and cache.ttl("g") > 99
    cache.set_many({f"m{i}": i for i in range(10)})
    assert cache.get_many(["m0", "m9", "zz"]) == {"m0": 0, "m9": 9}
    cache.delete_many(["m0", "m9"])
    assert cache.get_many(["m0", "m9"]) == {}
    assert sorted(cache.keys("m*")) == [f"m{i}" for i in range(1, 9)]
    assert cache.delete_pattern("m*") == 8
    cache.set("gone", 1, timeout=0)
    assert not cache.has_key("gone")
    cache.clear()
    assert len(cache._cache) == 0


def test_overwrite_of_a_live_key_keeps_one_entry(s3: Callable[..., RustCache]) -> None:
    cache = s3(MAX_ENTRIES=5)
    for i in range(5):
        cache.set(f"k{i}", i)
    for round_ in range(20):
        cache.set("k0", round_)
    assert len(cache._cache) == 5
    assert cache.stats()["evictions"] == 0
    assert cache.get("k0") == 19


def test_a_loop_over_more_keys_than_the_cache_keeps_hitting_only_under_tinylfu() -> None:
    """A batch job walking 1,200 keys in turn through 1,000 places: LRU evicts each key just
    before it is needed (no hits), S3-FIFO keeps about 62% of the requests hitting, W-TinyLFU
    holds on to a fixed set of keys (Belady's optimum: 1,000 of every 1,200)."""
    ratios = {}
    for policy in ("lru", "s3fifo", "tinylfu"):
        cache = make(policy=policy, MAX_ENTRIES=1_000)
        keys = [f"loop{i}" for i in range(1_200)]
        for key in keys:
            _read_through(cache, key)
        hits = sum(_read_through(cache, key) for _ in range(20) for key in keys)
        ratios[policy] = hits / (20 * len(keys))
        assert len(cache._cache) <= 1_000
        cache.clear()
    assert ratios["lru"] == 0.0, ratios
    assert ratios["tinylfu"] >= 0.75 and ratios["tinylfu"] > ratios["s3fifo"] + 0.1, ratios


def test_pickled_values_survive_eviction_rounds(s3: Callable[..., RustCache]) -> None:
    cache = s3(MAX_ENTRIES=20)
    payload = {"rows": list(range(50))}
    for i in range(500):
        cache.set(f"k{i}", payload)
        got = cache.get(f"k{i}")
        assert got == payload and got is not payload
    assert pickle.dumps(cache.get("k499")) == pickle.dumps(payload)


def test_hit_ratio_simulator_runs_and_its_bars_pass(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """benchmarks/hitratio.py at a tenth of its sizes: the table and PASS lines of the README."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "hitratio.py"
    spec = importlib.util.spec_from_file_location("hitratio", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "hitratio", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    assert module.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS") == 3 and "FAIL" not in out
    assert "| Zipf 1.0 + full scans |" in out


def test_early_refresh_works_under_s3fifo(s3: Callable[..., RustCache]) -> None:
    """get_or_set(early_refresh=...) reads whole entries through the S3-FIFO read path."""
    from tests.test_early_refresh import ALMOST_ONE, fake_timing

    cache = s3(MAX_ENTRIES=10, EARLY_REFRESH=1.0)
    fake_timing(cache, 10.0)
    cache._early_random = lambda: 0.0  # never early
    assert cache.get_or_set("k", lambda: "old", timeout=60) == "old"
    assert cache.get_or_set("k", lambda: "new", timeout=60) == "old"
    cache._early_random = lambda: ALMOST_ONE  # well inside the refresh window
    assert cache.get_or_set("k", lambda: "new", timeout=600) == "new"
    assert cache.get("k") == "new"
    assert len(cache._cache) == 1 and cache.stats()["evictions"] == 0


# Shards under "lru" --------------------------------------------------------------------------


def test_lru_cull_is_exact_up_to_65536_entries() -> None:
    """One shard: the cull takes exactly `len // CULL_FREQUENCY` of the least recently used."""
    cache = make(policy="lru", MAX_ENTRIES=65_536)
    for i in range(65_536):
        cache.set(f"k{i}", i)
    for i in range(0, 65_536, 2):
        assert cache.get(f"k{i}") == i  # the even keys become the most recently used
    cache.set("new", 1)
    assert cache.stats()["evictions"] == 65_536 // 3
    survivors = [i for i in range(1, 65_536, 2) if cache.has_key(f"k{i}")]
    assert survivors == list(range(2 * (65_536 // 3) + 1, 65_536, 2))


def test_lru_over_sixteen_shards_evicts_one_least_recently_used_entry_per_insert() -> None:
    """Above 65,536 MAX_ENTRIES a full store evicts one entry per insert (from the new key's
    shard, least recently used first) instead of culling a third: no insert's work grows with the
    store, the store stays at its bound, and no recently used key goes."""
    cache = make(policy="lru", MAX_ENTRIES=70_000)
    for i in range(70_000):
        cache.set(f"k{i}", i)
    for i in range(35_000):
        cache.get(f"k{i}")
    for i in range(1_000):
        cache.set(f"new{i}", i)
        assert cache.stats()["entries"] == 70_000
    assert cache.stats()["evictions"] == 1_000
    assert all(cache.has_key(f"k{i}") for i in range(35_000))
    assert all(cache.get(f"new{i}") == i for i in range(1_000))


@pytest.mark.parametrize("policy", ["lru", "s3fifo", "tinylfu"])
def test_incr_of_a_float_in_a_store_full_to_max_bytes_keeps_its_key(policy: str) -> None:
    """An incr that Python computes (a float) replaces the value it read, which gives its bytes
    back: it needs no room and evicts nothing. It used to reserve the whole new value, and a
    full store's victim was the key itself: 'Key not found' for a key that was there."""
    cache = make(policy, MAX_BYTES=4_000, MAX_ENTRIES=1_000)
    cache.set("k", 1.5)
    i = 0
    while cache.get("k") is not None and cache.stats()["bytes"] < 3_900 and i < 1_000:
        cache.set(f"x{i}", b"y" * 20)
        i += 1
    # Every other key used since: "k" is the least recently used.
    for j in range(i):
        cache.get(f"x{j}")
    evictions = cache.stats()["evictions"]
    assert cache.incr("k", 1) == 2.5
    assert cache.get("k") == 2.5
    assert cache.stats()["evictions"] == evictions
