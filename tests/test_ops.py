"""Issue 11 items 5 and 6: ``cache.lock``/``alock`` (django-redis's), ``check()`` for health-check
apps, and ``manage.py rustcache`` (stats, health, invalidate, clear), against the real servers
that tests/servers.py starts (the session's ``near_server``: no server is started here, since a
``preexec_fn`` in a process full of listener threads can deadlock). Another process is a real
one: a child Python driven over stdin (``subprocess`` without ``preexec_fn``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from io import StringIO

import pytest
import redis
from django.core.cache import caches
from django.core.management import CommandError, call_command
from redis.exceptions import LockError, LockNotOwnedError

from django_rustcache import NearCache, RustCache
from django_rustcache.invalidation import model_tag

_prefixes = itertools.count()


@pytest.fixture
def prefix():
    """A KEY_PREFIX of this test's own (so its L1 store is fresh too)."""
    return f"ops{next(_prefixes)}"


@pytest.fixture
def cache(near_server, raw, prefix):
    """A NearCache on the test server, with the Rust listener (stopped afterwards: each test's
    KEY_PREFIX has a listener thread of its own)."""
    cache = NearCache(near_server.url, {"KEY_PREFIX": prefix})
    yield cache
    cache._near.close()


@pytest.fixture
def aliases(settings, near_server, raw, prefix):
    """CACHES with "near" (NearCache on the test server), "default"/"other" (RustCache) and
    "locmem" (Django's LocMemCache)."""
    settings.CACHES = {
        **settings.CACHES,
        "near": {
            "BACKEND": "django_rustcache.NearCache",
            "LOCATION": near_server.url,
            "KEY_PREFIX": prefix,
        },
        "locmem": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    }
    near = caches["near"]
    assert isinstance(near, NearCache)
    yield settings.CACHES
    near._near.close()


