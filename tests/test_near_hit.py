"""NearCache's L1 hit answered in Rust: on the hot path ``get`` is the L1 handle's ``near_get``
(a ``FastMethod`` slot, no Python frame per hit) and ``aget`` reads L1 with one call into Rust
(``near_peek``). Only what L1 may serve is answered there (the lease fresh in this process, the
key present, no tags to check); everything else goes through Python, as before.

These run against our own redis-server and valkey-server (tests/servers.py), with the Rust
listener.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time
import uuid
import warnings
import weakref
from typing import Any
from unittest import mock

import pytest
from django.core.cache.backends.base import CacheKeyWarning, default_key_func

from django_rustcache import NearCache, _core
from django_rustcache import near as near_mod
from django_rustcache._core import FastMethod, Handle


@pytest.fixture
def make(near_server):
    """``make(cls=NearCache, **params)``: a NearCache with an L1 of its own (by KEY_PREFIX)."""

    def make(cls: type[NearCache] = NearCache, **params: Any) -> NearCache:
        params.setdefault("KEY_PREFIX", f"hit-{uuid.uuid4().hex[:12]}")
        return cls(near_server.url, params)

    return make


def warm(cache: NearCache) -> None:
    """Start the listener and wait for its lease."""
    cache._near.ensure_started()
    assert cache._near.wait_fresh(10.0), cache._near.stats()


def l1_holds(cache: NearCache, key: Any, version: Any = None) -> Any:
    """Read ``key`` until L1 serves it; returns the value."""
    deadline = time.monotonic() + 10
    while True:
        hits = cache.stats()["l1_hits"]
        value = cache.get(key, version=version)
        if cache.stats()["l1_hits"] > hits:
            return value
        assert time.monotonic() < deadline, "L1 never served the key"
        time.sleep(0.002)


def put(cache: NearCache, key: Any, value: Any, **kwargs: Any) -> None:
    """``set``, then wait until L1 serves the key: the listener hears of this process's own
    write too, and that invalidation drops the copy the write put in L1."""
    before = cache._near.stats()["invalidations"]
    cache.set(key, value, **kwargs)
    deadline = time.monotonic() + 10
    while cache._near.stats()["invalidations"] == before:
        assert time.monotonic() < deadline, "the write's invalidation never came"
        time.sleep(0.002)
    l1_holds(cache, key, kwargs.get("version"))


def python_calls(fn: Any, *args: Any) -> tuple[Any, list[str]]:
    """``fn(*args)`` and the names of the Python functions it ran (sys.setprofile)."""
    names: list[str] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            names.append(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        result = fn(*args)
    finally:
        sys.setprofile(None)
    return result, names


def is_rust_get(cache: NearCache) -> bool:
    fast = cache.__dict__.get("_fast_get")
    return (
        fast is not None
        and getattr(fast, "__self__", None) is cache._fast
        and fast.__name__ == "near_get"
        and cache.get == fast
    )


def test_an_l1_hit_runs_no_python_code(make):
    cache = make()
    assert is_rust_get(cache)
    warm(cache)
    put(cache, "k", {"a": [1, 2]})
    before = cache.stats()
    value, calls = python_calls(cache.get, "k")
    assert value == {"a": [1, 2]}
    assert calls == []  # not even NearCache.get: the handle's method answered
    after = cache.stats()
    assert after["l1_hits"] == before["l1_hits"] + 1
    assert (after["l2_hits"], after["misses"]) == (before["l2_hits"], before["misses"])
    # Isolated copies, as before.
    value["a"].append(3)
    assert cache.get("k") == {"a": [1, 2]}
    assert cache.get("k") is not cache.get("k")
    # Django's signature: keywords, the very default object on a miss (from Redis).
    marker = object()
    assert cache.get(key="k", version=None) == {"a": [1, 2]}
    assert cache.get("missing", marker) is marker
    assert cache.get("missing", default=marker) is marker
    assert cache.stats()["misses"] == before["misses"] + 2


def test_a_miss_goes_to_redis_and_fills_l1(make, raw):
    cache = make()
    warm(cache)
    made = f"{cache.key_prefix}:1:k"
    before = cache._near.stats()["invalidations"]
    raw.set(made, cache._encode(made, {"from": "redis"}))
    while cache._near.stats()["invalidations"] == before:
        time.sleep(0.002)
    assert cache.get("k") == {"from": "redis"}
    assert cache.stats()["l2_hits"] == 1
    _, calls = python_calls(cache.get, "k")
    assert calls == []  # the fill made the next read an L1 hit
    assert cache.stats()["l1_hits"] == 1


def test_other_versions_and_a_stored_none(make):
    cache = make()
    warm(cache)
    put(cache, "k", None)
    put(cache, "k", "two", version=2)
    assert python_calls(cache.get, "k", "dflt") == (None, [])
    assert python_calls(cache.get, "k", None, 2) == ("two", [])
    assert cache.get("k", version=3) is None


def test_a_stopped_listener_means_redis_answers(make, raw):
    cache = make()
    warm(cache)
    made = f"{cache.key_prefix}:1:k"
    put(cache, "k", "v1")
    assert python_calls(cache.get, "k") == ("v1", [])
    cache._near.close()  # no lease: nothing says L1 is still right
    raw.set(made, cache._encode(made, "v2"))  # no listener to hear of it
    hits = cache.stats()["l1_hits"]
    assert cache.get("k") == "v2"
    assert cache.stats()["l1_hits"] == hits
    # That read started the listener again (the Python rest of get does); L1 serves once fresh.
    assert cache._near.wait_fresh(10.0)
    assert l1_holds(cache, "k") == "v2"
    assert python_calls(cache.get, "k") == ("v2", [])


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_does_not_serve_the_parents_l1(make):
    cache = make()
    warm(cache)
    put(cache, "k", "parent")
    assert python_calls(cache.get, "k") == ("parent", [])
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running pytest's teardown
        code = 1
        try:
            hits = cache.stats()["l1_hits"]
            value = cache.get("k")
            stats = cache.stats()
            ok = value == "parent" and stats["l1_hits"] == hits and stats["l2_hits"] == 1
            # The child's own listener then lets L1 serve again.
            ok = ok and cache._near.wait_fresh(10.0) and l1_holds(cache, "k") == "parent"
            os.write(w, str(int(ok)).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    report = os.read(r, 10).decode()
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert report == "1"
    assert python_calls(cache.get, "k") == ("parent", [])


def test_stale_if_error_keeps_get_in_python(make):
    cache = make(OPTIONS={"STALE_IF_ERROR": 5})
    assert "_fast_get" not in cache.__dict__ and "_probe" not in cache.__dict__
    warm(cache)
    cache.set("k", "v")
    value, calls = python_calls(cache.get, "k")
    assert value == "v" and "get" in calls


def test_a_fake_listener_keeps_get_in_python(make, monkeypatch):
    monkeypatch.setattr(near_mod, "LISTENER_FACTORY", lambda *a, **k: near_mod._NoListener())
    cache = make()
    assert "_fast_get" not in cache.__dict__
    cache.set("k", "v")
    assert cache.get("k") == "v"
    assert cache.stats()["l2_hits"] == 1


def test_tagged_entries_go_through_python_and_honour_invalidation(make):
    cache = make()
    warm(cache)
    cache.set("k", {"v": 1}, tags=["t"])
    value, calls = python_calls(cache.get, "k")
    assert value == {"v": 1} and "_get_rest" in calls
    assert cache.invalidate_tags(["t"]) == 1
    assert cache.get("k", "gone") == "gone"

    async def aread() -> Any:
        return await cache.aget("k", "gone")

    cache.set("k", {"v": 2}, tags=["t"])
    assert asyncio.run(aread()) == {"v": 2}
    cache.invalidate_tags(["t"])
    assert asyncio.run(aread()) == "gone"


def test_aget_answers_an_l1_hit_with_one_call_into_rust(make):
    cache = make()
    probe = cache.__dict__.get("_probe")
    assert probe is not None and probe.__self__ is cache._fast and probe.__name__ == "near_peek"
    warm(cache)
    put(cache, "k", [1])

    async def scenario() -> list[Any]:
        return [await cache.aget("k"), await cache.aget("missing", "d")]

    hits = cache.stats()["l1_hits"]
    assert asyncio.run(scenario()) == [[1], "d"]
    assert cache.stats()["l1_hits"] == hits + 1


def test_get_many_reads_l1_with_one_call_into_rust(make, raw):
    cache = make()
    warm(cache)
    put(cache, "a", 1)
    put(cache, "b", {"x": 1})
    put(cache, "t", "tagged", tags=["tag"])
    made = f"{cache.key_prefix}:1:r"
    raw.set(made, cache._encode(made, "from redis"))  # in Redis only
    before = cache.stats()
    got, calls = python_calls(cache.get_many, ["a", "b"])
    assert got == {"a": 1, "b": {"x": 1}}
    # No key made in Python, no per-key L1 read from Python.
    assert not {"make_key", "make_and_validate_key", "get"} & set(calls), calls
    assert cache.stats()["l1_hits"] == before["l1_hits"] + 2
    # A miss (from Redis), a tagged hit (checked), a key nowhere.
    got = cache.get_many(["r", "a", "t", "nowhere", "b"])
    assert got == {"r": "from redis", "a": 1, "t": "tagged", "b": {"x": 1}}
    cache.invalidate_tags(["tag"])
    assert cache.get_many(["t", "a"]) == {"a": 1}
    # Keys that make the same made key count once, under the last (as Django's RedisCache).
    put(cache, 1, "one")
    assert cache.get_many([1, "1"]) == {"1": "one"}
    assert cache.get_many(["1", 1]) == {1: "one"}
    # A generator, another version, nothing at all.
    assert cache.get_many(k for k in ("a", "b")) == {"a": 1, "b": {"x": 1}}
    assert cache.get_many(["a"], version=2) == {}
    assert cache.get_many([]) == {}

    async def amany() -> Any:
        return await cache.aget_many(["a", "nowhere"])

    assert asyncio.run(amany()) == {"a": 1}


def test_get_many_with_the_lease_out_reads_redis(make, raw):
    cache = make()
    warm(cache)
    put(cache, "a", "v1")
    cache._near.close()
    made = f"{cache.key_prefix}:1:a"
    raw.set(made, cache._encode(made, "v2"))  # unheard: no listener
    hits = cache.stats()["l1_hits"]
    assert cache.get_many(k for k in ["a"]) == {"a": "v2"}
    assert cache.stats()["l1_hits"] == hits


def test_key_warnings_and_errors_are_djangos(make):
    cache = make()
    warm(cache)
    with pytest.warns(CacheKeyWarning, match="characters that will cause errors"):
        assert cache.get("a b", "d") == "d"
    with pytest.warns(CacheKeyWarning, match="longer than"):
        cache.get("x" * 300)
    with pytest.warns(CacheKeyWarning, match="characters that will cause errors"):
        assert cache.get_many(["a b"]) == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.set("ok", 1)
        assert cache.get("ok") == 1
        assert cache.get_many(["ok"]) == {"ok": 1}


def test_key_prefix_version_and_key_func_assigned_on_a_live_instance(make):
    cache = make()
    warm(cache)
    put(cache, "k", "v1")
    cache.version = 2
    assert is_rust_get(cache)
    assert cache.get("k") is None
    put(cache, "k", "v2")
    assert python_calls(cache.get, "k") == ("v2", [])
    assert cache.get("k", version=1) == "v1"
    cache.version = 1
    assert l1_holds(cache, "k") == "v1"
    assert python_calls(cache.get, "k") == ("v1", [])
    old = cache.key_prefix
    cache.key_prefix = old + "-other"
    assert cache.get("k") is None
    cache.key_prefix = old
    assert l1_holds(cache, "k") == "v1"
    assert python_calls(cache.get, "k") == ("v1", [])

    def custom(key: Any, key_prefix: str, version: Any) -> str:
        return default_key_func(key, key_prefix, version)

    cache.key_func = custom
    assert "_fast_get" not in cache.__dict__ and "_probe" not in cache.__dict__
    value, calls = python_calls(cache.get, "k")
    assert value == "v1" and "custom" in calls
    cache.key_func = default_key_func
    assert is_rust_get(cache)


def test_a_key_prefix_or_key_function_outside_what_the_listener_tracks_reads_redis(make, raw):
    """The listener tracks the KEY_PREFIX of the instance's setup: assigned another on a live
    instance, its keys' changes are not heard of, so L1 must not serve them (it did, for up to
    L1_MAX_TTL)."""
    cache = make()
    warm(cache)
    old = cache.key_prefix
    cache.key_prefix = old + "-other"
    assert "_fast_get" not in cache.__dict__
    cache.set("k", "v1")
    assert cache.get("k") == "v1" and cache.get("k") == "v1"
    made = f"{old}-other:1:k"
    raw.set(made, cache._encode(made, "v2"))  # not under the tracked prefix: never heard of
    assert cache.get("k") == "v2"
    assert cache.get_many(["k"]) == {"k": "v2"}
    assert cache.stats()["l1_hits"] == 0
    cache.key_prefix = old + ":sub"  # still inside the tracked namespace
    assert is_rust_get(cache)
    cache.key_prefix = old
    assert is_rust_get(cache)

    def custom(key: Any, key_prefix: str, version: Any) -> str:
        return f"elsewhere:{key}"

    cache.key_func = custom
    cache.set("k", "v3")
    raw.set("elsewhere:k", cache._encode("elsewhere:k", "v4"))
    assert cache.get("k") == "v4" and cache.stats()["l1_hits"] == 0


def test_mocks_and_subclasses_still_win(make):
    cache = make()
    warm(cache)
    cache.set("k", "real")
    with mock.patch.object(cache, "get", return_value="instance mock"):
        assert cache.get("k") == "instance mock"
    assert cache.get("k") == "real"
    with mock.patch.object(NearCache, "get", return_value="class mock"):
        assert cache.get("k") == "class mock"
    assert isinstance(NearCache.__dict__["get"], FastMethod)
    assert cache.get("k") == "real"

    calls = []

    class Logged(NearCache):
        def get(self, key: Any, default: Any = None, version: Any = None) -> Any:
            calls.append(key)
            return super().get(key, default, version)

    sub = make(Logged)
    sub.set("k", [1])
    assert sub.get("k") == [1] and sub.get("nope", 0) == 0
    assert calls == ["k", "nope"]

    class OwnKeys(NearCache):
        def make_key(self, key: Any, version: Any = None) -> str:
            return super().make_key(f"own-{key}", version)

    own = make(OwnKeys)
    assert "_fast_get" not in own.__dict__
    own.set("k", 2)
    assert own.get("k") == 2
    assert own._client().get(f"{own.key_prefix}:1:own-k") == b"2"


def test_a_nearcache_is_collected(make):
    cache = make()
    warm(cache)
    cache.set("k", 1)
    assert cache.get("k") == 1 and cache.get("missing") is None
    assert is_rust_get(cache)
    ref = weakref.ref(cache)
    gc.disable()
    try:
        del cache
        # The cycle instance -> near_get -> handle -> _get_rest -> instance is real...
        assert ref() is not None
    finally:
        gc.enable()
    # ...and the collector breaks it (Handle traverses and clears what it holds).
    gc.collect()
    assert ref() is None


# The handle's side, without NearCache -------------------------------------------------------


def _handle() -> Handle:
    h = Handle(f"near-get-{uuid.uuid4().hex}", object(), lambda key: None)
    h.configure("p", 1, None, False)
    return h


class _Tag:
    pass


def test_near_get_needs_an_attached_near_and_a_callable_fallback():
    h = _handle()
    with pytest.raises(TypeError, match="no NearCache"):
        h.near_get("k")
    with pytest.raises(TypeError, match="no NearCache"):
        h.near_peek("k")
    near = _core.near(
        f"near-get-{uuid.uuid4().hex}",
        host="127.0.0.1",
        port=1,
        unix_path=None,
        username=None,
        password=None,
        prefix="",
        lease=0.5,
        mode="bcast",
        channel="",
        connect_timeout=0.1,
    )
    with pytest.raises(TypeError, match="callable"):
        h.near_attach(near, _Tag, object(), object(), 42)


def test_the_fallback_runs_with_no_borrow_of_the_handle_held():
    """A fallback that re-configures the handle (as a KEY_PREFIX assignment does) works."""
    h = _handle()
    miss, stale = object(), object()
    seen = []

    def fallback(key: Any, default: Any, version: Any, found: Any) -> Any:
        seen.append((key, default, version, found))
        h.configure("q", 1, None, False)
        h.near_detach()
        return "from fallback"

    near = _core.near(
        f"near-get-{uuid.uuid4().hex}",
        host="127.0.0.1",
        port=1,  # nothing listens: the lease is never fresh
        unix_path=None,
        username=None,
        password=None,
        prefix="",
        lease=0.5,
        mode="bcast",
        channel="",
        connect_timeout=0.1,
    )
    h.near_attach(near, _Tag, miss, stale, fallback)
    assert h.near_get("k", "d", 3) == "from fallback"
    assert seen == [("k", "d", 3, stale)]
    assert h.near_attach(near, _Tag, miss, stale, fallback) is None
    assert h.near_peek("k") is stale
