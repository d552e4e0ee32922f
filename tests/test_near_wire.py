"""NearCache's hot data path: a miss's GET + PTTL and a set's SET on connections of its own
(``_Conn.call``), the pickle kept by L1 without pickling again (``Fill.put(pickled=)``)
and the HMAC of signed values (``_MacKey``)."""

from __future__ import annotations

import hashlib
import hmac
import pickle

import pytest
import redis
from django.core.cache.backends.redis import RedisCache

from django_rustcache import NearCache
from django_rustcache import near as near_mod
from tests.test_near import FakeListener


class Point:
    """Not a plain value: L1 keeps it pickled. Counts how often it is pickled."""

    pickled = 0

    def __init__(self, x):
        self.x = x

    def __reduce__(self):
        Point.pickled += 1
        return (Point, (self.x,))

    def __eq__(self, other):
        return type(other) is Point and other.x == self.x


_made = 0


@pytest.fixture
def make(near_server, raw, monkeypatch):
    """``make(**params)``: a NearCache whose real L1 is filled and served (a fake lease that
    is always fresh and delivers no invalidation)."""
    monkeypatch.setattr(near_mod, "LISTENER_FACTORY", lambda *a, **k: FakeListener())

    def make(location=None, **params):
        global _made
        _made += 1
        params.setdefault("KEY_PREFIX", f"w{_made}")
        cache = NearCache(location or near_server.url, params)
        assert cache._fills
        return cache

    return make


# Fill.put(pickled=) ------------------------------------------------------------------------


def test_fill_put_keeps_the_given_pickle_of_a_value_that_is_not_plain(make):
    h = make()._h
    # The bytes given are what L1 keeps (so a get loads them), not a new pickle of the value.
    assert h.fill("a").put("a", Point(1), 60, pickled=pickle.dumps(Point(2))) is True
    assert h.get("a") == Point(2)
    # A plain value keeps its structural form: the pickle is not used.
    assert h.fill("b").put("b", {"x": [1]}, 60, pickled=pickle.dumps("other")) is True
    assert h.get("b") == {"x": [1]}
    # A large pickle (kept as an object, not inline) too.
    big = pickle.dumps(Point("y" * 5000))
    assert h.fill("c").put("c", Point(0), 60, pickled=big) is True
    assert h.get("c") == Point("y" * 5000)
    with pytest.raises(TypeError):
        h.fill("d").put("d", Point(1), 60, pickled="not bytes")


def test_set_and_miss_put_the_redis_pickle_into_l1_without_pickling_again(make):
    cache = make()
    Point.pickled = 0
    cache.set("k", Point(7))
    assert Point.pickled == 1  # once, for Redis; L1 kept those bytes
    assert cache._h.get(f"{cache.key_prefix}:1:k") == Point(7)  # in L1
    cache._h.clear()
    assert cache.get("k") == Point(7)  # a miss: loaded from Redis, into L1
    assert cache._h.get(f"{cache.key_prefix}:1:k") == Point(7)
    assert cache.get("k") == Point(7)  # an L1 hit
    assert cache.stats()["l2_hits"] == 1
    assert Point.pickled == 1
    cache.set_many({"m": Point(8)})
    assert Point.pickled == 2
    assert cache.get("m") == Point(8)
    assert cache.stats()["l2_hits"] == 1


# _MacKey ------------------------------------------------------------------------------------


@pytest.mark.parametrize("msg", [b"", b"k\0", b"x" * 63, b"y" * 64, b"z" * 1000])
def test_mac_key_is_hmac_sha256(msg):
    key = hashlib.sha256(b"secret").digest()
    assert near_mod._MacKey(key).mac(msg) == hmac.digest(key, msg, "sha256")


# _Conn.call ----------------------------------------------------------------------------------


def test_a_miss_and_a_set_do_not_go_through_redis_pys_pool(make, monkeypatch):
    cache = make()
    assert cache._conn.direct
    pool = cache._client().connection_pool

    def refuse(*a, **k):
        raise AssertionError("the pool was used")

    monkeypatch.setattr(pool, "get_connection", refuse)
    cache.set("k", {"v": 1}, 30)
    cache._h.clear()
    assert cache.get("k") == {"v": 1}
    assert cache.stats()["l2_hits"] == 1
    assert cache.get("nothing", "dflt") == "dflt"
    assert 29 < cache._h.ttl(f"{cache.key_prefix}:1:k") <= 30  # the PTTL went with the GET


def test_a_connection_the_server_closed_while_idle_is_reconnected(make, raw):
    cache = make()
    cache.set("k", "v")  # our connection is open and idle now
    raw.client_kill_filter(_type="normal", skipme=True)  # kills it (redis-py retries none)
    cache._h.clear()
    assert cache.get("k") == "v"
    raw.client_kill_filter(_type="normal", skipme=True)
    cache.set("k", "w")
    cache._h.clear()
    assert cache.get("k") == "w"


def test_an_error_reply_is_raised_as_rediscache_does_and_the_connection_stays_in_step(
    make, raw, near_server
):
    cache = make()
    django = RedisCache(near_server.url, {"KEY_PREFIX": cache.key_prefix})
    raw.lpush(f"{cache.key_prefix}:1:list", "x")
    with pytest.raises(redis.ResponseError):
        django.get("list")
    for _ in range(3):
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            cache.get("list")
        cache.set("k", 5)
        cache._h.clear()
        assert cache.get("k") == 5  # the replies are not shifted by the error's
        assert cache.ttl("k") > 0


