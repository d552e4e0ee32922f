"""NearCache against real servers: our own redis-server and valkey-server (tests/servers.py).

Every test runs on both servers. The L1 listener is the Rust one when the native module has it;
these tests also run (and must pass) with no listener, where every read goes to Redis.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import time

import pytest
import redis
from django.core.cache.backends.redis import RedisCache
from django.core.exceptions import ImproperlyConfigured

from django_rustcache import NearCache, _core
from django_rustcache import near as near_mod
from tests import servers

LISTENERS = ["none"] + (["rust"] if hasattr(_core, "near") else [])


@pytest.fixture(params=LISTENERS)
def listener(request, monkeypatch):
    """Which listener NearCache gets: none (every read goes to Redis) or the Rust one."""
    if request.param == "none":
        monkeypatch.setattr(near_mod, "LISTENER_FACTORY", lambda *a, **k: near_mod._NoListener())
    return request.param


_made = 0


@pytest.fixture
def make(near_server, raw, listener):
    """``make(**params)``: a NearCache on the test server; each call its own L1 (by KEY_PREFIX)."""

    def make(location=None, **params):
        global _made
        _made += 1
        params.setdefault("KEY_PREFIX", f"t{_made}")
        return NearCache(location or near_server.url, params)

    return make


@pytest.fixture
def cache(make):
    return make()


def django_redis(url, **params):
    return RedisCache(url, params)


# The Django contract ----------------------------------------------------------------------


def test_set_get_delete_and_has_key_go_through_redis(cache, raw):
    cache.set("k", {"a": [1, 2]})
    assert cache.get("k") == {"a": [1, 2]}
    assert raw.exists(f"{cache.key_prefix}:1:k") == 1
    assert cache.has_key("k") is True
    assert cache.delete("k") is True
    assert cache.delete("k") is False
    assert cache.has_key("k") is False
    assert cache.get("k", "dflt") == "dflt"


def test_a_stored_none_is_a_hit_and_a_miss_returns_the_very_default(cache):
    sentinel = object()
    cache.set("none", None)
    assert cache.get("none", sentinel) is None
    assert cache.get("absent", sentinel) is sentinel


def test_values_come_back_as_isolated_copies(cache):
    value = {"list": [1]}
    cache.set("k", value)
    value["list"].append(2)
    got = cache.get("k")
    got["list"].append(3)
    assert cache.get("k") == {"list": [1]}


def test_add_is_decided_by_redis_not_by_this_process(cache, raw):
    assert cache.add("k", "first") is True
    assert cache.add("k", "second") is False
    raw.delete(f"{cache.key_prefix}:1:k")  # another process deletes it
    assert cache.add("k", "third") is True
    assert cache.get("k") == "third"


def test_add_and_set_with_timeout_zero_store_nothing(cache):
    cache.set("k", "v", 0)
    assert cache.get("k") is None
    assert cache.add("k2", "v", 0) is True
    assert cache.get("k2") is None
    cache.set("k3", "v", -1)
    assert cache.has_key("k3") is False


def test_integers_are_stored_raw_so_incr_is_redis_incr(cache, raw):
    made = f"{cache.key_prefix}:1:n"
    cache.set("n", 5)
    assert raw.get(made) == b"5"
    assert cache.incr("n") == 6
    assert cache.decr("n", 10) == -4
    raw.incrby(made, 100)  # another process
    assert cache.incr("n", 0) == 96
    assert cache.get("n") == 96


def test_incr_of_a_missing_key_raises_and_creates_nothing(cache):
    with pytest.raises(ValueError, match="not found"):
        cache.incr("missing")
    assert cache.has_key("missing") is False


def test_incr_of_a_pickled_value_raises_redis_response_error_like_django(cache):
    cache.set("s", "text")
    with pytest.raises(redis.ResponseError):
        cache.incr("s")


def test_incr_keeps_the_redis_ttl(cache):
    cache.set("n", 1, 100)
    cache.incr("n")
    assert 99 < cache.ttl("n") <= 100


def test_touch_is_decided_by_redis(cache, raw):
    assert cache.touch("missing", 10) is False
    cache.set("k", "v", 100)
    assert cache.touch("k", 5) is True
    assert 4 < cache.ttl("k") <= 5
    assert cache.touch("k", None) is True
    assert cache.ttl("k") is None
    assert cache.touch("k", None) is True  # a persistent key still exists: True (not PERSIST's 0)
    assert cache.touch("k", 0) is True
    assert cache.has_key("k") is False


def test_ttl_follows_django_redis_conventions(cache):
    cache.set("forever", 1, None)
    cache.set("short", 1, 30)
    assert cache.ttl("forever") is None
    assert 29 < cache.ttl("short") <= 30
    assert cache.ttl("absent") == 0


def test_a_fractional_timeout_expires_in_redis(cache):
    cache.set("k", "v", 0.3)
    assert cache.get("k") == "v"
    time.sleep(0.5)
    assert cache.get("k") is None


def test_many_operations(cache, raw):
    assert cache.set_many({"a": 1, "b": [2], "c": "3"}, 100) == []
    assert cache.get_many(["a", "b", "c", "d"]) == {"a": 1, "b": [2], "c": "3"}
    assert 99 < raw.pttl(f"{cache.key_prefix}:1:b") / 1000 <= 100
    cache.delete_many(["a", "b"])
    assert cache.get_many(["a", "b", "c"]) == {"c": "3"}
    assert cache.set_many({}) == []
    cache.delete_many([])


def test_get_many_reads_more_than_one_chunk(cache):
    data = {f"k{i}": i for i in range(2500)}
    cache.set_many(data)
    assert cache.get_many(list(data) + ["absent"]) == data


def test_get_or_set_adds_through_redis_and_returns_what_redis_holds(cache, raw):
    assert cache.get_or_set("k", lambda: "computed") == "computed"
    assert cache.get_or_set("k", lambda: "other") == "computed"
    raw.set(f"{cache.key_prefix}:1:k2", 7)  # another process got there first
    assert cache.get_or_set("k2", "mine") == 7


def test_versions_and_incr_version(cache):
    cache.set("k", "v1", version=1)
    cache.set("k", "v2", version=2)
    assert cache.get("k", version=1) == "v1"
    assert cache.get("k", version=2) == "v2"
    assert cache.incr_version("k", version=2) == 3
    assert cache.get("k", version=3) == "v2"
    assert cache.get("k", version=2) is None


def test_clear_is_flushdb(cache, near_server, raw):
    other_db = redis.Redis.from_url(near_server.url_db(1))
    other_db.set("elsewhere", 1)
    raw.set("foreign", 1)
    cache.set("k", "v")
    cache.clear()
    assert raw.dbsize() == 0
    assert cache.get("k") is None
    assert other_db.get("elsewhere") == b"1"
    other_db.flushdb()
    other_db.close()


def test_stats_count_redis_hits_and_misses(cache):
    cache.set("k", "v")
    before = cache.stats()
    cache.get("absent")
    after = cache.stats()
    assert after["misses"] == before["misses"] + 1
    for key in ("l1_hits", "l2_hits", "misses", "l1", "listener"):
        assert key in after
    assert {"connected", "lease_ok", "invalidations"} <= set(after["listener"])


def test_stats_give_the_lag_of_the_invalidation_of_this_process_own_write(cache, listener):
    stats = cache.stats()["listener"]
    assert stats["last_invalidation_lag_ms"] is None
    assert stats["invalidation_lags_measured"] == 0
    cache._near.ensure_started()
    assert cache._near.wait_fresh(5.0) == (listener == "rust")
    t0 = time.monotonic()
    cache.set("k", {"v": 1})
    cache.set_many({"a": 1, "b": 2})
    if listener == "none":
        assert cache.stats()["listener"]["last_invalidation_lag_ms"] is None
        return
    deadline = time.monotonic() + 5
    while cache.stats()["listener"]["invalidation_lags_measured"] < 3:
        assert time.monotonic() < deadline, cache.stats()
        time.sleep(0.002)
    stats = cache.stats()["listener"]
    assert 0 < stats["last_invalidation_lag_ms"] <= (time.monotonic() - t0) * 1000
    assert 0 <= stats["last_invalidation_age_ms"] <= (time.monotonic() - t0) * 1000
    assert cache._near.applied_ns(cache.make_key("k")) is not None


# keys / iter_keys / delete_pattern: SCAN, never KEYS ----------------------------------------


def _command_calls(raw, name):
    return raw.info("commandstats").get(f"cmdstat_{name}", {}).get("calls", 0)


def test_keys_and_delete_pattern_use_scan_within_the_namespace(make, raw):
    cache = make(KEY_PREFIX="pre*[x]")
    neighbour = make(KEY_PREFIX="pre")
    for i in range(30):
        cache.set(f"user:{i}", i)
        neighbour.set(f"user:{i}", i)
    cache.set("user:0", "v2", version=2)
    raw.config_resetstat()
    assert sorted(cache.keys("user:1*")) == ["user:1"] + [f"user:{i}" for i in range(10, 20)]
    assert sorted(cache.iter_keys("user:2?")) == [f"user:{i}" for i in range(20, 30)]
    assert cache.keys("user:0", version=2) == ["user:0"]
    assert cache.delete_pattern("user:1*") == 11
    assert cache.keys("user:1*") == []
    assert len(neighbour.keys("user:*")) == 30  # the glob chars of the prefix matched literally
    assert _command_calls(raw, "scan") > 0
    assert _command_calls(raw, "keys") == 0


# Storage format and signing ---------------------------------------------------------------

_CALLS: list[str] = []


def _record(tag):
    _CALLS.append(tag)
    return tag


class Recorder:
    """Unpickling this calls ``_record``: proof that a pickle was (or was not) loaded."""

    def __reduce__(self):
        return (_record, ("unpickled",))


def test_unsigned_mode_reads_what_django_rediscache_wrote_and_vice_versa(make, near_server):
    django = django_redis(near_server.url, KEY_PREFIX="shared")
    cache = make(KEY_PREFIX="shared", OPTIONS={"SIGNED": False})
    django.set("from_django", {"x": 1})
    django.set("int_from_django", 41)
    assert cache.get("from_django") == {"x": 1}
    assert cache.incr("int_from_django") == 42
    cache.set("from_near", ["y"])
    cache.set("int_from_near", 7)
    assert django.get("from_near") == ["y"]
    assert django.incr("int_from_near") == 8
    assert django.get_many(["from_near", "int_from_near"]) == {
        "from_near": ["y"],
        "int_from_near": 8,
    }


def test_signed_values_are_marked_and_bound_to_their_key(cache, raw):
    cache.set("k", {"secret": 1})
    stored = raw.get(f"{cache.key_prefix}:1:k")
    assert stored.startswith(near_mod.SIGNED_MAGIC)
    # Copied under another key by someone with write access: the signature does not match.
    raw.set(f"{cache.key_prefix}:1:other", stored)
    assert cache.get("other", "miss") == "miss"
    cache.set("n", 12)
    assert raw.get(f"{cache.key_prefix}:1:n") == b"12"  # ints stay raw, so INCR works


def test_a_forged_signature_is_a_logged_miss_and_is_never_unpickled(cache, raw, caplog):
    made = f"{cache.key_prefix}:1:k"
    payload = pickle.dumps(Recorder())
    _CALLS.clear()
    raw.set(made, near_mod.SIGNED_MAGIC + b"\x00" * 32 + payload)
    with caplog.at_level(logging.WARNING, logger="django_rustcache.near"):
        assert cache.get("k", "miss") == "miss"
        assert cache.get_many(["k"]) == {}
    raw.set(made, payload)  # an unsigned pickle in a SIGNED cache
    with caplog.at_level(logging.WARNING, logger="django_rustcache.near"):
        assert cache.get("k", "miss") == "miss"
    assert _CALLS == []
    assert "signature does not verify" in caplog.text
    assert "not signed" in caplog.text
    assert cache.stats()["bad_signatures"] >= 3
    # The same bytes ARE unpickled by an unsigned cache: the recorder can tell.
    unsigned = NearCache(
        cache._options.location, {"KEY_PREFIX": cache.key_prefix, "OPTIONS": {"SIGNED": False}}
    )
    assert unsigned.get("k") == "unpickled"
    assert _CALLS == ["unpickled"]


def test_signed_values_verify_with_secret_key_fallbacks(cache, settings, raw):
    made = f"{cache.key_prefix}:1:k"
    raw.set(made, cache._encode(made, "v"))  # signed with the old SECRET_KEY
    old = settings.SECRET_KEY
    settings.SECRET_KEY = "a-new-secret"
    assert cache.get("k", "miss") == "miss"
    settings.SECRET_KEY_FALLBACKS = [old]
    assert cache.get("k") == "v"


def test_a_signed_value_is_not_readable_by_django_rediscache(make, near_server):
    cache = make(KEY_PREFIX="shared")
    cache.set("k", {"x": 1})
    with pytest.raises(pickle.UnpicklingError):
        django_redis(near_server.url, KEY_PREFIX="shared").get("k")


# Failures ---------------------------------------------------------------------------------


@pytest.fixture
def own_server(near_server):
    """A server of the same kind just for this test (it gets stopped)."""
    server = servers.start(near_server.kind)
    yield server
    server.cleanup()


def test_ignore_exceptions_turns_a_stopped_server_into_misses_and_false(make, own_server, caplog):
    cache = make(own_server.url, OPTIONS={"IGNORE_EXCEPTIONS": True, "socket_timeout": 1})
    cache.set("warm", "v")  # connected; "k" is not in L1, whatever the lease
    own_server.stop()
    with caplog.at_level(logging.WARNING, logger="django_rustcache.near"):
        assert cache.get("k", "dflt") == "dflt"
        assert cache.get_many(["k"]) == {}
        assert cache.set("k", "v") is None
        assert cache.add("k", "v") is False
        assert cache.set_many({"a": 1, "b": 2}) == ["a", "b"]
        assert cache.delete("k") is False
        assert cache.has_key("k") is False
        assert cache.touch("k") is False
        assert cache.ttl("k") == 0
        cache.delete_many(["k"])
        cache.clear()
    assert "ignored" in caplog.text
    assert cache.stats()["errors_ignored"] >= 10
    with pytest.raises(redis.ConnectionError):
        cache.incr("k")  # no number to invent


def test_without_ignore_exceptions_errors_are_raised_like_django_rediscache(make, own_server):
    cache = make(own_server.url, OPTIONS={"socket_timeout": 1})
    cache.set("warm", "v")  # connected; "k" is not in L1, whatever the lease
    own_server.stop()
    for call in (
        lambda: cache.get("k"),
        lambda: cache.set("k", "v"),
        lambda: cache.add("k", "v"),
        lambda: cache.delete("k"),
        lambda: cache.get_many(["k"]),
        lambda: cache.clear(),
    ):
        with pytest.raises(redis.ConnectionError):
            call()


def test_a_pickling_error_is_raised_before_redis_is_touched(cache, raw):
    with pytest.raises((pickle.PicklingError, TypeError, AttributeError)):
        cache.set("k", lambda: 1)
    assert raw.dbsize() == 0


# Options ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"MAX_ENTRIES": "many"}, "MAX_ENTRIES"),
        ({"MAX_ENTRIES": 0}, "MAX_ENTRIES"),
        ({"MAX_BYTES": -1}, "MAX_BYTES"),
        ({"EVICTION_POLICY": "fifo"}, "EVICTION_POLICY"),
        ({"LEASE": 0}, "LEASE"),
        ({"LEASE": "1"}, "LEASE"),
        ({"L1_MAX_TTL": -5}, "L1_MAX_TTL"),
        ({"L1_MAX_TTL": float("nan")}, "L1_MAX_TTL"),
        ({"INVALIDATION": "streams"}, "INVALIDATION"),
        ({"SIGNED": "yes"}, "SIGNED"),
        ({"IGNORE_EXCEPTIONS": 1}, "IGNORE_EXCEPTIONS"),
        ({"STALE_IF_ERROR": -1}, "STALE_IF_ERROR"),
        ({"STAMPEDE_WAIT": -1}, "STAMPEDE_WAIT"),
        ({"STAMPEDE_WAIT": "10"}, "STAMPEDE_WAIT"),
        ({"MAX_ENTRIE": 10}, "MAX_ENTRIE"),
        ({"socket_timout": 1}, "socket_timout"),
        ({"ssl_certfile": "x"}, "rediss://"),  # TLS options need a rediss:// LOCATION
        ({"serializer": "x.Y"}, "serializer"),
        ({"decode_responses": True}, "decode_responses"),
    ],
)
def test_bad_options_raise_improperly_configured_naming_the_setting(near_server, options, named):
    with pytest.raises(ImproperlyConfigured, match=named):
        NearCache(near_server.url, {"OPTIONS": options})


@pytest.mark.parametrize(
    ("location", "says"),
    [
        ("redis://a:1/0,redis://b:1/0", "Redis Cluster"),
        (["redis://a:1/0", "redis://b:1/0"], "sentinel://"),
        ("http://a:1/0", "redis://"),
        ("", "LOCATION"),
        (None, "LOCATION"),
    ],
)
def test_unsupported_locations_are_refused_clearly(location, says):
    with pytest.raises(ImproperlyConfigured, match=says):
        NearCache(location, {})


def test_redis_py_connection_options_pass_through(make):
    cache = make(OPTIONS={"socket_timeout": 0.75, "max_connections": 7, "MAX_ENTRIES": 1000})
    pool = cache._client().connection_pool
    assert pool.connection_kwargs["socket_timeout"] == 0.75
    assert pool.max_connections == 7
    assert cache._max_entries == 1000


def test_one_client_per_process_and_location_shared_by_instances(make, near_server):
    a, b = make(), make()
    assert a._client() is b._client()


# pubsub mode ------------------------------------------------------------------------------


def test_pubsub_mode_publishes_every_changed_key_and_star_for_a_flush(make, near_server):
    cache = make(KEY_PREFIX="ps", OPTIONS={"INVALIDATION": "pubsub"})
    sub = redis.Redis.from_url(near_server.url).pubsub()
    sub.subscribe(cache._channel)
    assert sub.get_message(timeout=2)["type"] == "subscribe"
    cache.set("a", 1)
    cache.set_many({"b": 2})
    cache.add("c", 3)
    cache.incr("a")
    cache.touch("a", 10)
    cache.delete("b")
    cache.delete_pattern("c*")

    async def async_writes():
        await cache.aset("d", 4)
        await cache.adelete("d")
        await cache.aclear()

    asyncio.run(async_writes())
    cache.clear()
    got = []
    deadline = time.monotonic() + 5
    while len(got) < 11 and time.monotonic() < deadline:
        msg = sub.get_message(timeout=0.5)
        if msg and msg["type"] == "message":
            got.append(msg["data"].decode())
    expected = ["ps:1:a", "ps:1:b", "ps:1:c", "ps:1:a", "ps:1:a", "ps:1:b", "ps:1:c"]
    assert got == expected + ["ps:1:d", "ps:1:d", "*", "*"]
    sub.close()


# fork -------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_builds_its_own_client_and_leaves_the_parents_alone(cache):
    cache.set("k", "parent")
    assert cache.get("k") == "parent"
    parent_client = cache._client()
    parent_id = parent_client.client_id()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running pytest's teardown
        code = 1
        try:
            child_id = cache._client().client_id()
            rebuilt = cache._client() is not parent_client
            ok = rebuilt and cache.get("k") == "parent" and child_id != parent_id
            cache.set("k", "child")
            os.write(w, f"{int(ok)} {child_id}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    report = os.read(r, 100).decode()
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    ok, child_id = report.split()
    assert ok == "1" and int(child_id) != parent_id
    assert cache._client().client_id() == parent_id  # the parent's connection survived
    # With a listener, the child's write arrives as an invalidation (a bound on the wait, generous
    # for a loaded machine).
    deadline = time.monotonic() + 10
    while cache.get("k") != "child" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cache.get("k") == "child"


# asyncio ----------------------------------------------------------------------------------


def test_async_methods_use_redis_asyncio_one_client_per_loop(cache):
    async def scenario():
        await cache.aset("k", {"v": 1})
        assert await cache.aget("k") == {"v": 1}
        assert await cache.aadd("k", 2) is False
        assert await cache.aadd("n", 1) is True
        assert await cache.aincr("n", 5) == 6
        assert await cache.adecr("n") == 5
        with pytest.raises(ValueError, match="'absent' not found"):
            await cache.aincr("absent")
        assert await cache.aset_many({"a": 1, "b": 2}) == []
        assert await cache.aget_many(["a", "b", "z"]) == {"a": 1, "b": 2}
        assert await cache.ahas_key("a") is True
        assert await cache.atouch("a", 50) is True
        assert 49 < await cache.attl("a") <= 50
        assert await cache.adelete("a") is True
        await cache.adelete_many(["b"])
        assert await cache.aget_or_set("g", lambda: "computed") == "computed"
        assert await cache.aget_or_set("g", lambda: "other") == "computed"
        assert await cache.adelete_pattern("*") == 3
        await cache.aset("k", 1)
        await cache.aclear()
        assert await cache.aget("k") is None
        return cache._aclient()

    def no_thread_hop(*args, **kwargs):
        raise AssertionError("aget_or_set went through the sync get_or_set")

    cache.get_or_set = no_thread_hop  # Django 6.1's BaseCache.aget_or_set would call it
    first = asyncio.run(scenario())
    second = asyncio.run(scenario())  # a new event loop gets its own client
    assert first is not second


# L1 logic, with a fake listener and a Python stand-in for the Rust placeholder fill ---------
# (the Rust listener and Handle.fill_* are tested on their side; here: what NearCache asks of
# them, and when it serves L1)


class FakeListener(near_mod._NoListener):
    """A listener whose lease the test sets; it delivers no invalidation by itself."""

    fills = True

    def __init__(self):
        self.is_fresh = True
        self.started = 0

    def fresh(self):
        return self.is_fresh

    def ensure_started(self):
        self.started += 1


class FakeFill:
    """A placeholder fill of ``FakeFillHandle``: ``put`` stores if its token is still current."""

    def __init__(self, owner, made, token):
        self._owner, self._made, self._token = owner, made, token

    def put(self, made, value, timeout, version=None, **_):
        if self._owner._tokens.get(made) != self._token:
            return False
        del self._owner._tokens[made]
        return self._owner._h.set(made, value, timeout)


class FakeFillHandle:
    """The real L1 Handle plus the placeholder protocol of ``Handle.fill`` in Python."""

    def __init__(self, handle):
        self._h = handle
        self._tokens = {}
        self._next = 0

    def __getattr__(self, name):
        return getattr(self._h, name)

    def fill(self, made, **how):
        if how:  # get_or_set's single-flight: the real one
            return self._h.fill(made, **how)
        self._next += 1
        self._tokens[made] = self._next
        self._h.delete(made)
        return FakeFill(self, made, self._next)

    def invalidate_made(self, made_keys):
        for made in made_keys:
            self._tokens.pop(made, None)
        return sum(self._h.delete(made) for made in made_keys)


@pytest.fixture
def fake(monkeypatch):
    listener = FakeListener()
    monkeypatch.setattr(near_mod, "LISTENER_FACTORY", lambda *a, **k: listener)
    return listener


@pytest.fixture
def l1cache(fake, near_server, raw):
    """``l1cache(**params)``: a NearCache whose L1 is filled and served (fake lease)."""

    def make(location=None, **params):
        global _made
        _made += 1
        params.setdefault("KEY_PREFIX", f"l1t{_made}")
        cache = NearCache(location or near_server.url, params)
        cache._h = FakeFillHandle(cache._h)
        cache._fills = True
        return cache

    return make


def test_l1_serves_hits_while_the_lease_is_fresh_and_redis_when_it_is_not(l1cache, fake, raw):
    cache = l1cache()
    made = f"{cache.key_prefix}:1:k"
    cache.set("k", "v1")
    raw.set(made, cache._encode(made, "v2"))  # changed behind our back, no invalidation
    assert cache.get("k") == "v1"  # from L1
    assert cache.get_many(["k"]) == {"k": "v1"}
    assert cache.stats()["l1_hits"] == 2
    fake.is_fresh = False
    assert cache.get("k") == "v2"  # the lease is out: Redis
    assert fake.started >= 1
    fake.is_fresh = True
    assert cache.get("k") == "v2"  # the read refilled L1
    cache._h.invalidate_made([made])  # what the listener does on an invalidation
    raw.set(made, cache._encode(made, "v3"))
    assert cache.get("k") == "v3"


def test_l1_never_decides_add_incr_touch_delete_or_has_key(l1cache, raw):
    cache = l1cache()
    made = f"{cache.key_prefix}:1:k"
    cache.set("k", 1)
    raw.delete(made)  # gone in Redis, still in L1
    assert cache.has_key("k") is False
    assert cache.add("k", 2) is True
    assert cache.get("k") == 2
    raw.delete(made)
    assert cache.touch("k") is False
    assert cache.delete("k") is False
    with pytest.raises(ValueError):
        cache.incr("k")


def test_each_write_replaces_or_drops_this_process_l1_entry(l1cache, raw):
    cache = l1cache()
    cache.set("k", 1)
    assert cache.get("k") == 1
    cache.incr("k", 4)
    assert cache.get("k") == 5
    cache.set_many({"k": "many"})
    assert cache.get("k") == "many"
    cache.delete("k")
    assert cache.get("k") is None
    assert cache.add("k", "added") is True
    assert cache.add("k", "refused") is False
    assert cache.get("k") == "added"
    cache.delete_many(["k"])
    assert cache.get("k") is None
    cache.set("p1", 1)
    cache.delete_pattern("p*")
    assert cache.get("p1") is None
    cache.set("c", 1)
    cache.clear()
    assert cache.get("c") is None


def test_l1_keeps_an_entry_no_longer_than_its_redis_ttl(l1cache, raw):
    cache = l1cache()
    cache.set("written", "v", 0.3)
    raw.set(
        f"{cache.key_prefix}:1:filled", cache._encode(f"{cache.key_prefix}:1:filled", "f"), px=300
    )
    assert cache.get("filled") == "f"  # fills L1 from Redis with the PTTL it read
    time.sleep(0.45)
    assert cache.get("written") is None
    assert cache.get("filled") is None


def test_l1_keeps_an_entry_no_longer_than_l1_max_ttl(l1cache, raw):
    cache = l1cache(OPTIONS={"L1_MAX_TTL": 0.3})
    made = f"{cache.key_prefix}:1:k"
    cache.set("k", "old")
    raw.set(made, cache._encode(made, "new"))
    assert cache.get("k") == "old"
    time.sleep(0.45)
    assert cache.get("k") == "new"


def test_get_many_answers_l1_hits_and_sends_one_mget_for_the_rest(l1cache, raw):
    cache = l1cache()
    cache.set_many({"a": 1, "b": 2})
    raw.set(f"{cache.key_prefix}:1:c", 3)
    raw.config_resetstat()
    assert cache.get_many(["a", "b", "c", "d"]) == {"a": 1, "b": 2, "c": 3}
    assert _command_calls(raw, "mget") == 1  # (inside the script that also reads the PTTLs)
    assert _command_calls(raw, "get") == 0
    assert _command_calls(raw, "pttl") == 2  # for c and d only: a and b were L1 hits


def test_stale_if_error_serves_l1_after_the_lease_only_that_long(l1cache, fake, own_server):
    # A window of seconds: stopping the server (SIGTERM, waited for) and the refused connects
    # must fit in it on a loaded machine (half a second once did not, in a loaded run).
    cache = l1cache(own_server.url, OPTIONS={"STALE_IF_ERROR": 2.0})
    strict = l1cache(own_server.url, KEY_PREFIX=cache.key_prefix)
    cache.set("k", "v")
    assert cache.get("k") == "v"  # seen fresh now
    seen = time.monotonic()
    own_server.stop()
    fake.is_fresh = False
    assert cache.get("k") == "v"
    assert cache.get_many(["k"]) == {"k": "v"}
    with pytest.raises(redis.ConnectionError):
        strict.get("k")
    time.sleep(max(0.0, seen + 2.1 - time.monotonic()))
    with pytest.raises(redis.ConnectionError):
        cache.get("k")


def test_async_get_answers_an_l1_hit_without_redis(l1cache, raw):
    cache = l1cache()
    cache.set("k", "v")
    raw.config_resetstat()

    async def read():
        return await cache.aget("k"), await cache.aget_many(["k"])

    assert asyncio.run(read()) == ("v", {"k": "v"})
    assert _command_calls(raw, "evalsha") == 0


def test_an_l1_hit_warns_about_a_memcached_unsafe_key_like_a_miss_does(l1cache):
    from django.core.cache import CacheKeyWarning

    cache = l1cache()
    with pytest.warns(CacheKeyWarning) as miss:
        cache.set("a key", "v")
    with pytest.warns(CacheKeyWarning) as hit:
        assert cache.get("a key") == "v"  # an L1 hit: the key is made in Rust
    assert cache.stats()["l1_hits"] == 1
    assert len(hit) == len(miss) == 1


def test_changing_key_prefix_or_version_on_a_live_instance_changes_l1_lookups(l1cache):
    cache = l1cache()
    cache.set("k", "v1")
    cache.version = 2
    assert cache.get("k") is None
    cache.set("k", "v2")
    cache.version = 1
    assert cache.get("k") == "v1"
    cache.key_prefix = "elsewhere"
    assert cache.get("k") is None


# Endpoints: unix sockets, passwords, and what the listener is handed ------------------------


def test_a_unix_socket_location_with_a_password_works_and_reaches_the_listener(
    near_server, monkeypatch
):
    server = servers.start(near_server.kind, "--requirepass", "s3cret", unix=True)
    try:
        seen = []

        def factory(l1_location, **kwargs):
            seen.append((l1_location, kwargs))
            return near_mod._NoListener()

        monkeypatch.setattr(near_mod, "LISTENER_FACTORY", factory)
        location = f"unix://:s3cret@{server.unix_path}?db=2"
        cache = NearCache(location, {"KEY_PREFIX": "u", "OPTIONS": {"LEASE": 0.25}})
        cache.set("k", "v")
        assert cache.get("k") == "v"
        check = redis.Redis(unix_socket_path=str(server.unix_path), password="s3cret", db=2)
        assert check.exists("u:1:k") == 1
        check.close()
        l1_location, kwargs = seen[-1]
        assert l1_location == f"near:{location}#u"
        assert kwargs == {
            "host": None,
            "port": 6379,
            "unix_path": str(server.unix_path),
            "username": None,
            "password": "s3cret",
            "prefix": "u:",
            "lease": 0.25,
            "mode": "bcast",
            "channel": "",
            "connect_timeout": 2.0,
        }
        with pytest.raises(redis.AuthenticationError):
            NearCache(f"unix://:wrong@{server.unix_path}", {"KEY_PREFIX": "u2"}).get("k")
    finally:
        server.cleanup()


def test_the_listener_is_handed_host_port_credentials_prefix_and_pubsub_channel(
    near_server, monkeypatch
):
    seen = []
    monkeypatch.setattr(
        near_mod, "LISTENER_FACTORY", lambda loc, **kw: seen.append(kw) or near_mod._NoListener()
    )
    url = f"redis://alice:pw@127.0.0.1:{near_server.port}/3"
    NearCache(url, {"KEY_PREFIX": "site", "OPTIONS": {"INVALIDATION": "pubsub"}})
    (kwargs,) = seen
    assert (kwargs["host"], kwargs["port"]) == ("127.0.0.1", near_server.port)
    assert (kwargs["username"], kwargs["password"]) == ("alice", "pw")
    assert (kwargs["prefix"], kwargs["mode"]) == ("site:", "pubsub")
    assert kwargs["channel"] == "django_rustcache:near:3:site:"


# Bad input and threads --------------------------------------------------------------------


@pytest.mark.parametrize("timeout", ["10", b"10", [1], float("nan")])
def test_a_bad_timeout_is_refused_and_changes_nothing(cache, raw, timeout):
    with pytest.raises((TypeError, ValueError), match="timeout must be a number or None"):
        cache.set("k", "v", timeout)
    with pytest.raises((TypeError, ValueError), match="timeout must be a number or None"):
        cache.touch("k", timeout)
    assert raw.dbsize() == 0


def test_an_infinite_timeout_means_no_expiry(cache):
    cache.set("k", "v", float("inf"))
    assert cache.ttl("k") is None


def test_incr_and_add_are_atomic_across_threads(make):
    from tests.threads import run_threads

    cache = make()
    cache.set("n", 0)
    results = run_threads(8, lambda: [cache.incr("n") for _ in range(50)])
    assert all(kind == "ok" for kind, _ in results)
    assert cache.get("n") == 400
    assert sorted(v for _, got in results for v in got) == list(range(1, 401))
    added = run_threads(8, lambda: cache.add("once", object()))
    assert sorted(got for _, got in added) == [False] * 7 + [True]


# Single-flight: get_or_set and aget_or_set come from FillMixin / AsyncFillMixin --------------


def test_threads_missing_one_key_compute_it_once_and_redis_decides_the_add(make, raw):
    from tests.threads import run_threads

    cache = make()
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.3)
        return {"value": 42}

    results = run_threads(16, lambda: cache.get_or_set("hot", slow, timeout=60))
    assert len(calls) == 1
    assert results == [("ok", {"value": 42})] * 16
    assert raw.exists(f"{cache.key_prefix}:1:hot") == 1


def test_stampede_wait_zero_turns_single_flight_off(make):
    from tests.threads import run_threads

    cache = make(OPTIONS={"STAMPEDE_WAIT": 0})
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.3)
        return len(calls)

    results = run_threads(4, lambda: cache.get_or_set("hot", slow))
    assert len(calls) == 4
    # Redis decided: every caller got the one value that SET NX stored first.
    assert len({got for _, got in results}) == 1


def test_a_coroutine_follows_another_threads_fill_without_blocking_the_loop(make):
    import threading

    cache = make(OPTIONS={"STAMPEDE_WAIT": 30})
    inside, release = threading.Event(), threading.Event()

    def lead_value():
        inside.set()
        release.wait(30)
        return "leader"

    leader = threading.Thread(target=lambda: cache.get_or_set("k", lead_value))
    leader.start()
    assert inside.wait(10)

    async def follow():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        tick = asyncio.create_task(ticker())
        asyncio.get_running_loop().call_later(0.5, release.set)
        try:
            return await cache.aget_or_set("k", lambda: "follower"), ticks
        finally:
            tick.cancel()

    try:
        value, ticks = asyncio.run(follow())
    finally:
        release.set()
        leader.join(10)
    assert value == "leader"  # the follower waited for the leader's value, computing nothing
    assert ticks >= 10  # and the loop kept running meanwhile


def test_no_async_method_of_near_cache_is_a_sync_twin_that_would_block_the_loop():
    from django_rustcache._async import AsyncMixin

    twins = {name for name in vars(AsyncMixin) if name.startswith("a")}
    assert "aget_or_set" in twins
    borrowed = {n for n in twins if getattr(NearCache, n, None) is getattr(AsyncMixin, n)}
    assert borrowed == set()


def test_every_socket_operation_has_a_timeout_by_default(make, own_server):
    # redis-py waits forever by default: a stalled server (SIGSTOP, a partition) would hang the
    # worker. NearCache gives its connections a 5 s socket timeout unless told otherwise.
    cache = make(own_server.url)
    cache.set("warm", "v")
    kwargs = cache._conn.client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == 5.0 and kwargs["socket_connect_timeout"] == 2.0
    assert make(own_server.url, OPTIONS={"socket_timeout": 1})._options.redis_options[
        "socket_timeout"
    ] == 1
    own_server.pause()
    try:
        started = time.monotonic()
        with pytest.raises(redis.exceptions.TimeoutError):
            cache.get("k")  # not in L1: a read from the stalled server
        assert time.monotonic() - started < 30
    finally:
        own_server.resume()