def eventually(condition, within=10.0):
    """Whether ``condition()`` became true within ``within`` seconds (polled every ms): a bound
    on a wait, not a timing assertion."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def run(*args):
    """``manage.py rustcache *args``: its stdout."""
    out = StringIO()
    call_command("rustcache", *args, stdout=out)
    return out.getvalue()


_CHILD = textwrap.dedent(
    """
    import sys
    import time
    import django
    from django.conf import settings
    settings.configure(SECRET_KEY="django-rustcache-tests")
    django.setup()
    from django_rustcache import NearCache
    cache = NearCache(sys.argv[1], {"KEY_PREFIX": sys.argv[2]})
    held = {}
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "lock":
            held[arg] = cache.lock(arg, timeout=30)
            out = held[arg].acquire(blocking=False)
        elif cmd == "unlock":
            held.pop(arg).release()
            out = "released"
        elif cmd == "check":
            out = cache.check()["lease_ok"]
        elif cmd == "set_tagged":
            cache.set(arg, "value", tags=["t"])
            out = "stored"
        elif cmd == "get":
            out = cache.get(arg)
        elif cmd == "l1_get":  # read until L1 serves it (the own write's invalidation drops it)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                hits = cache.stats()["l1_hits"]
                out = cache.get(arg)
                if cache.stats()["l1_hits"] > hits:
                    break
                time.sleep(0.001)
            else:
                out = "L1 never served it"
        print(repr(out), flush=True)
    """
)


class Child:
    """Another process with a NearCache of the same LOCATION and KEY_PREFIX."""

    def __init__(self, url, prefix):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, url, prefix],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def __call__(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        assert reply, f"the child died on {line!r}"
        return reply.strip()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(30)


@pytest.fixture
def child(near_server, prefix):
    c = Child(near_server.url, prefix)
    yield c
    c.close()


# cache.lock / alock -----------------------------------------------------------------------


def test_lock_is_redis_py_lock_on_the_made_key(cache, raw, prefix):
    lock = cache.lock("job", timeout=10)
    assert isinstance(lock, redis.lock.Lock)
    assert lock.acquire() is True
    made = f"{prefix}:1:job"
    assert lock.name == made == cache.make_key("job")
    assert raw.get(made) == lock.local.token
    assert 0 < raw.pttl(made) <= 10_000
    lock.release()
    assert raw.exists(made) == 0


def test_lock_excludes_a_django_redis_style_lock_on_the_same_key(cache, raw, prefix):
    """A site moving from django-redis: its redis-py locks on ``make_key(name)`` and ours exclude
    each other."""
    theirs = raw.lock(f"{prefix}:1:job", timeout=10)
    assert theirs.acquire(blocking=False)
    assert cache.lock("job").acquire(blocking=False) is False
    theirs.release()
    ours = cache.lock("job", timeout=10)
    assert ours.acquire(blocking=False) is True
    assert raw.lock(f"{prefix}:1:job").acquire(blocking=False) is False
    ours.release()


def test_lock_excludes_another_process(cache, child):
    ours = cache.lock("job", timeout=30)
    assert ours.acquire(blocking=False)
    assert child("lock job") == "False"
    ours.release()
    assert child("lock job") == "True"
    assert cache.lock("job").acquire(blocking=False) is False
    assert child("unlock job") == "'released'"
    assert cache.lock("job").acquire(blocking=False) is True


def test_lock_timeout_frees_it_and_the_late_release_raises(cache, raw):
    first = cache.lock("job", timeout=0.3)
    assert first.acquire()
    assert 0 < raw.pttl(cache.make_key("job")) <= 300
    second = cache.lock("job", timeout=10, blocking_timeout=10)
    assert second.acquire() is True  # once the first one expired
    with pytest.raises(LockNotOwnedError):
        first.release()
    second.release()


def test_blocking_timeout_and_non_blocking_give_up(cache):
    holder = cache.lock("job", timeout=30)
    assert holder.acquire()
    assert cache.lock("job", blocking_timeout=0.1).acquire() is False
    assert cache.lock("job", blocking=False).acquire() is False
    with pytest.raises(LockError):
        with cache.lock("job", blocking_timeout=0.1):
            pass  # pragma: no cover - never entered
    holder.release()


def test_lock_as_a_context_manager(cache, raw):
    with cache.lock("job", timeout=10) as lock:
        assert raw.exists(cache.make_key("job")) == 1
        assert lock.owned()
    assert raw.exists(cache.make_key("job")) == 0


def test_lock_versions_as_django_redis(near_server, raw, prefix):
    cache = NearCache(near_server.url, {"KEY_PREFIX": prefix, "VERSION": 3})
    v3 = cache.lock("job", timeout=10)
    v2 = cache.lock("job", 2, timeout=10)  # django-redis's order: (key, version, timeout, ...)
    assert (v3.name, v2.name) == (f"{prefix}:3:job", f"{prefix}:2:job")
    assert v3.acquire(blocking=False) and v2.acquire(blocking=False)
    assert cache.lock("job", version=2).acquire(blocking=False) is False
    v3.release()
    v2.release()


def l1_hit(cache, key):
    """Whether a ``get`` of ``key`` was served by this process's L1."""
    hits = cache.stats()["l1_hits"]
    cache.get(key)
    return cache.stats()["l1_hits"] > hits


def test_taking_locks_leaves_l1_and_the_lease_alone(cache, raw):
    assert cache.check()["lease_ok"]
    cache.set("k", {"v": 1})
    # The listener hears of this process's own write too, which drops the copy the write put in
    # L1: wait for that (else it may land during the loop below), then a read fills L1 again.
    made = cache.make_key("k")
    assert eventually(lambda: cache._near.applied_ns(made) is not None)
    cache.get("k")
    assert eventually(lambda: l1_hit(cache, "k"))
    for _ in range(20):
        with cache.lock("job", timeout=10):
            assert cache.has_key("job")  # as django-redis: the lock is a key
            assert cache.get("job") is None  # its token is no value of ours (never unpickled)
    assert cache.get("job") is None and not cache.has_key("job")
    assert l1_hit(cache, "k") and cache.get("k") == {"v": 1}  # still served by L1
    listener = cache.stats()["listener"]
    assert listener["lease_ok"] and listener["connected"] and listener["flushes"] == 1
    raw.set(cache.make_key("k"), b"5")  # and invalidation still works
    assert eventually(lambda: cache.get("k") == 5)