def test_a_key_gone_between_get_and_pttl_is_not_kept_in_l1(make, monkeypatch):
    cache = make()
    made = f"{cache.key_prefix}:1:k"
    data = cache._encode(made, "v")
    replies = [[data, -2]]
    monkeypatch.setattr(cache._conn, "call", lambda *cmds: replies[0])
    assert cache.get("k") == "v"  # read before it went
    assert cache._h.get(made, "gone") == "gone"
    replies[0] = [data, -1]  # no expiry: kept (for L1_MAX_TTL)
    assert cache.get("k") == "v"
    assert cache._h.get(made) == "v"
    assert 299 < cache._h.ttl(made) <= 300


def test_errors_and_ignore_exceptions_on_the_direct_path(make, monkeypatch):
    cache = make(OPTIONS={"IGNORE_EXCEPTIONS": True})

    def down(*cmds):
        raise redis.ConnectionError("down")

    monkeypatch.setattr(cache._conn, "call", down)
    assert cache.get("k", "dflt") == "dflt"
    assert cache.set("k", "v") is None
    assert cache.stats()["errors_ignored"] == 2
    cache._options = near_mod.NearOptions.from_params(cache._options.location, {})
    with pytest.raises(redis.ConnectionError):
        cache.get("k")
    with pytest.raises(redis.ConnectionError):
        cache.set("k", "v")
    assert cache._h.get(f"{cache.key_prefix}:1:k", "none") == "none"  # no placeholder left


@pytest.mark.parametrize(
    "options",
    [
        {"max_connections": 7},
        {"pool_class": "redis.BlockingConnectionPool"},
        {"protocol": 3},
        {"credential_provider": redis.UsernamePasswordCredentialProvider()},
    ],
)
def test_a_bounded_or_other_pool_keeps_redis_pys_path(make, options, monkeypatch):
    cache = make(OPTIONS=options)
    assert not cache._conn.direct
    monkeypatch.setattr(cache._conn, "call", None)  # never called
    cache.set("k", Point(3))
    cache._h.clear()
    assert cache.get("k") == Point(3)
    assert cache.stats()["l2_hits"] == 1


@pytest.mark.parametrize("version", [None, 2, "v"])
def test_set_makes_the_same_keys_as_django_in_rust(make, raw, version, recwarn):
    cache = make()
    for key in ["a b", "ключ", 5, 2.5, "é:ü", "x" * 260, "tab\there"]:
        cache.set(key, "v", version=version)
        assert raw.exists(cache.make_key(key, version=version)), key
    # Django's memcached-safety warnings, as make_and_validate_key gives them: a space, a
    # tab, a key over 250 characters.
    assert sum("memcached" in str(w.message) for w in recwarn.list) == 3


def test_a_non_utf8_encoding_keeps_redis_pys_packer(make, near_server):
    cache = make(OPTIONS={"encoding": "latin-1"})
    assert cache._conn.direct and cache._conn._pack is None
    assert make()._conn._pack is not None  # hiredis packs for the default UTF-8
    cache.set("clé", "v")
    # The key's bytes are what redis-py's own client sends with that encoding (latin-1 from
    # redis-py 8.2; 8.1 ignores the option and sends UTF-8).
    reference = redis.Redis.from_url(near_server.url, encoding="latin-1")
    reference.set("reference:clé", "v")
    reference.close()
    raw = redis.Redis.from_url(near_server.url)
    (ref_key,) = raw.keys("reference:*")
    assert raw.exists(f"{cache.key_prefix}:1:".encode() + ref_key[len(b"reference:") :])
    cache._h.clear()
    assert cache.get("clé") == "v"
    raw.close()


def test_threads_never_share_a_connection(make):
    import threading

    cache = make()
    cache.set("warm", 1)
    before = len(cache._conn._wires)  # the process-wide pool of this LOCATION (other tests')
    errors = []

    def work(n):
        try:
            for i in range(200):
                cache.set(f"t{n}", (n, i))
                cache._h.invalidate_made([f"{cache.key_prefix}:1:t{n}"])
                assert cache.get(f"t{n}") == (n, i)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert 1 <= len(cache._conn._wires) <= before + 8
    assert len({id(w.conn) for w in cache._conn._wires}) == len(cache._conn._wires)


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_uses_connections_of_its_own(make):
    import os

    cache = make()
    cache.set("k", "parent")
    parent_conn = cache._conn
    wire = parent_conn._wires[-1]  # the one set used (the next to be used)
    sock = wire.conn._sock
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running pytest's teardown
        code = 1
        try:
            cache._h.clear()  # (a child's L1 starts empty with the Rust listener)
            ok = cache.get("k") == "parent" and cache._conn is not parent_conn
            cache.set("k", "child")
            ok = ok and wire not in cache._conn._wires
            os.write(w, str(int(ok)).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    report = os.read(r, 10).decode()
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and report == "1"
    assert cache._conn is parent_conn and wire.conn._sock is sock
    assert not wire.stale()  # the child left the parent's socket open
    cache._h.clear()
    assert cache.get("k") == "child"
    assert wire.conn._sock is sock


def test_signing_follows_secret_key_assigned_on_django_settings(make, raw):
    from django.conf import settings

    cache = make()
    made = f"{cache.key_prefix}:1:k"
    cache.set("k", "v")
    old = settings.SECRET_KEY
    try:
        settings.SECRET_KEY = "another-secret-key"  # LazySettings drops its cached copy
        cache._h.clear()
        assert cache.get("k", "miss") == "miss"  # signed with the old key: not loaded
        raw.set(made, cache._encode(made, "w"))
        assert cache.get("k") == "w"
    finally:
        settings.SECRET_KEY = old
    cache._h.clear()
    assert cache.get("k", "miss") == "miss"
