# ruff: noqa: F811  (the fixtures imported from tests.test_near are used as parameters)
"""NearCache tags: versions in Redis under the tracked prefix, entries carrying the versions they
were built against, ``invalidate_tags`` bumping them for every process (issue 9 item 5)."""

from __future__ import annotations

import asyncio
import logging
import os
import time

import pytest
import redis

from django_rustcache import near as near_mod
from django_rustcache.signals import tags_invalidated
from tests.test_near import (  # noqa: F401 (fixtures)
    cache,
    fake,
    l1cache,
    listener,
    make,
    own_server,
)


def _tag_key(cache, tag):
    return f"{cache.key_prefix}:#t:{tag}"


def test_a_tagged_entry_is_a_miss_after_any_of_its_tags_is_invalidated(cache, raw):
    cache.set("a", {"x": 1}, tags=["t1", "t2"])
    cache.set("b", 2, tags=["t2"])
    cache.set("c", 3, tags=["t3"])
    cache.set("plain", 4)
    assert cache.get("a") == {"x": 1} and cache.get("b") == 2
    assert cache.invalidate_tags(["t2"]) == 1
    assert cache.get("a") is None and cache.get("b") is None
    assert cache.get("c") == 3 and cache.get("plain") == 4
    assert cache.get_many(["a", "b", "c", "plain"]) == {"c": 3, "plain": 4}
    cache.set("a", 5, tags=["t2"])  # built against the new version
    assert cache.get("a") == 5


def test_another_instance_sees_the_invalidation_through_redis(make, raw):
    writer = make()
    reader = make(KEY_PREFIX=writer.key_prefix)
    writer.set("k", "v", tags=["t"])
    assert reader.get("k") == "v"
    reader.invalidate_tags(["t"])
    assert writer.get("k") is None and reader.get("k") is None


def test_tag_versions_live_under_the_key_prefix_in_a_form_no_default_made_key_has(cache, raw):
    cache.set("k", 1, tags=["shop.product:1"])
    tag_key = _tag_key(cache, "shop.product:1").encode()
    assert raw.exists(tag_key)
    assert tag_key.startswith(f"{cache.key_prefix}:".encode())  # inside the BCAST prefix
    assert cache.keys("*") == ["k"]  # not a cache key of any version
    assert int(raw.get(tag_key)) > 0


def test_invalidate_tags_counts_distinct_tags_bumped_and_sends_the_signal(cache, raw):
    seen = []

    def receiver(sender, cache, tags, count, **kwargs):
        seen.append((sender, tags, count))

    tags_invalidated.connect(receiver)
    try:
        cache.set("k", 1, tags=["a"])
        before = int(raw.get(_tag_key(cache, "a")))
        assert cache.invalidate_tags(["a", "b", "a"]) == 2
        assert cache.invalidate_tags("a") == 1  # one str is one tag
        assert cache.invalidate_tags([]) == 0
    finally:
        tags_invalidated.disconnect(receiver)
    assert int(raw.get(_tag_key(cache, "a"))) == before + 2
    assert seen[0] == (near_mod.NearCache, ("a", "b", "a"), 2)
    assert [count for _, _, count in seen] == [2, 1, 0]


def test_an_evicted_tag_version_is_reseeded_randomly_so_old_entries_stay_misses(cache, raw):
    cache.set("k", "old", tags=["t"])
    tag_key = _tag_key(cache, "t")
    old_version = raw.get(tag_key)
    raw.delete(tag_key)  # as an eviction or FLUSH of that key would
    cache._h.clear()  # and the listener would drop it from L1
    assert cache.get("k") is None
    seeded = raw.get(tag_key)
    assert seeded not in (None, b"0", b"1", old_version)
    # A bump of a missing version seeds it too, never INCR from 0 to 1.
    raw.delete(tag_key)
    cache.invalidate_tags(["t"])
    assert raw.get(tag_key) not in (None, b"0", b"1", old_version, seeded)


def test_a_snapshot_that_moved_stores_nothing_and_drops_the_old_entry(cache, raw):
    cache.set("k", "old", tags=["t"])
    snapshot = cache.snapshot_tags(["t"])
    cache.invalidate_tags(["t"])
    cache.set("k", "computed-before-the-bump", tags=snapshot)
    assert cache.get("k") is None
    assert not raw.exists(f"{cache.key_prefix}:1:k")
    assert cache.add("k", "x", tags=snapshot) is False
    fresh = cache.snapshot_tags(["t"])
    cache.set("k", "new", tags=fresh)
    assert cache.get("k") == "new"