def test_keys_list_a_held_lock_and_delete_pattern_frees_it(cache):
    lock = cache.lock("job", timeout=30)
    assert lock.acquire()
    cache.set("data", 1)
    assert sorted(cache.keys()) == ["data", "job"]
    assert cache.delete_pattern("j*") == 1
    assert cache.lock("job").acquire(blocking=False) is True
    with pytest.raises(LockNotOwnedError):
        lock.release()


def test_alock_on_redis_asyncio(cache, raw):
    async def main():
        lock = cache.alock("job", timeout=10)
        assert isinstance(lock, redis.asyncio.lock.Lock)
        async with lock:
            assert raw.exists(cache.make_key("job")) == 1
            assert cache.lock("job").acquire(blocking=False) is False
            assert await cache.alock("job", blocking_timeout=0.1).acquire() is False
        return raw.exists(cache.make_key("job"))

    assert asyncio.run(main()) == 0


# check() ----------------------------------------------------------------------------------


def test_check_reports_ping_lease_and_listener(cache):
    result = cache.check()
    assert result["ok"] is True and result["error"] is None
    assert isinstance(result["ping_ms"], float) and result["ping_ms"] > 0
    assert result["lease_ok"] is True and result["listener_connected"] is True
    assert result["backend"] == "NearCache" and result["scope"] == "shared"
    assert result["invalidation"] == "tracking"


def test_check_of_a_closed_port_is_not_ok_and_does_not_raise(raw):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        cache = NearCache(f"redis://127.0.0.1:{port}/0", {})
        result = cache.check(timeout=0.5)
        cache._near.close()  # no listener left retrying a dead port
    assert result["ok"] is False and result["lease_ok"] is False
    assert result["error"].startswith("ConnectionError")
    assert result["ping_ms"] is None