def test_get_or_set_returns_but_does_not_store_a_value_whose_tag_moved_while_computing(cache):
    def compute():
        cache.invalidate_tags(["t"])  # e.g. a save in another process, mid-computation
        return "computed"

    assert cache.get_or_set("k", compute, tags=["t"]) == "computed"
    assert cache.get("k") is None
    assert cache.get_or_set("k", lambda: "again", tags=["t"]) == "again"
    assert cache.get("k") == "again"
    assert cache.get_or_set("k", lambda: "not called", tags=["t"]) == "again"


def test_add_treats_an_entry_whose_tags_moved_as_absent(cache):
    cache.set("k", "old", tags=["t"])
    assert cache.add("k", "blocked") is False
    cache.invalidate_tags(["t"])
    assert cache.add("k", "new") is True
    assert cache.get("k") == "new"
    assert cache.add("k", "again", tags=["t"]) is False


def test_set_many_with_tags_and_integers_round_trip(cache):
    assert cache.set_many({"a": 1, "b": [2]}, tags=["t"]) == []
    assert cache.get_many(["a", "b"]) == {"a": 1, "b": [2]}
    cache.invalidate_tags(["t"])
    assert cache.get_many(["a", "b"]) == {}


def test_bad_tags_are_refused_before_anything_is_stored(cache, raw):
    with pytest.raises(TypeError):
        cache.set("k", 1, tags="one-str")
    with pytest.raises(TypeError):
        cache.set("k", 1, tags=[1])
    with pytest.raises(TypeError):
        cache.invalidate_tags([None])
    assert raw.dbsize() == 0


def test_l1_serves_a_tagged_hit_until_its_tag_version_is_invalidated(l1cache, raw):
    cache = l1cache()
    other = l1cache()  # another L1 writing to the same keys, as another process would
    cache.set("k", "v", tags=["t"])
    assert cache.get("k") == "v"
    before = cache.stats()
    assert cache.get("k") == "v"
    after = cache.stats()
    # The entry and its tag version both came from L1: nothing was read from Redis.
    assert (after["l2_hits"], after["misses"]) == (before["l2_hits"], before["misses"])
    assert after["l1_hits"] == before["l1_hits"] + 2
    other.key_prefix = cache.key_prefix
    assert other.invalidate_tags(["t"]) == 1
    # What the listener does when the tag version key changes in Redis:
    cache._h.invalidate_made([_tag_key(cache, "t")])
    assert cache.get("k") is None
    assert cache.get_or_set("k", "w", tags=["t"]) == "w"
    assert cache.get("k") == "w"


def test_async_tags(cache):
    async def run():
        await cache.aset("k", 1, tags=["t"])
        assert await cache.aget("k") == 1
        assert await cache.ainvalidate_tags(["t"]) == 1
        assert await cache.aget("k") is None
        assert await cache.aget_or_set("k", lambda: 2, tags=["t"]) == 2
        assert await cache.aget("k") == 2
        assert await cache.aset_many({"m": 1, "n": 2}, tags=["t2"]) == []
        assert await cache.aget_many(["m", "n"]) == {"m": 1, "n": 2}
        await cache.ainvalidate_tags(["t2"])
        assert await cache.aget_many(["m", "n"]) == {}

    asyncio.run(run())


# Forking while the listener thread runs is what this tests (gunicorn --preload does it).
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
@pytest.mark.parametrize("mode", ["tracking", "pubsub"])
def test_a_bump_in_a_forked_process_is_seen_by_the_parent(make, mode):
    cache = make(OPTIONS={"INVALIDATION": mode})
    cache.set("k", "v", tags=["t"])
    assert cache.get("k") == "v"
    assert cache.get("k") == "v"  # warm L1 (with the Rust listener)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            code = 0 if cache.invalidate_tags(["t"]) == 1 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    end = time.monotonic() + 10.0  # a bound on the wait, generous for a loaded machine
    while cache.get("k") is not None and time.monotonic() < end:
        time.sleep(0.01)
    assert cache.get("k") is None


def test_a_forged_tag_header_is_a_logged_miss_and_does_not_block_add(cache, raw, caplog):
    made = f"{cache.key_prefix}:1:k"
    cache.set("k", "v", tags=["t"])
    good = raw.get(made)
    for bad in (
        near_mod.TAGGED_MAGIC + b"zzzzzzzz" + good,
        near_mod.TAGGED_MAGIC + b"00000003" + b"{}x" + b"1",
        near_mod.TAGGED_MAGIC + b"00000004" + b"[1,2" + b"1",
    ):
        raw.set(made, bad)
        cache._h.clear()
        with caplog.at_level(logging.WARNING, logger="django_rustcache.near"):
            assert cache.get("k", "dflt") == "dflt"
        assert "bad tag header" in caplog.text
        assert cache.add("k", "added") is True  # an unreadable header counts as moved
        assert cache.get("k") == "added"


def test_a_junk_tag_version_is_reseeded_by_a_bump(cache, raw):
    cache.set("k", "v", tags=["t"])
    raw.set(_tag_key(cache, "t"), b"not a number")
    cache._h.clear()
    assert cache.get("k") is None
    assert cache.invalidate_tags(["t"]) == 1
    assert int(raw.get(_tag_key(cache, "t"))) > 1


def test_ignore_exceptions_covers_tags_and_stores_nothing_with_a_failed_snapshot(
    make, own_server, caplog
):
    cache = make(own_server.url, OPTIONS={"IGNORE_EXCEPTIONS": True, "socket_timeout": 1})
    cache.set("warm", "v")
    own_server.stop()
    with caplog.at_level(logging.WARNING, logger="django_rustcache.near"):
        assert cache.invalidate_tags(["t"]) == 0
        assert cache.set("k", 1, tags=["t"]) is None
        snapshot = cache.snapshot_tags(["t"])
        assert snapshot.versions == ((_tag_key(cache, "t"), ""),)
        assert cache.get_or_set("k", lambda: "computed", tags=["t"]) == "computed"
    assert "ignored" in caplog.text


def test_without_ignore_exceptions_tag_errors_are_raised(make, own_server):
    cache = make(own_server.url, OPTIONS={"socket_timeout": 1})
    cache.set("warm", "v")
    own_server.stop()
    for call in (
        lambda: cache.invalidate_tags(["t"]),
        lambda: cache.set("k", 1, tags=["t"]),
        lambda: cache.snapshot_tags(["t"]),
    ):
        with pytest.raises(redis.ConnectionError):
            call()


def test_get_many_answers_tagged_l1_hits_from_l1_and_rereads_moved_ones(l1cache, raw):
    cache = l1cache()
    cache.set_many({"a": 1, "b": 2}, tags=["ta"])
    cache.set("c", 3, tags=["tc"])
    cache.set("plain", 4)
    before = cache.stats()
    assert cache.get_many(["a", "b", "c", "plain", "none"]) == {"a": 1, "b": 2, "c": 3, "plain": 4}
    after = cache.stats()
    assert after["l2_hits"] == before["l2_hits"]  # every hit, tagged or not, from L1
    cache.invalidate_tags(["ta"])
    assert cache.get_many(["a", "b", "c", "plain"]) == {"c": 3, "plain": 4}
    cache.set("a", 5, tags=["ta"])
    assert asyncio.run(cache.aget_many(["a", "b", "c"])) == {"a": 5, "c": 3}


def test_has_key_touch_ttl_and_incr_see_an_entry_whose_tag_moved_as_missing(cache, raw):
    # RustCache drops such an entry at once; in Redis it stays until overwritten or expired, so
    # every operation that answers from Redis must check its versions, not just get().
    cache.set("k", {"v": 1}, timeout=100, tags=["t"])
    cache.set("n", 5, timeout=100, tags=["t"])
    assert cache.has_key("k") and 99 < cache.ttl("k") <= 100
    cache.invalidate_tags(["t"])
    assert cache.get("k") is None
    assert cache.has_key("k") is False
    assert cache.ttl("k") == 0
    assert cache.touch("k", 500) is False
    with pytest.raises(ValueError):
        cache.incr("n")
    with pytest.raises(ValueError):
        cache.decr("n")
    assert raw.pttl(cache.make_key("k")) <= 100_000  # touch left it alone


def test_incr_of_a_tagged_integer_keeps_its_tags_and_ttl(cache, raw):
    cache.set("n", 5, timeout=100, tags=["t"])
    assert cache.incr("n") == 6
    assert cache.decr("n", 10) == -4
    assert cache.get("n") == -4
    assert 99 < cache.ttl("n") <= 100
    cache.invalidate_tags(["t"])
    assert cache.get("n") is None  # still carries the tag


def test_incr_of_a_tagged_non_integer_raises_and_changes_nothing(cache, raw):
    cache.set("s", "text", tags=["t"])
    before = raw.get(cache.make_key("s"))
    with pytest.raises(Exception):  # noqa: B017 (Django's RedisCache raises redis' error too)
        cache.incr("s")
    assert raw.get(cache.make_key("s")) == before and cache.get("s") == "text"


def test_has_key_of_a_key_holding_another_redis_type_is_true(cache, raw):
    raw.hset(cache.make_key("h"), "f", "v")  # written by another client
    assert cache.has_key("h") is True