def test_check_of_a_stalled_server_times_out(raw):
    """A server that accepts connections and never answers: check() returns, not ok."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)  # the kernel completes connections; nobody reads or replies
        cache = NearCache(f"redis://127.0.0.1:{s.getsockname()[1]}/0", {})
        result = cache.check(timeout=0.3)
        cache._near.close()
    assert result["ok"] is False and result["lease_ok"] is False
    assert result["error"].startswith("TimeoutError")


def test_check_masks_the_password(near_server, raw):
    url = near_server.url.replace("redis://", "redis://user:s3cret@")
    result = NearCache(url, {}).check(timeout=1)
    assert result["ok"] is False  # the server has no such user
    assert "s3cret" not in result["location"] and "user:***@" in result["location"]
    from django_rustcache.near import _masked

    assert _masked("redis://h/0?password=pw&db=1") == "redis://h/0?password=***&db=1"


def test_check_rejects_a_bad_timeout(cache):
    with pytest.raises(ValueError):
        cache.check(timeout=0)


def test_rustcache_check_is_always_ok_and_process_local():
    result = RustCache("ops-check", {}).check()
    assert result["ok"] is True and result["scope"] == "process"
    assert result["backend"] == "RustCache" and result["error"] is None


# manage.py rustcache stats / health --------------------------------------------------------


def test_stats_json_per_alias(aliases, raw, prefix):
    near = caches["near"]
    near.set("a", 1, timeout=None)
    near.set("b", "x", timeout=100)
    caches["default"].set("r", 1)
    data = json.loads(run("stats", "--json", "--probe"))
    assert set(data) == {"default", "other", "near", "locmem"}
    n = data["near"]
    assert n["health"]["ok"] and n["health"]["lease_ok"]
    assert n["scope"] == "shared" and n["settings"]["key_prefix"] == prefix
    assert n["redis"]["db"] == 0 and n["redis"]["db_keys"] == raw.dbsize() == 2
    assert n["redis"]["db_expires"] == 1
    assert n["redis"]["used_memory"] > 0 and n["redis"]["connected_clients"] >= 1
    assert n["redis"]["version"] and n["redis"]["server"] in ("redis", "valkey")
    assert n["listener"]["connected"] is True
    assert isinstance(n["probe"]["lag_ms"], float)  # the probe write's invalidation came back
    assert n["probe"]["key"].startswith(f"{prefix}:1:rustcache-probe:")
    assert raw.exists(n["probe"]["key"]) == 0  # and the probe key is gone
    assert n["this_process"]["l1"]["location"] == near._l1_location
    assert data["default"]["scope"] == "process"
    assert data["default"]["stats"]["entries"] == 1
    assert data["locmem"]["stats"] is None


def test_stats_counts_the_listeners_in_pubsub_mode(settings, near_server, raw, prefix):
    settings.CACHES = {
        **settings.CACHES,
        "near": {
            "BACKEND": "django_rustcache.NearCache",
            "LOCATION": near_server.url,
            "KEY_PREFIX": prefix,
            "OPTIONS": {"INVALIDATION": "pubsub"},
        },
    }
    data = json.loads(run("stats", "--json", "--probe", "--alias", "near"))["near"]
    assert data["health"]["lease_ok"] and data["health"]["invalidation"] == "pubsub"
    assert data["redis"]["channel_subscribers"] == 1  # this command's own listener
    assert isinstance(data["probe"]["lag_ms"], float)  # the PUBLISH came back to it
    assert "subscribers of the channel 1" in run("stats", "--alias", "near")


def test_stats_text(aliases, raw, prefix):
    out = run("stats", "--probe", "--alias", "near", "--alias", "locmem")
    assert f"near: NearCache {caches['near']._options.location} KEY_PREFIX {prefix!r}" in out
    assert "health: ok, PING" in out and "connected, lease ok" in out
    assert "(probe write -> invalidation applied here)" in out
    assert "L1 (this process):" in out and "Redis: " in out and "db0: 0 keys" in out
    assert "locmem: django.core.cache.backends.locmem.LocMemCache: no stats" in out
    assert "default" not in out
    out = run("stats", "--alias", "default")
    assert "default: RustCache 'tests-default' (this process only)" in out
    assert "each process has its own store" in out


def test_stats_and_health_of_an_unreachable_alias_fail_the_command(settings, raw):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        settings.CACHES = {
            **settings.CACHES,
            "down": {
                "BACKEND": "django_rustcache.NearCache",
                "LOCATION": f"redis://127.0.0.1:{s.getsockname()[1]}/0",
            },
        }
        out = StringIO()
        with pytest.raises(CommandError, match="unreachable for cache alias.*down"):
            call_command("rustcache", "stats", "--timeout", "0.5", stdout=out)
        assert "health: DOWN: ConnectionError" in out.getvalue()
        assert "default: RustCache" in out.getvalue()  # the other aliases are still reported
        with pytest.raises(CommandError, match="down"):
            call_command("rustcache", "health", "--alias", "down", stdout=StringIO())
        caches["down"]._near.close()


def test_health(aliases):
    out = run("health")
    assert "near: ok, PING" in out and "lease ok" in out
    assert "default: ok (RustCache, this process only)" in out
    assert "locmem: django.core.cache.backends.locmem.LocMemCache: no health check" in out
    data = json.loads(run("health", "--json", "--alias", "near"))
    assert data["near"]["health"]["ok"] is True


def test_unknown_alias_is_an_error(aliases):
    with pytest.raises(CommandError, match="unknown cache alias 'nope'"):
        run("stats", "--alias", "nope")
    with pytest.raises(CommandError, match="unknown cache alias"):
        run("clear", "--alias", "nope", "--noinput")


# manage.py rustcache invalidate / clear ----------------------------------------------------


def test_invalidate_tags_reaches_another_process(aliases, child, prefix):
    assert child("check") == "True"
    assert child("set_tagged k") == "'stored'"
    assert child("l1_get k") == "'value'"  # the child serves k from its L1
    out = run("invalidate", "--tags", "t", "other-tag", "--alias", "near")
    assert "near: bumped 2 tag version(s) in Redis (t, other-tag)" in out
    assert "every process" in out and "NOTE" not in out
    assert eventually(lambda: child("get k") == "None")  # once the child's listener applied it


def test_invalidate_model(aliases):
    from tests.testapp.models import Product

    near = caches["near"]
    near.set("list", [1], tags=[model_tag(Product)])
    near.set("untagged", 2)
    out = run("invalidate", "--model", "testapp.Product", "--alias", "near")
    assert near.get("list") is None and near.get("untagged") == 2
    assert "invalidated model testapp.Product" in out
    assert "near: bumped 1 tag version(s) in Redis (testapp.product)" in out
    with pytest.raises(CommandError, match="--model 'testapp.Nope'"):
        run("invalidate", "--model", "testapp.Nope", "--alias", "near")


def test_invalidate_keys(aliases, raw):
    near = caches["near"]
    near.set("a", 1)
    near.set("b", 2, version=2)
    near.set("c", 3)
    out = run("invalidate", "--keys", "a", "b", "--alias", "near")
    assert "near: deleted 2 key(s) in Redis and every process's L1" in out
    assert (near.get("a"), near.get("b", version=2), near.get("c")) == (None, 2, 3)
    run("invalidate", "--keys", "b", "--key-version", "2", "--alias", "near")
    assert near.get("b", version=2) is None
    assert raw.dbsize() == 1


def test_invalidate_a_rustcache_alias_says_it_reaches_only_this_process(aliases):
    default = caches["default"]
    default.set("k", 1, tags=["t"])
    default.set("j", 1)
    out = run("invalidate", "--tags", "t")
    assert "default: invalidated tags t: 1 entries removed" in out
    assert f"reached only this command's own process (pid {os.getpid()})" in out
    assert "usually pointless" in out
    assert default.get("k") is None  # it did act, in this process
    out = run("invalidate", "--keys", "j", "--alias", "default")
    assert "usually pointless" in out and default.get("j") is None
    with pytest.raises(CommandError, match="has no tags"):
        run("invalidate", "--tags", "t", "--alias", "locmem")


@pytest.mark.parametrize("ignore", [False, True])
def test_invalidate_with_redis_down_is_a_command_error(settings, raw, ignore):
    """A failure is reported as such, also when IGNORE_EXCEPTIONS would hide it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        settings.CACHES = {
            **settings.CACHES,
            "down": {
                "BACKEND": "django_rustcache.NearCache",
                "LOCATION": f"redis://127.0.0.1:{s.getsockname()[1]}/0",
                "OPTIONS": {"IGNORE_EXCEPTIONS": ignore},
            },
        }
        message = "IGNORE_EXCEPTIONS hid the error" if ignore else "Redis error: ConnectionError"
        with pytest.raises(CommandError, match=message):
            run("invalidate", "--tags", "t", "--alias", "down")
        if not ignore:
            with pytest.raises(CommandError, match="clear failed: Redis error"):
                run("clear", "--alias", "down", "--noinput")
        caches["down"]._near.close()


def test_clear_a_near_alias_flushes_the_db(aliases, raw, monkeypatch):
    caches["near"].set("a", 1)
    raw.set("someone-else", 1)
    monkeypatch.setattr("builtins.input", lambda prompt: "no")
    with pytest.raises(CommandError, match="cancelled"):
        run("clear", "--alias", "near")
    assert raw.dbsize() == 2
    out = run("clear", "--alias", "near", "--noinput")
    assert "near: cleared: database 0 of" in out and "FLUSHDB" in out
    assert raw.dbsize() == 0 and caches["near"].get("a") is None


def test_clear_a_rustcache_alias_says_it_reaches_only_this_process(aliases):
    caches["other"].set("k", 1)
    out = run("clear", "--alias", "other")
    assert "other: cleared (django_rustcache.backend.RustCache)" in out
    assert "usually pointless" in out
    assert caches["other"].get("k") is None
