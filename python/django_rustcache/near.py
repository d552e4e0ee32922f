"""``NearCache``: Redis/Valkey is the truth; the Rust store is a near cache (L1) in each process.

Reads answer from L1 while the invalidation listener's lease is fresh, else from Redis (one
round trip, filling L1 behind a placeholder so a racing invalidation wins). Writes go to Redis
first, then update this process's L1. Everything atomic (``add``, ``incr``, ``touch``, the results
of ``delete``/``has_key``) is decided by Redis. Values use Django's ``RedisCache`` format (ints
raw, the rest pickled); by default pickles are signed with a key derived from ``SECRET_KEY``, and
with ``COMPRESS`` those above ``COMPRESS_MIN_SIZE`` are compressed (then signed).

Every use of the Rust listener (``_core.near``) and of the placeholder fill (``Handle.fill``)
sits in ``_start_listener`` and the three ``_l1_*`` methods: without them (an older native
module, or tests that replace ``LISTENER_FACTORY``) L1 is never served and every read goes to
Redis, which is correct on its own.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import contextvars
import hashlib
import hmac
import inspect
import json
import logging
import os
import pickle
import re
import secrets
import select
import sys
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.core.cache.backends.base import DEFAULT_TIMEOUT, BaseCache, default_key_func
from django.core.exceptions import ImproperlyConfigured

from django_rustcache import _core
from django_rustcache._async import AsyncFillMixin
from django_rustcache._core import FastMethod, Handle
from django_rustcache._fill import FillMixin
from django_rustcache.backend import _Synced, _warn_key
from django_rustcache.options import (
    EVICTION_POLICIES,
    STAMPEDE_WAIT_MAX,
    TOP_LEVEL_KEYS,
    _seconds,
    int_option,
)
from django_rustcache.signals import tags_invalidated

logger = logging.getLogger("django_rustcache.near")

_MISS = object()
#: What an L1 read gives when the lease was not fresh (L1 not read): ``_get_rest`` starts over.
_STALE = object()

#: Our OPTIONS keys (upper case) and their defaults; lower-case keys go to redis-py.
NEAR_OPTION_DEFAULTS: dict[str, Any] = {
    "MAX_ENTRIES": 300,
    "CULL_FREQUENCY": 3,
    "MAX_BYTES": None,
    "EVICTION_POLICY": "lru",
    "LEASE": 0.5,
    "L1_MAX_TTL": 300.0,
    "INVALIDATION": "tracking",
    "SENTINELS": None,
    "SENTINEL_KWARGS": None,
    "SIGNED": True,
    "IGNORE_EXCEPTIONS": False,
    "STALE_IF_ERROR": None,
    "STAMPEDE_WAIT": 10.0,
    "STAMPEDE_LOCK": False,
    "COMPRESS": False,
    "COMPRESS_MIN_SIZE": 1024,
    "COMPRESS_MAX_SIZE": 64 * 2**20,
}
INVALIDATION_MODES = {"tracking": "bcast", "pubsub": "pubsub"}
#: redis-py options NearCache sets when neither OPTIONS nor LOCATION's query gives them.
_DEFAULT_SOCKET_TIMEOUTS = {"socket_timeout": 5.0, "socket_connect_timeout": 2.0}
#: redis-py's TLS options (``rediss://``) that both the data path and the Rust listener honour.
_TLS_OPTIONS = {
    "ssl_ca_certs",
    "ssl_ca_data",
    "ssl_ca_path",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_cert_reqs",
    "ssl_check_hostname",
    "ssl_min_version",
}

#: Signed values: this marker (neither an int's digits nor a pickle's first byte), the
#: HMAC-SHA256 of ``made key + NUL + pickle``, then the pickle.
SIGNED_MAGIC = b"\x00rcs1"
_MAC_LEN = 32
_SIGNING_SALT = b"django_rustcache.NearCache.signing"
#: Compressed pickles (``_core.compress``'s frames, src/compress.rs): this marker, then a zstd
#: frame, or the size (u32 LE) and an LZ4 block. Signed, the frame is what the HMAC covers
#: (``SIGNED_MAGIC`` + MAC + frame), so nothing unverified is ever decompressed.
ZSTD_MAGIC = b"\x00rcz1"
LZ4_MAGIC = b"\x00rcl1"
_COMPRESSED = (ZSTD_MAGIC, LZ4_MAGIC)
#: ``OPTIONS["COMPRESS"]`` values and the codec each means (True: zstd, see the README).
_CODECS: dict[Any, str] = {True: "zstd", "zstd": "zstd", "lz4": "lz4"}

# Lua, so that each operation is one round trip and atomic. A GET reply of nil is `false` in
# Lua and comes back as nil inside the array.
_LUA_GET = "return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}"
_LUA_MGET = """
local v = redis.call('MGET', unpack(KEYS))
local t = {}
for i = 1, #KEYS do t[i] = redis.call('PTTL', KEYS[i]) end
return {v, t}
"""
# Tagged entries: TAGGED_MAGIC, 8 hex digits giving the header's length, the header (a JSON list
# [tag key, version, tag key, version, ...]), then the value in the untagged format. `stale(v)`
# tells whether such an entry was built against a tag version that has since moved (or gone).
_LUA_STALE = r"""
local function stale(v)
  if not v or string.sub(v, 1, 5) ~= '\0rct1' then return false end
  local n = tonumber(string.sub(v, 6, 13), 16)
  local ok, h = pcall(cjson.decode, string.sub(v, 14, 13 + (n or 0)))
  if not ok or type(h) ~= 'table' then return true end
  for i = 1, #h, 2 do
    if redis.call('GET', h[i]) ~= h[i + 1] then return true end
  end
  return false
end
"""
# KEYS: the made key, then the tag keys of a snapshot; ARGV: data, PX ('' = none), '1' for NX,
# channel, then the snapshot's versions. -1: a snapshot tag moved (a set then deletes the key, as
# storing an already invalid entry would); 0: NX and a live entry is there; 1: stored. An entry
# whose tags moved counts as absent for NX, as RustCache has already dropped it.
_LUA_SET = (
    _LUA_STALE
    + """
for i = 2, #KEYS do
  if redis.call('GET', KEYS[i]) ~= ARGV[3 + i] then
    if ARGV[3] ~= '1' and redis.call('DEL', KEYS[1]) == 1 and ARGV[4] ~= '' then
      redis.call('PUBLISH', ARGV[4], KEYS[1])
    end
    return -1
  end
end
if ARGV[3] == '1' then
  local cur = redis.call('GET', KEYS[1])
  if cur and not stale(cur) then return 0 end
end
if ARGV[2] == '' then
  redis.call('SET', KEYS[1], ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
if ARGV[4] ~= '' then redis.call('PUBLISH', ARGV[4], KEYS[1]) end
return 1
"""
)
# KEYS: tag keys; ARGV: a fresh random seed per key, then the channel. A missing (never set,
# evicted or flushed) version is seeded with a random value, never reset to a small number, so an
# eviction cannot make entries built against an old version current again.
_LUA_TAG_VERSIONS = """
local ch = ARGV[#KEYS + 1]
local out = {}
for i = 1, #KEYS do
  local v = redis.call('GET', KEYS[i])
  if not v then
    v = ARGV[i]
    redis.call('SET', KEYS[i], v)
    if ch ~= '' then redis.call('PUBLISH', ch, KEYS[i]) end
  end
  out[i] = v
end
return out
"""
# invalidate_tags: INCR every tag key at once (a missing or non-integer one gets a new seed).
_LUA_BUMP = """
local ch = ARGV[#KEYS + 1]
for i = 1, #KEYS do
  local r = {err = 'missing'}
  if redis.call('EXISTS', KEYS[i]) == 1 then r = redis.pcall('INCR', KEYS[i]) end
  if type(r) == 'table' and r.err then redis.call('SET', KEYS[i], ARGV[i]) end
  if ch ~= '' then redis.call('PUBLISH', ch, KEYS[i]) end
end
return #KEYS
"""
# `live(k)`: the key exists and, if it is a tagged entry, none of its tags moved (RustCache has
# dropped an entry whose tags moved; here it stays in Redis until overwritten or expired, so
# has_key, ttl, touch and incr must not see it). Only a tagged entry is read whole.
_LUA_LIVE = (
    _LUA_STALE
    + r"""
local function tagged(k)
  return redis.call('TYPE', k).ok == 'string' and redis.call('GETRANGE', k, 0, 4) == '\0rct1'
end
local function live(k)
  if redis.call('EXISTS', k) == 0 then return false end
  return not (tagged(k) and stale(redis.call('GET', k)))
end
"""
)
_LUA_HAS = _LUA_LIVE + "return live(KEYS[1]) and 1 or 0"
_LUA_TTL = _LUA_LIVE + "if not live(KEYS[1]) then return -2 end return redis.call('PTTL', KEYS[1])"
# incr of a tagged integer rewrites the value behind its header (KEEPTTL), so it keeps its tags,
# as RustCache's does; Lua's numbers are doubles, so past 2**53 it refuses rather than round.
_LUA_INCR = (
    _LUA_LIVE
    + r"""
if not live(KEYS[1]) then return false end
local v
if tagged(KEYS[1]) then
  local cur = redis.call('GET', KEYS[1])
  local n = tonumber(string.sub(cur, 6, 13), 16)
  local body = string.sub(cur, 14 + n)
  if not string.match(body, '^-?%d+$') then
    return redis.error_reply('ERR value is not an integer or out of range')
  end
  v = tonumber(body) + tonumber(ARGV[1])
  if math.abs(tonumber(body)) >= 2^53 or math.abs(v) >= 2^53 then
    return redis.error_reply('ERR a tagged integer past 2**53 cannot be incremented')
  end
  redis.call('SET', KEYS[1], string.sub(cur, 1, 13 + n) .. string.format('%d', v), 'KEEPTTL')
else
  v = redis.call('INCRBY', KEYS[1], ARGV[1])
end
if ARGV[2] ~= '' then redis.call('PUBLISH', ARGV[2], KEYS[1]) end
return v
"""
)
_LUA_TOUCH = (
    _LUA_LIVE
    + """
if not live(KEYS[1]) then return 0 end
if ARGV[1] == '' then
  redis.call('PERSIST', KEYS[1])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
if ARGV[2] ~= '' then redis.call('PUBLISH', ARGV[2], KEYS[1]) end
return 1
"""
)
# STAMPEDE_LOCK's release: delete the lock only if it is still this holder's (its token), so a
# holder whose lock expired never frees a successor's; in pubsub mode, tell the listeners (in
# tracking mode the DEL itself invalidates the key everywhere), which wakes the waiters.
_LUA_UNLOCK = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if ARGV[2] ~= '' then redis.call('PUBLISH', ARGV[2], KEYS[1]) end
return 1
"""
# STAMPEDE_LOCK's extension while its holder computes: only if it is still this holder's (its
# token), like the release. No PUBLISH: the waiters have nothing to read yet.
_LUA_EXTEND = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
TAGGED_MAGIC = b"\x00rct1"
_MGET_CHUNK = 1000  # Lua's unpack() has a stack limit; get_many reads in chunks this size


@dataclass(frozen=True)
class _Script:
    src: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.src.encode()).hexdigest())


_GET, _MGET, _INCR, _TOUCH = (_Script(s) for s in (_LUA_GET, _LUA_MGET, _LUA_INCR, _LUA_TOUCH))
_SET, _TAG_VERSIONS, _BUMP = (_Script(s) for s in (_LUA_SET, _LUA_TAG_VERSIONS, _LUA_BUMP))
_HAS, _TTL = _Script(_LUA_HAS), _Script(_LUA_TTL)
_UNLOCK, _EXTEND = _Script(_LUA_UNLOCK), _Script(_LUA_EXTEND)


@dataclass(frozen=True)
class _Held:
    """A STAMPEDE_LOCK this call took: its key, its token, and the process that took it (a
    fork() child running on from inside ``default()`` holds nothing)."""

    lock: str
    token: str
    pid: int


#: What ``_op_stampede`` returns when the caller is to compute without the lock.
_UNLOCKED = object()
#: The STAMPEDE_LOCK keys held by this thread or task: a ``default()`` that asks for its own key
#: again computes it at once, instead of waiting for the lock it holds itself.
_HELD_LOCKS: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "django_rustcache_near_held_locks", default=frozenset()
)
#: A STAMPEDE_LOCK waiter's poll of the lock in Redis: first and longest interval (seconds),
#: and how often it looks, in between, for the release's invalidation at its own listener.
_LOCK_POLL_FIRST = 0.005
_LOCK_POLL_MAX = 0.1
_LOCK_TICK = 0.005
#: A holder's lock is extended (to a full ``STAMPEDE_LOCK`` again) every third of that while it
#: computes, up to this many ``STAMPEDE_LOCK``s after it was taken; a waiter waits at most one
#: more (a successor's computation) before it computes without the lock.
_LOCK_LIFE = 4


class _Renewal:
    """A held STAMPEDE_LOCK that ``_RENEWER`` keeps alive until ``cancel()`` (its computation
    ended) or ``_LOCK_LIFE`` expiries have passed."""

    def __init__(self, renewer: _Renewer, cache: NearCache, held: _Held, seconds: float) -> None:
        self.renewer, self.cache, self.held = renewer, cache, held
        self.seconds = seconds
        now = time.monotonic()
        self.due = now + seconds / 3
        self.end = now + _LOCK_LIFE * seconds

    def cancel(self) -> None:
        """Stop extending. In a fork() child the lock is the parent's, and so is the renewer."""
        if self.held.pid == os.getpid():
            self.renewer.cancel(self)

    def renew(self) -> bool:
        """Extend the lock by one expiry (not past ``end``), by token: whether to go on (not
        once the lock is lost or ``end`` is reached). A Redis error is logged; the next try
        comes a third of an expiry later, while the lock may still be alive."""
        cache, held = self.cache, self.held
        ms = min(round(self.seconds * 1000), int((self.end - time.monotonic()) * 1000))
        if ms <= 0:
            return False
        try:
            if not cache._run(cache._script(_EXTEND, [held.lock], held.token, ms)):
                return False  # expired (the holder stalled) or taken by another since
        except Exception as e:  # noqa: BLE001 (this thread must go on serving the others)
            cache._counters.add(errors=1)
            logger.warning(
                "NearCache %r: extending get_or_set's STAMPEDE_LOCK failed: %r",
                cache._options.location,
                e,
            )
        self.due = time.monotonic() + self.seconds / 3
        return ms >= round(self.seconds * 1000)


class _Renewer:
    """Extends the STAMPEDE_LOCKs this process's holders compute under, from one thread for
    all of them (a holder's own thread is busy in ``default()``, and so may be an async
    holder's loop). The thread runs only while a lock is held; a fork() child gets a new
    ``_Renewer`` (``_renewer_after_fork``), so it never counts on a thread it did not start."""

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.held: list[_Renewal] = []
        self.thread: threading.Thread | None = None

    def hold(self, cache: NearCache, held: _Held) -> _Renewal:
        """Start keeping ``held`` alive; ``cancel()`` the result once computed."""
        renewal = _Renewal(self, cache, held, cache._options.stampede_lock)
        with self.cond:
            if self.thread is None:
                thread = threading.Thread(
                    target=self._loop, name="django-rustcache-lock-renewer", daemon=True
                )
                thread.start()  # if this raises, nothing is registered (and no thread assumed)
                self.thread = thread  # before _loop can look: it waits for this condition
            self.held.append(renewal)
            self.cond.notify()
        return renewal

    def cancel(self, renewal: _Renewal) -> None:
        with self.cond:
            if renewal in self.held:
                self.held.remove(renewal)
                self.cond.notify()

    def _loop(self) -> None:
        """Renew whichever lock is due next; exit once none is held."""
        while True:
            with self.cond:
                while True:
                    if not self.held:
                        self.thread = None
                        return
                    renewal = min(self.held, key=_due)
                    left = renewal.due - time.monotonic()
                    if left <= 0:
                        break
                    self.cond.wait(left)
            go_on = renewal.renew()  # one round trip, without the condition's lock
            if not go_on:
                self.cancel(renewal)


def _due(renewal: _Renewal) -> float:
    return renewal.due


_RENEWER = _Renewer()


def _renewer_after_fork() -> None:
    # The parent's renewer thread does not run here, and its locks are not this process's.
    global _RENEWER
    _RENEWER = _Renewer()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renewer_after_fork)


def _seed() -> str:
    """A fresh tag version: random, never 0, with room left for INCR below 2**63."""
    return str(secrets.randbits(62) + 1)


@dataclass(frozen=True)
class NearTagSnapshot:
    """Tag versions read by ``NearCache.snapshot_tags``: ``(tag key, version)`` pairs."""

    versions: tuple[tuple[str, str], ...]


class _Tagged:
    """A tagged value as L1 holds it (and ``_decode`` returns it): valid while its versions hold."""

    __slots__ = ("value", "versions")

    def __init__(self, value: Any, versions: tuple[tuple[str, str], ...]) -> None:
        self.value = value
        self.versions = versions

    def __reduce__(self) -> Any:
        return (_Tagged, (self.value, self.versions))


def _tag_names(tags: Any) -> list[str]:
    """The tags as a list of str (a str alone is refused, as RustCache does)."""
    if isinstance(tags, (str, bytes)):
        raise TypeError("tags must be an iterable of str, not a str")
    names = list(tags)
    for tag in names:
        if not isinstance(tag, str):
            raise TypeError(f"a tag must be a str, not {type(tag).__name__}")
    return names


def _redis() -> Any:
    """redis-py, imported on first use so that RustCache alone never needs it."""
    try:
        import redis
        import redis.asyncio  # noqa: F401
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImproperlyConfigured(
            "django_rustcache.NearCache needs redis-py: pip install 'redis>=5' (and hiredis)."
        ) from None
    return redis


def _conn_errors() -> tuple[type[BaseException], ...]:
    """Errors meaning "Redis unreachable" (what IGNORE_EXCEPTIONS and STALE_IF_ERROR cover)."""
    exc = _redis().exceptions
    return (exc.ConnectionError, exc.TimeoutError)


# Options ---------------------------------------------------------------------------------

#: Options redis-py's pools take besides the Connection arguments (Django's RedisCache names).
_POOL_EXTRA = {"pool_class", "parser_class", "max_connections", "connection_class", "timeout"}
#: Options that only make sense for the synchronous client (dropped for redis.asyncio).
_SYNC_ONLY = {"pool_class", "parser_class", "connection_class", "retry"}


def _redis_py_options() -> set[str]:
    """The keyword arguments that redis-py's connection pools accept (from its signatures)."""
    redis = _redis()
    names = set(_POOL_EXTRA)
    for fn in (
        redis.connection.AbstractConnection.__init__,
        redis.connection.Connection.__init__,
        redis.connection.UnixDomainSocketConnection.__init__,
        redis.connection.SSLConnection.__init__,
    ):
        names.update(
            p.name
            for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"
        )
    return names


def _number(where: str, name: str, value: Any, *, zero_ok: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ImproperlyConfigured(
            f"{where}: OPTIONS[{name!r}] must be a number of seconds, not {value!r}."
        )
    if value < 0 or (value == 0 and not zero_ok) or value == float("inf"):
        bound = ">= 0" if zero_ok else "> 0"
        raise ImproperlyConfigured(
            f"{where}: OPTIONS[{name!r}] must be a finite number {bound}, not {value!r}."
        )
    return float(value)


def _bool(where: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ImproperlyConfigured(
            f"{where}: OPTIONS[{name!r}] must be True or False, not {value!r}."
        )
    return value


#: ``OPTIONS["STAMPEDE_LOCK"] = True``: the lock's expiry, in seconds.
STAMPEDE_LOCK_DEFAULT = 10.0


def _stampede_lock(where: str, value: Any) -> float:
    """``STAMPEDE_LOCK`` as the lock's expiry in seconds (0.0: off): True is
    ``STAMPEDE_LOCK_DEFAULT``; False, None or 0 turn it off."""
    if value is None or value is False:
        return 0.0
    if value is True:
        return STAMPEDE_LOCK_DEFAULT
    if (
        not isinstance(value, (int, float))
        or not value >= 0  # NaN too
        or value == float("inf")
    ):
        raise ImproperlyConfigured(
            f"{where}: OPTIONS['STAMPEDE_LOCK'] must be True, False or the lock's expiry in "
            f"seconds (a finite number >= 0), not {value!r}."
        )
    return min(float(value), STAMPEDE_WAIT_MAX)  # a year: Redis refuses a PX past ~2**63 ms


def _size(where: str, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ImproperlyConfigured(
            f"{where}: OPTIONS[{name!r}] must be a whole number of bytes >= {minimum}, "
            f"not {value!r}."
        )
    return value


def _compress_options(where: str, o: dict[str, Any]) -> tuple[str | None, int, int]:
    """``COMPRESS`` (the codec or None), ``COMPRESS_MIN_SIZE`` and ``COMPRESS_MAX_SIZE``."""
    setting = o["COMPRESS"]
    if setting is False or setting is None:
        codec = None
    elif isinstance(setting, (bool, str)) and setting in _CODECS:
        codec = _CODECS[setting]
    else:
        raise ImproperlyConfigured(
            f"{where}: OPTIONS['COMPRESS'] must be False, True (zstd), 'zstd' or 'lz4', "
            f"not {setting!r}."
        )
    if codec is not None and not hasattr(_core, "compress"):  # pragma: no cover - old build
        raise ImproperlyConfigured(
            f"{where}: OPTIONS['COMPRESS'] needs a native module with compression; "
            "rebuild django-rustcache."
        )
    min_size = _size(where, "COMPRESS_MIN_SIZE", o["COMPRESS_MIN_SIZE"], 0)
    # Anything past a machine word means "no bound" (Redis holds at most 512 MB a value anyway).
    max_size = min(_size(where, "COMPRESS_MAX_SIZE", o["COMPRESS_MAX_SIZE"], 1), sys.maxsize)
    if codec is not None and min_size > max_size:
        raise ImproperlyConfigured(
            f"{where}: OPTIONS['COMPRESS_MIN_SIZE'] ({min_size}) is above "
            f"OPTIONS['COMPRESS_MAX_SIZE'] ({max_size}): nothing would be compressed."
        )
    return codec, min_size, max_size


#: ``OPTIONS['SENTINEL_KWARGS']`` keys: how to reach the sentinels themselves (redis-py's
#: ``sentinel_kwargs``); the listener honours the credentials and uses its connect timeout.
_SENTINEL_KWARGS = {"username", "password", "socket_timeout", "socket_connect_timeout"}
_SENTINEL_PORT = 26379
_SENTINEL_HOST = re.compile(
    r"\[(?P<v6>[0-9A-Fa-f:.]+)\](?::(?P<p6>[^:]*))?|(?P<h>[^:\[\]]+)(?::(?P<p>.*))?"
)


@dataclass(frozen=True)
class SentinelSpec:
    """Where the master of a ``sentinel://`` LOCATION is found, and how to log in to it."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    #: The URL's credentials, db and query (redis-py's ``parse_url``), for the master.
    url: tuple[tuple[str, Any], ...]
    #: ``OPTIONS['SENTINEL_KWARGS']`` (None: redis-py's default, the socket timeouts).
    kwargs: tuple[tuple[str, Any], ...] | None = None

    def sentinel_kwargs(self, options: dict[str, Any]) -> dict[str, Any]:
        """redis-py's ``sentinel_kwargs``: ours, else the socket timeouts of ``options``."""
        if self.kwargs is not None:
            return dict(self.kwargs)
        return {k: v for k, v in options.items() if k.startswith("socket_")}

    def listener(self) -> dict[str, Any]:
        """The Rust listener's ``sentinel`` argument."""
        kwargs = dict(self.kwargs or ())
        return {
            "sentinels": list(self.sentinels),
            "service": self.service,
            "username": kwargs.get("username"),
            "password": kwargs.get("password"),
        }


def _sentinel_location(where: str, location: str) -> tuple[dict[str, Any], SentinelSpec]:
    """``sentinel://[user:pass@]host[:port][,host[:port]...]/service[/db][?query]``: redis-py's
    ``parse_url`` of the master's part (credentials, db, query) and the sentinels."""
    from urllib.parse import unquote

    usage = "sentinel://host:port[,host:port...]/service_name[/db]"
    rest = location.split("://", 1)[1]
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, netloc = netloc.rpartition("@")
    sentinels = []
    for part in netloc.split(","):
        m = _SENTINEL_HOST.fullmatch(part.strip())
        host = m and (m["v6"] or m["h"])
        port_text = m and (m["p6"] if m["v6"] else m["p"])
        if not host or (port_text is not None and not port_text.isdigit()):
            raise ImproperlyConfigured(
                f"{where}: {part!r} is not a sentinel's host[:port]; expected {usage}."
            )
        port = int(port_text) if port_text is not None else _SENTINEL_PORT
        if not 0 < port < 65536:
            raise ImproperlyConfigured(f"{where}: sentinel port {port} is out of range.")
        sentinels.append((host, port))
    segments = path.split("/") if path else []
    if segments and segments[-1] == "":
        segments.pop()  # a trailing slash
    if not segments or not segments[0] or len(segments) > 2:
        raise ImproperlyConfigured(
            f"{where}: a Sentinel LOCATION names the service (the sentinels' master name) "
            f"and optionally the db: {usage}."
        )
    service = unquote(segments[0])
    db = segments[1] if len(segments) > 1 else "0"
    if not db.isdigit():
        raise ImproperlyConfigured(f"{where}: the db must be a number, not {db!r}.")
    master = f"redis://{userinfo}{at}localhost/{db}" + (f"?{query}" if query else "")
    try:
        url = _redis().connection.parse_url(master)
    except ValueError as e:
        raise ImproperlyConfigured(f"{where}: LOCATION is not a valid URL: {e}") from None
    url.pop("host", None)
    url.pop("port", None)
    return url, SentinelSpec(tuple(sentinels), service, tuple(sorted(url.items())))


def _django_redis_sentinel(
    where: str, scheme: str, sentinel: SentinelSpec | None, url: dict[str, Any], given: Any
) -> tuple[dict[str, Any], SentinelSpec]:
    """django-redis's form: ``OPTIONS['SENTINELS']`` lists the sentinels' (host, port) and
    LOCATION is ``redis://[user:pass@]service_name[:port]/db`` (its host is the service)."""
    if scheme != "redis" or sentinel is not None or not url.get("host"):
        raise ImproperlyConfigured(
            f"{where}: OPTIONS['SENTINELS'] needs LOCATION 'redis://service_name/db' "
            "(django-redis's form); or give sentinel://host:port[,host:port...]/service_name/db."
        )
    addrs = []
    for item in given if isinstance(given, (list, tuple)) else [given]:
        if not (
            isinstance(item, (list, tuple))
            and len(item) == 2
            and isinstance(item[0], str)
            and item[0]
            and isinstance(item[1], int)
            and not isinstance(item[1], bool)
            and 0 < item[1] < 65536
        ):
            raise ImproperlyConfigured(
                f"{where}: OPTIONS['SENTINELS'] must be a list of (host, port) pairs, "
                f"not {given!r}."
            )
        addrs.append((item[0], item[1]))
    if not addrs:
        raise ImproperlyConfigured(f"{where}: OPTIONS['SENTINELS'] is empty.")
    master = {k: v for k, v in url.items() if k not in ("host", "port")}
    master.setdefault("db", 0)
    spec = SentinelSpec(tuple(addrs), url["host"], tuple(sorted(master.items())))
    return master, spec


def _sentinel_kwargs(where: str, given: Any) -> tuple[tuple[str, Any], ...] | None:
    """``OPTIONS['SENTINEL_KWARGS']``, checked: None or a dict of ``_SENTINEL_KWARGS``."""
    if given is None:
        return None
    if not isinstance(given, dict):
        raise ImproperlyConfigured(
            f"{where}: OPTIONS['SENTINEL_KWARGS'] must be a dict, not {type(given).__name__}."
        )
    for name, value in given.items():
        if name not in _SENTINEL_KWARGS:
            raise ImproperlyConfigured(
                f"{where}: OPTIONS['SENTINEL_KWARGS'] key {name!r} is not supported; expected "
                f"{', '.join(sorted(_SENTINEL_KWARGS))} (TLS to the sentinels is not supported)."
            )
        if name in ("username", "password") and not isinstance(value, str):
            raise ImproperlyConfigured(
                f"{where}: OPTIONS['SENTINEL_KWARGS'][{name!r}] must be a str."
            )
        if name.startswith("socket_") and (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not 0 < value < float("inf")
        ):
            raise ImproperlyConfigured(
                f"{where}: OPTIONS['SENTINEL_KWARGS'][{name!r}] must be a finite number of "
                f"seconds > 0, not {value!r}."
            )
    return tuple(sorted(given.items()))


@dataclass(frozen=True)
class NearOptions:
    """The validated settings of a NearCache alias."""

    location: str
    url: dict[str, Any]  # redis-py's parse_url() of LOCATION
    max_bytes: int | None
    eviction_policy: str
    lease: float
    l1_max_ttl: float
    invalidation: str
    signed: bool
    #: The codec pickles of ``compress_min_size`` bytes up to ``compress_max_size`` are
    #: compressed with ("zstd", "lz4"; None: off). Reads decode by marker, whatever this says.
    compress: str | None
    compress_min_size: int
    #: The most bytes a compressed value may inflate to on a read (larger: a logged miss).
    compress_max_size: int
    ignore_exceptions: bool
    stale_if_error: float | None
    redis_options: dict[str, Any]
    #: A ``sentinel://`` LOCATION: the sentinels and the service; None: a single server.
    sentinel: SentinelSpec | None = None
    #: Seconds a get_or_set caller waits for another thread's fill of the same key (0: off).
    stampede_wait: float = 10.0
    #: The cross-process ``get_or_set`` lock's expiry in seconds (0.0: no lock).
    stampede_lock: float = 0.0
    #: ``rediss://``: the listener's TLS settings (``_core.near(tls=...)``); None: plaintext.
    tls: dict[str, Any] | None = None

    @classmethod
    def from_params(cls, location: Any, params: dict[str, Any]) -> NearOptions:
        """Check a CACHES entry; ImproperlyConfigured names the setting that is wrong."""
        where = f"NearCache LOCATION {location!r}"
        sentinel = None
        if isinstance(location, str) and location[:11].lower() == "sentinel://":
            url, sentinel = _sentinel_location(where, location)
        elif isinstance(location, (list, tuple)) or (
            isinstance(location, str) and re.search("[;,]", location)
        ):
            raise ImproperlyConfigured(
                f"{where}: a list of servers is not supported: give one redis://, rediss:// or "
                "unix:// URL, or sentinel://host:port[,host:port...]/service_name[/db] for "
                "Redis Sentinel (Redis Cluster and client-side sharding are not supported)."
            )
        if not isinstance(location, str) or not location:
            raise ImproperlyConfigured(
                f"{where}: LOCATION must be a redis://, rediss://, unix:// or sentinel:// URL, "
                "e.g. 'redis://127.0.0.1:6379/0'."
            )
        scheme = location.split("://", 1)[0].lower() if "://" in location else ""
        if scheme not in ("redis", "rediss", "unix", "sentinel"):
            raise ImproperlyConfigured(
                f"{where}: LOCATION must start with redis://, rediss://, unix:// or "
                f"sentinel://, not {location!r}."
            )
        if sentinel is None:
            try:
                url = _redis().connection.parse_url(location)
            except ValueError as e:
                raise ImproperlyConfigured(f"{where}: LOCATION is not a valid URL: {e}") from None
        unknown = sorted(set(params) - TOP_LEVEL_KEYS)
        if unknown:
            raise ImproperlyConfigured(
                f"{where}: unknown setting {unknown[0]!r}; expected one of "
                f"{', '.join(sorted(k for k in TOP_LEVEL_KEYS if k.isupper()))}."
            )
        options = params.get("OPTIONS", {})
        if not isinstance(options, dict):
            raise ImproperlyConfigured(
                f"{where}: OPTIONS must be a dict, not {type(options).__name__}."
            )
        ours = {k: v for k, v in options.items() if isinstance(k, str) and k.isupper()}
        theirs = {k: v for k, v in options.items() if k not in ours}
        unknown = sorted(set(ours) - set(NEAR_OPTION_DEFAULTS))
        if unknown:
            raise ImproperlyConfigured(
                f"{where}: unknown OPTIONS key {unknown[0]!r}; expected one of "
                f"{', '.join(NEAR_OPTION_DEFAULTS)} or a redis-py connection option."
            )
        o = {**NEAR_OPTION_DEFAULTS, **ours}
        if o["SENTINELS"] is not None:
            url, sentinel = _django_redis_sentinel(where, scheme, sentinel, url, o["SENTINELS"])
        for name in sorted(theirs, key=str):
            if not isinstance(name, str):
                raise ImproperlyConfigured(f"{where}: OPTIONS key {name!r} is not a string.")
            if sentinel is not None and (
                name.startswith("ssl") or name in ("pool_class", "connection_class")
            ):
                raise ImproperlyConfigured(
                    f"{where}: OPTIONS[{name!r}] is not supported with Sentinel (NearCache "
                    "uses redis-py's SentinelConnectionPool, without TLS)."
                )
            if name.startswith("ssl") and name not in _TLS_OPTIONS:
                raise ImproperlyConfigured(
                    f"{where}: OPTIONS[{name!r}] is not supported by NearCache: its invalidation "
                    f"listener (rustls) honours only {', '.join(sorted(_TLS_OPTIONS))}."
                )
            if name.startswith("ssl") and scheme != "rediss":
                raise ImproperlyConfigured(
                    f"{where}: OPTIONS[{name!r}] is a TLS option: TLS needs a rediss:// LOCATION."
                )
            if name == "serializer":
                raise ImproperlyConfigured(
                    f"{where}: OPTIONS['serializer'] is not supported: NearCache stores Django "
                    "RedisCache's format (see OPTIONS['SIGNED'])."
                )
            if name == "decode_responses" and theirs[name]:
                raise ImproperlyConfigured(
                    f"{where}: OPTIONS['decode_responses'] must be False: values are bytes."
                )
            if name not in _redis_py_options():
                raise ImproperlyConfigured(
                    f"{where}: unknown OPTIONS key {name!r}: neither a NearCache option "
                    f"({', '.join(NEAR_OPTION_DEFAULTS)}) nor a redis-py connection option."
                )
        # A worker must never hang on a stalled server (redis-py waits forever by default): a
        # timeout for every socket operation, unless the OPTIONS or the URL's query give one.
        for name, seconds in _DEFAULT_SOCKET_TIMEOUTS.items():
            theirs.setdefault(name, seconds)
        tls = None
        if scheme == "rediss":
            for name in sorted(k for k in url if k.startswith("ssl") and k not in _TLS_OPTIONS):
                raise ImproperlyConfigured(
                    f"{where}: {name} in LOCATION's query is not supported by NearCache: its "
                    f"invalidation listener honours only {', '.join(sorted(_TLS_OPTIONS))}."
                )
            tls = _tls_settings(where, {**theirs, **url})
            if tls["check_hostname"]:
                # Host names are verified, as redis-py 6+ does by default (5.x did not): said
                # to redis-py too, so that both paths verify them whatever its version.
                theirs.setdefault("ssl_check_hostname", True)
        policy = o["EVICTION_POLICY"]
        if not isinstance(policy, str) or policy not in EVICTION_POLICIES:
            raise ImproperlyConfigured(
                f"{where}: OPTIONS['EVICTION_POLICY'] must be one of "
                f"{', '.join(map(repr, EVICTION_POLICIES))}, not {policy!r}."
            )
        int_option(where, "MAX_ENTRIES", o["MAX_ENTRIES"], 1)
        int_option(where, "CULL_FREQUENCY", o["CULL_FREQUENCY"], 0)
        max_bytes = o["MAX_BYTES"]
        if max_bytes is not None:
            max_bytes = int_option(where, "MAX_BYTES", max_bytes, 1)
        mode = o["INVALIDATION"]
        if mode not in INVALIDATION_MODES:
            raise ImproperlyConfigured(
                f"{where}: OPTIONS['INVALIDATION'] must be 'tracking' or 'pubsub', not {mode!r}."
            )
        sentinel_kwargs = _sentinel_kwargs(where, o["SENTINEL_KWARGS"])
        if sentinel_kwargs is not None:
            if sentinel is None:
                raise ImproperlyConfigured(
                    f"{where}: OPTIONS['SENTINEL_KWARGS'] needs a sentinel:// LOCATION."
                )
            sentinel = SentinelSpec(sentinel.sentinels, sentinel.service, sentinel.url,
                                    sentinel_kwargs)  # fmt: skip
        stale = o["STALE_IF_ERROR"]
        if stale is not None:
            stale = _number(where, "STALE_IF_ERROR", stale, zero_ok=True) or None
        compress, min_size, max_size = _compress_options(where, o)
        return cls(
            location=location,
            url=url,
            max_bytes=max_bytes,
            eviction_policy=policy,
            lease=_number(where, "LEASE", o["LEASE"]),
            l1_max_ttl=_number(where, "L1_MAX_TTL", o["L1_MAX_TTL"]),
            invalidation=mode,
            signed=_bool(where, "SIGNED", o["SIGNED"]),
            compress=compress,
            compress_min_size=min_size,
            compress_max_size=max_size,
            ignore_exceptions=_bool(where, "IGNORE_EXCEPTIONS", o["IGNORE_EXCEPTIONS"]),
            stale_if_error=stale,
            redis_options=theirs,
            sentinel=sentinel,
            # Checked as RustCache's STAMPEDE_WAIT is.
            stampede_wait=_seconds(where, "OPTIONS['STAMPEDE_WAIT']", o["STAMPEDE_WAIT"]),
            stampede_lock=_stampede_lock(where, o["STAMPEDE_LOCK"]),
            tls=tls,
        )


def _tls_settings(where: str, options: dict[str, Any]) -> dict[str, Any]:
    """The listener's TLS settings from redis-py's ``ssl_*`` options (LOCATION's query wins, as
    in redis-py's ``from_url``), checked so that both paths are sure to mean the same."""
    import ssl

    def given(name: str) -> Any:
        return options.get(f"ssl_{name}")

    reqs = given("cert_reqs")
    if reqs is None:
        reqs = "required"
    if isinstance(reqs, int) and not isinstance(reqs, bool):  # ssl.VerifyMode, as redis-py takes
        modes = {
            ssl.CERT_NONE: "none",
            ssl.CERT_OPTIONAL: "optional",
            ssl.CERT_REQUIRED: "required",
        }
        reqs = modes.get(reqs, reqs)
    if reqs not in ("none", "optional", "required"):
        raise ImproperlyConfigured(
            f"{where}: OPTIONS['ssl_cert_reqs'] must be 'required', 'optional', 'none' or an "
            f"ssl.VerifyMode, not {given('cert_reqs')!r}."
        )
    check_hostname = given("check_hostname")
    if check_hostname is None:
        check_hostname = True  # redis-py 6+'s default
    if not isinstance(check_hostname, bool):
        raise ImproperlyConfigured(
            f"{where}: OPTIONS['ssl_check_hostname'] must be True or False, not {check_hostname!r}."
        )
    min_version = given("min_version")
    if min_version is not None:
        if not isinstance(min_version, ssl.TLSVersion):
            raise ImproperlyConfigured(
                f"{where}: OPTIONS['ssl_min_version'] must be an ssl.TLSVersion, "
                f"not {min_version!r}."
            )
        # rustls speaks TLS 1.2 and 1.3 only: any minimum up to 1.2 is met.
        top = (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.MAXIMUM_SUPPORTED)
        min_version = "1.3" if min_version in top else "1.2"
    ca_data = given("ca_data")
    if isinstance(ca_data, (bytes, bytearray)):  # DER, as Python's ssl takes it
        ca_data = ssl.DER_cert_to_PEM_cert(bytes(ca_data))
    # As redis-py: without verification of the chain, no verification of the name either.
    check_hostname = check_hostname and reqs != "none"
    settings_: dict[str, Any] = {"cert_reqs": reqs, "check_hostname": check_hostname}
    for name in ("ca_certs", "ca_path", "certfile", "keyfile"):
        value = given(name)
        if value is not None:
            if not isinstance(value, (str, os.PathLike)):
                raise ImproperlyConfigured(
                    f"{where}: OPTIONS['ssl_{name}'] must be a path, not {value!r}."
                )
            settings_[name] = os.fspath(value)
    if ca_data is not None:
        settings_["ca_data"] = ca_data
    if min_version is not None:
        settings_["min_version"] = min_version
    return settings_


# Process-wide state: one client (and pool) per (process, LOCATION + redis options) ------------


#: How many master switches this process's listeners acted on (one C call, read per command).
_switches: Callable[[], int] = _core.sentinel_switches


class _Conn:
    """The long-lived redis-py clients of one LOCATION in this process (sync, and per loop).

    Behind Sentinel, the clients follow the listeners' ``+switch-master`` (``_follow``): when
    ``_switches()`` moved since this connection last looked (one C call per command), the
    connections to the old master are dropped before the command is sent, and the next ones ask
    the sentinel that announced the switch first (the others may not have switched yet)."""

    def __init__(
        self, location: str, options: dict[str, Any], sentinel: SentinelSpec | None = None
    ) -> None:
        redis = _redis()
        opts = dict(options)
        self._sentinel = sentinel
        pool_class = opts.pop("pool_class", None) or redis.ConnectionPool
        if isinstance(pool_class, str):
            from django.utils.module_loading import import_string

            pool_class = import_string(pool_class)
        if isinstance(opts.get("parser_class"), str):
            from django.utils.module_loading import import_string

            opts["parser_class"] = import_string(opts["parser_class"])
        self.location = location
        #: The ``_switches()`` count this connection's clients follow; the listeners
        #: (``_core.Near``) whose ``master_switch()`` names the sentinel that announced it.
        self.epoch = 0 if sentinel is None else _switches()
        self._sources: list[Any] = []
        if sentinel is None:
            self.client = redis.Redis(connection_pool=pool_class.from_url(location, **opts))
        else:
            # The master, wherever the sentinels say it is: each connection asks when it
            # connects (a failover breaks the old ones), redis-py's SentinelManagedConnection.
            self.client = _master_client(redis.sentinel, sentinel, opts)
        pool = self.client.connection_pool
        # The hot commands (a miss's GET + PTTL, a set's SET) skip redis-py's client and pool
        # layers, which cost more than the round trip itself on loopback, and run on
        # connections of our own made as the pool makes its own (see ``call``). Only for the
        # plain pool without a connection limit, and without what the pool does to its own
        # connections behind their backs: a BlockingConnectionPool's wait, a max_connections
        # bound, redis-py's client-side cache, RESP3 (maintenance push notifications) and a
        # credential_provider (re-authentication) keep the pool path.
        kwargs = pool.connection_kwargs
        self.direct = (
            type(pool) in (redis.ConnectionPool, redis.sentinel.SentinelConnectionPool)
            and "max_connections" not in opts
            and getattr(pool, "cache", None) is None
            and str(kwargs.get("protocol") or 2) == "2"
            and kwargs.get("credential_provider") is None
        )
        self._pool = pool
        self._wires: list[_Wire] = []
        self._response_error = redis.exceptions.ResponseError
        self._pack = _hiredis_packer(pool.connection_kwargs)
        self._async_options = {k: v for k, v in options.items() if k not in _SYNC_ONLY}
        self._async_pool_class = getattr(
            redis.asyncio, getattr(pool_class, "__name__", ""), redis.asyncio.ConnectionPool
        )
        #: Per event loop: its redis.asyncio client and the switch count it was made at.
        self._aclients: weakref.WeakKeyDictionary[Any, tuple[Any, int]] = (
            weakref.WeakKeyDictionary()
        )
        self._closing: set[Any] = set()  # old async pools being disconnected (tasks)
        self._lock = threading.Lock()
        # Held by ``_follow`` across its round trip to the sentinels: never taken by
        # ``aclient`` (an event loop must not wait for another thread's network I/O).
        self._follow_lock = threading.Lock()

    @property
    def sentinel(self) -> SentinelSpec | None:
        """The Sentinel set-up, or None for a single server."""
        return self._sentinel

    def watch(self, near: Any) -> None:
        """Take ``near``'s master switches into account (a listener of this LOCATION)."""
        if self._sentinel is not None and hasattr(near, "master_switch"):
            with self._lock:
                if not any(n is near for n in self._sources):
                    self._sources.append(near)

    def _announcer(self) -> tuple[str, int] | None:
        """The sentinel that announced the newest switch any of ``_sources`` acted on."""
        newest = None
        for near in self._sources:
            switch = near.master_switch()
            if switch is not None and (newest is None or switch[0] > newest[0]):
                newest = switch
        return None if newest is None else newest[2]

    def current(self) -> Any:
        """The sync client, following a master switch first (see ``_follow``)."""
        if self._sentinel is not None and _switches() != self.epoch:
            self._follow()
        return self.client

    def _follow(self) -> None:
        """After a master switch: the sentinel that announced it is asked first, and the pool
        learns the new master (``SentinelConnectionPool.get_master_address``), which drops its
        idle connections to the old one and, through ``owns_connection``, those in use when
        they come back; our own connections (``_Wire``) reconnect at their next use. If no
        sentinel answers, every connection is dropped: each new one asks again."""
        with self._follow_lock:
            epoch = _switches()
            if epoch == self.epoch:
                return
            first = self._announcer()
            pool = self._pool
            if first is not None:
                _ask_first(pool.sentinel_manager.sentinels, first)
            exc = _redis().exceptions
            try:
                pool.get_master_address()
            except (exc.ConnectionError, exc.TimeoutError, exc.ResponseError):
                pool.disconnect()
            self.epoch = epoch  # last: other threads wait on the lock until the pool follows

    def call(self, *commands: tuple[Any, ...]) -> list[Any]:
        """The raw replies of ``commands``, sent in one write on a connection of our own.

        What redis-py's client does around a command, minus its layers: the connection is one
        the pool would make (same class and options: timeouts, health checks, credentials),
        used by one thread at a time; one that the server closed while idle, or that holds
        unread data, is reconnected first (the pool's ``ensure_connection``); errors are
        retried under the connection's own ``retry`` policy, disconnecting after each failure
        (as ``Redis._execute_command``), then raised. A Redis error reply is raised after every
        reply has been read, so the connection stays in step.
        """
        if self._sentinel is not None and _switches() != self.epoch:
            self._follow()
        try:
            wire = self._wires.pop()
        except IndexError:
            wire = _Wire(self._pool.connection_class(**self._pool.connection_kwargs), self.epoch)
        try:
            conn = wire.conn
            return conn.retry.call_with_retry(
                lambda: self._round_trip(wire, commands), lambda e: conn.disconnect()
            )
        finally:
            self._wires.append(wire)

    def _round_trip(self, wire: _Wire, commands: tuple[tuple[Any, ...], ...]) -> list[Any]:
        conn = wire.conn
        if wire.epoch != self.epoch:  # made before a master switch: ask the sentinels again
            wire.epoch = self.epoch
            conn.disconnect()
        elif conn._sock is not None and wire.stale():
            conn.disconnect()  # send_packed_command connects again
        if conn._sock is None and self._sentinel is not None:
            # send_packed_command's own connect would skip SentinelManagedConnection's, which
            # asks the sentinels where the master is now.
            conn.connect()
        pack = self._pack
        if pack is not None:
            if len(commands) == 1:
                conn.send_packed_command([pack(commands[0])])
            else:
                conn.send_packed_command([b"".join(map(pack, commands))])
        elif len(commands) == 1:
            conn.send_packed_command(conn.pack_command(*commands[0]))
        else:
            conn.send_packed_command(conn.pack_commands(commands))
        replies = []
        error = None
        for _ in commands:
            try:
                replies.append(conn.read_response())
            except self._response_error as e:  # the reply was read whole: go on reading
                error = error or e
                replies.append(None)
        if error is not None:
            raise error
        return replies

    def aclient(self) -> Any:
        """The redis.asyncio client bound to the running event loop (one per loop).

        Behind Sentinel, one per loop and master switch: after a switch the loop gets a new
        client, whose connections ask the sentinel that announced it first, and the old
        client's pool is disconnected in a task (its ``disconnect`` is a coroutine; a command
        still running on it fails and is retried by redis-py on a new connection)."""
        loop = asyncio.get_running_loop()
        entry = self._aclients.get(loop)
        epoch = self.epoch if self._sentinel is None else _switches()
        if entry is None or entry[1] != epoch:
            with self._lock:
                entry = self._aclients.get(loop)
                if entry is None or entry[1] != epoch:
                    if self._sentinel is not None:
                        module = _redis().asyncio.sentinel
                        first = self._announcer()
                        client = _master_client(module, self._sentinel, self._async_options, first)
                    else:
                        pool = self._async_pool_class.from_url(self.location, **self._async_options)
                        client = _redis().asyncio.Redis(connection_pool=pool)
                    if entry is not None:
                        task = loop.create_task(entry[0].connection_pool.disconnect())
                        self._closing.add(task)
                        task.add_done_callback(self._closing.discard)
                    entry = self._aclients[loop] = (client, epoch)
        return entry[0]


def _master_client(
    module: Any, spec: SentinelSpec, options: dict[str, Any], first: tuple[str, int] | None = None
) -> Any:
    """A client of the master of ``spec`` (``module``: redis.sentinel or redis.asyncio.sentinel):
    the URL's settings win over the OPTIONS, as in redis-py's ``from_url``. The sentinel
    ``first`` (one of them) is asked first."""
    sentinels = list(spec.sentinels)
    if first is not None:
        _ask_first(sentinels, first)
    manager = module.Sentinel(sentinels, sentinel_kwargs=spec.sentinel_kwargs(options))
    return manager.master_for(spec.service, **{**options, **dict(spec.url)})


def _ask_first(sentinels: list[Any], first: tuple[str, int]) -> None:
    """Swaps the sentinel at ``first`` (host, port) to the head of ``sentinels`` (pairs, or
    redis-py's sentinel clients, whose ``discover_master`` asks them in order and swaps the
    one that answered to the head the same way); nothing if it is not there."""
    for i, s in enumerate(sentinels):
        if isinstance(s, tuple):
            where = s
        else:
            kwargs = s.connection_pool.connection_kwargs
            where = (kwargs.get("host"), kwargs.get("port"))
        if where == first:
            sentinels[0], sentinels[i] = s, sentinels[0]
            return


_NO_POLL = not hasattr(select, "poll")  # Windows


def _hiredis_packer(kwargs: dict[str, Any]) -> Callable[[tuple[Any, ...]], bytes] | None:
    """hiredis's ``pack_command`` (one C call, where redis-py's packer runs Python for every
    argument), if hiredis is there and str arguments are to be UTF-8, as hiredis encodes them.
    ``_Conn.call`` passes only str, bytes and int arguments."""
    try:
        from hiredis import pack_command
    except ImportError:
        return None
    encoding = kwargs.get("encoding", "utf-8")
    try:
        utf8 = codecs.lookup(encoding).name == "utf-8"
    except LookupError:
        utf8 = False
    if not utf8 or kwargs.get("encoding_errors", "strict") != "strict":
        return None
    return pack_command


#: django.conf.settings's own __dict__ (see ``NearCache._signing_keys``).
_SETTINGS_DICT: dict[str, Any] = object.__getattribute__(settings, "__dict__")


class _Wire:
    """A redis-py connection of ``_Conn.call``'s, with a poller on its current socket, and the
    master switch count (``_Conn.epoch``) it was last used at."""

    __slots__ = ("conn", "sock", "poller", "epoch")

    def __init__(self, conn: Any, epoch: int = 0) -> None:
        self.conn = conn
        self.sock: Any = None
        self.poller: Any = None
        self.epoch = epoch

    def stale(self) -> bool:
        """Whether the idle connection's socket is readable: the server closed it, or a reply
        is pending that nobody read. (``can_read()`` without its layers: one ``poll``.)"""
        sock = self.conn._sock
        if _NO_POLL:
            return bool(self.conn.can_read())
        if sock is not self.sock:
            self.poller = select.poll()
            self.poller.register(sock, select.POLLIN)
            self.sock = sock
        return bool(self.poller.poll(0))


class _MacKey:
    """An HMAC-SHA256 key as its two padded SHA-256 states (RFC 2104): a MAC copies and feeds
    them, cheaper than copying an ``hmac.HMAC`` (whose ``copy`` is Python code)."""

    __slots__ = ("inner", "outer")

    def __init__(self, key: bytes) -> None:
        key = key.ljust(64, b"\0")  # 32 bytes (a SHA-256 digest) within the 64-byte block
        self.inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self.outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def mac(self, msg: bytes) -> bytes:
        """``hmac.digest(key, msg, "sha256")``."""
        inner = self.inner.copy()
        inner.update(msg)
        outer = self.outer.copy()
        outer.update(inner.digest())
        return outer.digest()


class _Counters:
    """Process-wide counters of one L1 (L2 hits, misses, errors) and the last fresh lease."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.l2_hits = 0
        self.misses = 0
        self.errors = 0
        self.bad_signatures = 0
        self.bad_frames = 0
        self.last_fresh = float("-inf")

    def add(
        self, l2_hits: int = 0, misses: int = 0, errors: int = 0, bad: int = 0, frames: int = 0
    ) -> None:
        with self.lock:
            self.l2_hits += l2_hits
            self.misses += misses
            self.errors += errors
            self.bad_signatures += bad
            self.bad_frames += frames

    def l2_hit(self) -> None:
        """``add(l2_hits=1)``, for the miss path (no keyword arguments to parse)."""
        with self.lock:
            self.l2_hits += 1


class _State:
    """Module state that a fork() child must not inherit as if alive."""

    def __init__(self) -> None:
        self.generation = 0
        self.lock = threading.Lock()
        self.conns: dict[Any, _Conn] = {}
        self.counters: dict[str, _Counters] = {}


_STATE = _State()


def _after_fork_in_child() -> None:
    # The parent's sockets, pools and counters are not ours: start over (redis-py never shuts a
    # socket down from another pid, so dropping them does not disturb the parent).
    _STATE.lock = threading.Lock()
    _STATE.conns = {}
    _STATE.counters = {}
    _STATE.generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _conn_for(
    location: str, options: dict[str, Any], sentinel: SentinelSpec | None = None
) -> _Conn:
    key = (location, repr(sorted(options.items(), key=lambda kv: kv[0])), repr(sentinel))
    conn = _STATE.conns.get(key)
    if conn is None:
        with _STATE.lock:
            conn = _STATE.conns.get(key)
            if conn is None:
                conn = _STATE.conns[key] = _Conn(location, options, sentinel)
    return conn


def _counters_for(l1_location: str) -> _Counters:
    counters = _STATE.counters.get(l1_location)
    if counters is None:
        with _STATE.lock:
            counters = _STATE.counters.setdefault(l1_location, _Counters())
    return counters


# The listener -----------------------------------------------------------------------------


class _NoListener:
    """Stands in for the Rust listener where there is none: L1 is never fresh, never filled."""

    fills = False

    def ensure_started(self) -> None:
        """Nothing to start."""

    def fresh(self) -> bool:
        """Never: every read goes to Redis."""
        return False

    def wait_fresh(self, timeout: float) -> bool:
        """Never fresh."""
        return False

    def stats(self) -> dict[str, object]:
        """What the Rust listener reports, all idle."""
        return {
            "mode": "none",
            "invalidations": 0,
            "flushes": 0,
            "reconnects": 0,
            "connected": False,
            "lease_ok": False,
            "last_pong_rtt_ms": None,
            "last_error": None,
            "last_invalidation_age_ms": None,
            "last_invalidation_lag_ms": None,
            "invalidation_lags_measured": 0,
            "master_switches": 0,
            "sentinel_watched": None,
            "sentinel_watch_error": None,
        }

    def note_writes(self, keys: Iterable[str]) -> None:
        """Nothing listens, so no lag is measured."""

    def applied_ns(self, key: str) -> int | None:
        """No invalidation is ever applied."""
        return None

    def close(self) -> None:
        """Nothing to close."""


def _start_listener(l1_location: str, **kwargs: Any) -> Any:
    """The process-wide Rust listener of ``l1_location`` (``_NoListener`` if _core has none)."""
    near = getattr(_core, "near", None)
    if near is None:
        return _NoListener()
    return near(l1_location, **kwargs)


#: How NearCache gets its listener; tests replace it (e.g. ``lambda *a, **k: _NoListener()``).
LISTENER_FACTORY: Callable[..., Any] = _start_listener


def _glob_escape(text: str) -> str:
    """Escape Redis glob metacharacters, so a KEY_PREFIX is matched literally by SCAN."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _pipe(client: Any, cmds: list[tuple[str, tuple[Any, ...], dict[str, Any]]], tx: bool) -> Any:
    """Queue ``cmds`` on a (sync or async) pipeline; returns ``execute()``'s result/awaitable."""
    pipe = client.pipeline(transaction=tx)
    for name, args, kwargs in cmds:
        getattr(pipe, name)(*args, **kwargs)
    return pipe.execute()


# One operation is a generator that yields calls `f(client)` and receives their results; the
# same generator runs on the sync client (`_run`) and on the asyncio one (`_arun`).
_Op = Generator[Callable[[Any], Any], Any, Any]


class NearCache(FillMixin, AsyncFillMixin, BaseCache):
    """Django's cache API over Redis/Valkey, with the Rust store as a per-process near cache.

    ``get_or_set`` and its single-flight come from ``FillMixin`` (its ``add`` is Redis's SET NX),
    the follower wait of ``aget_or_set`` from ``AsyncFillMixin``.
    """

    pickle_protocol = pickle.HIGHEST_PROTOCOL

    # Assigning one of these on a live instance re-configures the key-making L1 handle.
    key_func = _Synced()
    key_prefix = _Synced()
    version = _Synced()
    _armed = False  # whether L1 hits are answered in Rust (``_arm``)
    _tracked = False  # whether the listener hears of changes to this instance's keys (``_sync``)

    def __init__(self, server: Any, params: dict[str, Any]) -> None:
        self._options = o = NearOptions.from_params(server, params)
        super().__init__(params)
        prefix_part = f"#{self.key_prefix}" if self.key_prefix else ""
        self._l1_location = f"near:{o.location}{prefix_part}"
        try:
            self._h = Handle(
                self._l1_location,
                DEFAULT_TIMEOUT,
                lambda key: None,  # keys are made and validated here, by Django's code
                policy=o.eviction_policy,
                max_entries=self._max_entries,
            )
        except ValueError as e:
            raise ImproperlyConfigured(
                f"NearCache LOCATION {o.location!r}: OPTIONS['EVICTION_POLICY'] is "
                f"{o.eviction_policy!r}, but {e}."
            ) from None
        self._h.configure(self.key_prefix, self.version, None, True)
        self._h.set_limits(self._max_entries, self._cull_frequency, o.max_bytes)
        # A second view of the same L1 store that makes and validates keys in Rust, as RustCache
        # does: the L1 hit path of get() then runs no Python key code.
        self._fast = Handle(self._l1_location, DEFAULT_TIMEOUT, _warn_key)
        self._sync()
        self._pubsub = o.invalidation == "pubsub"
        # The BCAST prefix is the key namespace: Django's key function puts KEY_PREFIX first.
        default_keys = self.key_func is default_key_func
        self._track_prefix = f"{self.key_prefix}:" if default_keys else ""
        db = o.url.get("db", o.redis_options.get("db", 0))
        self._channel = f"django_rustcache:near:{db}:{self._track_prefix}" if self._pubsub else ""
        try:
            self._near = LISTENER_FACTORY(
                self._l1_location,
                host=o.url.get("host"),
                port=int(o.url.get("port") or 6379),
                unix_path=o.url.get("path"),
                username=o.url.get("username") or o.redis_options.get("username"),
                password=o.url.get("password") or o.redis_options.get("password"),
                prefix=self._track_prefix,
                lease=o.lease,
                mode=INVALIDATION_MODES[o.invalidation],
                channel=self._channel,
                connect_timeout=float(o.redis_options.get("socket_connect_timeout") or 2.0),
                **({} if o.tls is None else {"tls": o.tls}),
                **({} if o.sentinel is None else {"sentinel": o.sentinel.listener()}),
            )
        except ValueError as e:  # the listener's settings: a TLS file it cannot use, ...
            raise ImproperlyConfigured(f"NearCache LOCATION {o.location!r}: {e}") from None
        self._fills = getattr(self._near, "fills", True) and hasattr(self._h, "fill")
        self._generation = -1
        self._bind()
        self._sync()

    def _sync(self) -> None:
        """Decide whether L1 hits may be looked up by Rust-made keys, and configure that view."""
        d = self.__dict__
        if "_fast" not in d or any(
            "_synced_" + n not in d for n in ("key_func", "key_prefix", "version")
        ):
            return  # still inside BaseCache.__init__
        cls = type(self)
        rust_keys = (
            self.key_func is default_key_func
            and cls.validate_key is BaseCache.validate_key
            and cls.make_key is BaseCache.make_key
            and cls.make_and_validate_key is BaseCache.make_and_validate_key
        )
        self._rust_keys = rust_keys  # _fast.make_key is make_and_validate_key
        # L1 may serve only keys the listener hears about: those under the prefix it tracks,
        # fixed when it was set up (KEY_PREFIX or the key function assigned on a live instance
        # may leave it; then every read goes to Redis).
        track = d.get("_track_prefix")
        self._tracked = track == "" or (
            track is not None
            and self.key_func is default_key_func
            and f"{self.key_prefix}:".startswith(track)
        )
        self._hot = rust_keys and self._tracked and not self._options.stale_if_error
        self._fast.configure(self.key_prefix, self.version, None, False)
        self._arm()

    def _arm(self) -> None:
        """Let Rust answer L1 hits when the hot path holds (``_hot``) and the listener is the Rust
        one: ``get`` is then the handle's ``near_get`` (see ``FastMethod``), ``_probe`` its
        ``near_peek``; what L1 cannot answer goes to ``_get_rest``. Otherwise both are the Python
        methods below, which do the same."""
        d = self.__dict__
        near = d.get("_near")
        near_type = getattr(_core, "Near", None)
        if (
            d.get("_hot")
            and near_type is not None
            and isinstance(near, near_type)
            and hasattr(self._fast, "near_get")
        ):
            self._fast.near_attach(near, _Tagged, _MISS, _STALE, self._get_rest)
            d["_fast_get"] = self._fast.near_get
            d["_probe"] = self._fast.near_peek
            self._armed = True
        else:
            d.pop("_fast_get", None)
            d.pop("_probe", None)
            self._armed = False
            if "_fast" in d and hasattr(self._fast, "near_detach"):
                self._fast.near_detach()

    def _bind(self) -> None:
        """(Re)attach to this process's client and counters (again after a fork)."""
        o = self._options
        self._conn = _conn_for(o.location, o.redis_options, o.sentinel)
        self._counters = _counters_for(self._l1_location)
        self._errors = _conn_errors()
        self._generation = _STATE.generation
        if o.sentinel is not None:
            # Its watcher hears of master switches, which the data path follows: on from the
            # start (not only from the first read), also in a process that only writes.
            self._conn.watch(self._near)
            self._near.ensure_started()

    def _k(self, key: Any, version: Any) -> str:
        """The key as the L1 handle ``_h`` wants it: the made key (FillMixin's hook)."""
        return self.make_and_validate_key(key, version=version)

    def _client(self) -> Any:
        if self._generation != _STATE.generation:
            self._bind()
        return self._conn.current()

    def _aclient(self) -> Any:
        if self._generation != _STATE.generation:
            self._bind()
        return self._conn.aclient()

    # The Rust side: the only places that touch the listener and the placeholder fill. ---------

    def _fresh(self) -> bool:
        """Whether L1 may serve a hit now (starting the listener if it is not running)."""
        if self._tracked and self._near.fresh():
            if self._options.stale_if_error:
                self._counters.last_fresh = time.monotonic()
            return True
        self._near.ensure_started()
        return False

    def _l1_begin(self, made: str) -> Any:
        """Begin a fill of ``made``'s L1 slot: a ``_core.Fill`` (its placeholder cancels older
        fills of the key; any invalidation, write or flush of the key cancels it), or None. It
        ends when put (``_l1_put``) or dropped."""
        if not self._fills:
            return None
        return self._h.fill(made)

    def _l1_put(
        self, made: str, token: Any, value: Any, ttl: float | None, pickled: bytes | None = None
    ) -> None:
        """Store ``value`` in L1 for ``ttl`` s (at most L1_MAX_TTL) if the fill ``token`` from
        ``_l1_begin`` was not cancelled; ``pickled``, a pickle of ``value`` at hand, is kept
        rather than pickling it again."""
        if token is None or (ttl is not None and ttl <= 0):
            return
        ttl = self._options.l1_max_ttl if ttl is None else min(ttl, self._options.l1_max_ttl)
        if pickled is None:
            token.put(made, value, ttl)
        else:
            token.put(made, value, ttl, pickled=pickled)

    def _l1_drop(self, made_keys: list[str]) -> None:
        """Remove ``made_keys`` (entries or placeholders) from this process's L1."""
        if self._fills and made_keys:
            self._h.invalidate_made(made_keys)

    # Storage format -------------------------------------------------------------------------

    def _signing_keys(self) -> list[_MacKey]:
        """HMAC-SHA256 keys derived from SECRET_KEY, then from each of SECRET_KEY_FALLBACKS."""
        # LazySettings caches a setting it has read in its __dict__ and drops it when the
        # setting (or the whole settings object, as override_settings does) changes: reading
        # it there skips its Python attribute hooks. Not cached yet: read it the usual way.
        cached = _SETTINGS_DICT
        secret = cached.get("SECRET_KEY", _MISS)
        fallbacks = cached.get("SECRET_KEY_FALLBACKS", _MISS)
        if secret is _MISS or fallbacks is _MISS:
            secret = settings.SECRET_KEY
            fallbacks = getattr(settings, "SECRET_KEY_FALLBACKS", ())
        secrets = (secret, *fallbacks)
        if getattr(self, "_keys_for", None) != secrets:
            self._keys = [
                _MacKey(
                    hashlib.sha256(
                        _SIGNING_SALT + (s.encode() if isinstance(s, str) else s)
                    ).digest()
                )
                for s in secrets
            ]
            self._keys_for = secrets
        return self._keys

    def _encode(self, made: str, value: Any) -> int | bytes:
        """Django RedisSerializer's format (ints raw), the pickle compressed if COMPRESS and
        large enough, then signed if SIGNED."""
        return self._encode_pickled(made, value)[0]

    def _encode_pickled(self, made: str, value: Any) -> tuple[int | bytes, bytes | None]:
        """``_encode``'s result and the pickle inside it (None for an int), which L1 can keep
        instead of pickling the value again."""
        if type(value) is int:
            return value, None
        data = pickle.dumps(value, self.pickle_protocol)
        o = self._options
        body = data
        if o.compress is not None and o.compress_min_size <= len(data) <= o.compress_max_size:
            try:
                frame = _core.compress(data, o.compress)
            except ValueError:  # past what one frame holds (LZ4: 4 GiB): stored as it is
                frame = data
            if len(frame) < len(data):  # incompressible data (a JPEG, random bytes) stays as is
                body = frame
        if not o.signed:
            return body, data
        # The MAC covers what is stored: a reader verifies it before decompressing anything.
        mac = self._signing_keys()[0].mac(made.encode() + b"\0" + body)
        return SIGNED_MAGIC + mac + body, data

    def _encode_tagged(self, inner: int | bytes, versions: tuple[tuple[str, str], ...]) -> bytes:
        """A tagged entry: the versions it was built against in front of the untagged format."""
        header = json.dumps([x for pair in versions for x in pair]).encode()
        body = str(inner).encode() if isinstance(inner, int) else inner
        return TAGGED_MAGIC + b"%08x" % len(header) + header + body

    def _decode(self, made: str, raw: bytes) -> Any:
        """The value (a ``_Tagged`` for a tagged entry), or ``_MISS`` for one that must not be
        unpickled (logged)."""
        return self._unpack(made, raw)[0]

    def _unpack(self, made: str, raw: bytes) -> tuple[Any, bytes | None]:
        """``_decode``'s result and the pickle it was loaded from (None for an int or a tagged
        entry), which L1 can keep instead of pickling the value again."""
        first = raw[0] if raw else -1
        if first == 0x80:  # a pickle (protocol 2 or later): never an int's digits
            if self._options.signed:
                return self._unsigned(made, "it is not signed (SIGNED=True)")
            return pickle.loads(raw), raw
        if first != 0:  # 0 starts SIGNED_MAGIC and TAGGED_MAGIC, never an int
            try:
                return int(raw), None
            except ValueError:
                pass
        if raw.startswith(SIGNED_MAGIC):
            start = len(SIGNED_MAGIC)
            mac, data = raw[start : start + _MAC_LEN], raw[start + _MAC_LEN :]
            msg = made.encode() + b"\0" + data
            for key in self._signing_keys():
                if hmac.compare_digest(key.mac(msg), mac):
                    if data.startswith(_COMPRESSED):  # now verified: safe to decompress
                        data = self._inflate(made, data)
                        if data is None:
                            return _MISS, None
                    return pickle.loads(data), data
            return self._unsigned(
                made, "its signature does not verify with SECRET_KEY or SECRET_KEY_FALLBACKS"
            )
        if raw.startswith(_COMPRESSED):
            if self._options.signed:  # never decompressed: nothing vouches for it
                return self._unsigned(made, "it is not signed (SIGNED=True)")
            data = self._inflate(made, raw)
            return (_MISS, None) if data is None else (pickle.loads(data), data)
        if raw.startswith(TAGGED_MAGIC):
            start = len(TAGGED_MAGIC) + 8
            try:
                end = start + int(raw[len(TAGGED_MAGIC) : start], 16)
                flat = json.loads(raw[start:end])
                versions = tuple(zip(flat[::2], flat[1::2], strict=True))
            except (ValueError, TypeError):
                logger.warning(
                    "NearCache %r: key %r has a bad tag header", self._options.location, made
                )
                return _MISS, None
            value = self._decode(made, raw[end:])
            return (value if value is _MISS else _Tagged(value, versions)), None
        if self._options.signed:
            return self._unsigned(made, "it is not signed (SIGNED=True)")
        return pickle.loads(raw), raw

    def _inflate(self, made: str, frame: bytes) -> bytes | None:
        """The pickle inside a compressed frame; None (counted, logged: a miss) for a malformed
        frame or one that declares or inflates to more than COMPRESS_MAX_SIZE bytes."""
        try:
            return _core.decompress(frame, self._options.compress_max_size)
        except ValueError as e:
            self._counters.add(frames=1)
            logger.warning(
                "NearCache %r: treating key %r as a miss: %s", self._options.location, made, e
            )
            return None

    def _unsigned(self, made: str, reason: str) -> tuple[Any, None]:
        """A value that must not be unpickled: counted, logged, a miss."""
        self._counters.add(bad=1)
        logger.warning(
            "NearCache %r: treating key %r as a miss: %s", self._options.location, made, reason
        )
        return _MISS, None

    # Helpers --------------------------------------------------------------------------------

    def _ms(self, timeout: Any) -> int | None:
        """A Django timeout in milliseconds for PX (None: no expiry; <= 0: delete)."""
        if timeout is DEFAULT_TIMEOUT:
            timeout = self.default_timeout
        if timeout is None:
            return None
        if type(timeout) is int and 0 <= timeout < 1 << 40:
            return timeout * 1000  # what the float arithmetic below gives, exactly
        if isinstance(timeout, (str, bytes)) or not hasattr(timeout, "__float__"):
            raise TypeError(f"timeout must be a number or None, not {type(timeout).__name__}")
        seconds = float(timeout)
        if seconds != seconds:
            raise ValueError("timeout must be a number or None, not NaN")
        if seconds == float("inf"):
            return None
        return max(0, int(seconds * 1000))

    def _failed(self, what: str, exc: BaseException, result: Any) -> Any:
        """With IGNORE_EXCEPTIONS, log and return ``result``; else re-raise ``exc``."""
        if not self._options.ignore_exceptions:
            raise exc
        self._counters.add(errors=1)
        logger.warning("NearCache %r: %s failed, ignored: %r", self._options.location, what, exc)
        return result

    def _run(self, op: _Op) -> Any:
        """Drive ``op`` on the sync client (behind Sentinel, each call follows a master switch
        first: after any fill ``op`` began, so a fill begun after the listener flushed L1 on
        the new master never reads the old one)."""
        client = self._client()
        follow = self._conn.sentinel is not None
        try:
            call = next(op)
            while True:
                try:
                    res = call(self._conn.current() if follow else client)
                except BaseException as e:  # handed to the op, which decides
                    call = op.throw(e)
                else:
                    call = op.send(res)
        except StopIteration as stop:
            return stop.value

    async def _arun(self, op: _Op) -> Any:
        """Drive ``op`` on this event loop's redis.asyncio client (behind Sentinel, the one
        for the current master switch at each call, as ``_run``)."""
        client = self._aclient()
        follow = self._conn.sentinel is not None
        try:
            call = next(op)
            while True:
                try:
                    res = await call(self._conn.aclient() if follow else client)
                except BaseException as e:
                    call = op.throw(e)
                else:
                    call = op.send(res)
        except StopIteration as stop:
            return stop.value

    @staticmethod
    def _script(script: _Script, keys: list[str], *args: Any) -> _Op:
        """EVALSHA, loading the script with EVAL if the server does not know it (yet)."""
        try:
            return (yield lambda c: c.evalsha(script.sha, len(keys), *keys, *args))
        except _redis().exceptions.NoScriptError:
            return (yield lambda c: c.eval(script.src, len(keys), *keys, *args))

    def _exec(
        self, cmds: list[tuple[str, tuple[Any, ...], dict[str, Any]]], publish: Iterable[str] = ()
    ) -> _Op:
        """Run write commands: one as is, several pipelined; in pubsub mode MULTI + PUBLISH."""
        publish = list(publish)
        # The write starts now: its invalidation, back at this process's listener, gives
        # stats()["listener"]["last_invalidation_lag_ms"].
        self._near.note_writes(publish)
        publish = publish if self._pubsub else []
        if publish:
            calls = cmds + [("publish", (self._channel, m), {}) for m in publish]
            res = yield lambda c: _pipe(c, calls, True)
            return res[: len(cmds)]
        if len(cmds) == 1:
            name, args, kwargs = cmds[0]
            return [(yield lambda c: getattr(c, name)(*args, **kwargs))]
        return (yield lambda c: _pipe(c, cmds, False))

    def _set_cmd(self, made: str, data: Any, ms: int | None, nx: bool = False) -> tuple:
        kwargs: dict[str, Any] = {"nx": True} if nx else {}
        if ms is not None:
            kwargs["px"] = ms
        return ("set", (made, data), kwargs)

    # Tags: versions in Redis under the tracked prefix, cached in L1, moved by invalidate_tags ---

    def _tag_key(self, tag: str) -> str:
        """Where ``tag``'s version lives: ``<KEY_PREFIX>:#t:<tag>``, inside the BCAST prefix (so
        every L1 hears of a bump) and never a made key unless a caller uses the version ``"#t"``."""
        return f"{self.key_prefix}:#t:{tag}"

    def _op_versions(self, tag_keys: list[str], fresh: bool) -> _Op:
        """``{tag key: version}``: from L1 while the lease is fresh, the rest in one script that
        also seeds missing versions; what Redis returned fills L1 behind placeholders."""
        found: dict[str, str] = {}
        lacking = []
        for tk in dict.fromkeys(tag_keys):
            v = self._h.get(tk, _MISS) if fresh else _MISS
            if v is _MISS:
                lacking.append(tk)
            else:
                found[tk] = v
        if lacking:
            tokens = [self._l1_begin(tk) for tk in lacking]
            seeds = [_seed() for _ in lacking]
            values = yield from self._script(_TAG_VERSIONS, lacking, *seeds, self._channel)
            for tk, token, v in zip(lacking, tokens, values, strict=True):
                found[tk] = v = v.decode() if isinstance(v, bytes) else str(v)
                self._l1_put(tk, token, v, None)
        return found

    def _op_valid(self, entries: list[_Tagged], fresh: bool) -> _Op:
        """For each tagged entry, whether every version it carries is still the current one."""
        if not entries:
            return []
        keys = [tk for e in entries for tk, _ in e.versions]
        current = yield from self._op_versions(keys, fresh)
        return [all(current[tk] == v for tk, v in e.versions) for e in entries]

    def _op_snapshot(self, tags: Any) -> _Op:
        """A ``NearTagSnapshot`` of ``tags``; on an error ignored by IGNORE_EXCEPTIONS, one that
        no version matches (so nothing is stored with it)."""
        keys = list(dict.fromkeys(self._tag_key(t) for t in _tag_names(tags)))
        try:
            current = yield from self._op_versions(keys, self._fresh())
        except self._errors as e:
            current = self._failed("snapshot_tags", e, dict.fromkeys(keys, ""))
        return NearTagSnapshot(tuple((tk, current[tk]) for tk in keys))

    def _op_l1_tagged(self, made: str, entry: _Tagged, default: Any) -> _Op:
        """An L1 hit on a tagged entry: its value if its versions hold, else a read from Redis."""
        (ok,) = yield from self._op_valid([entry], True)
        if ok:
            return entry.value
        self._l1_drop([made])
        return (yield from self._op_get(made, default, True))

    def _op_set_tagged(self, made: str, value: Any, timeout: Any, nx: bool, tags: Any) -> _Op:
        """``set``/``add`` with tags (names, or a snapshot that must still hold), and every
        ``add``: one script, in which an entry whose tags moved does not block NX."""
        # A pickling error is raised before anything changes.
        inner, pickled = self._encode_pickled(made, value)
        ms = self._ms(timeout)
        check: tuple[tuple[str, str], ...] = ()
        try:
            if isinstance(tags, NearTagSnapshot):
                versions = check = tags.versions
            elif tags is not None:
                keys = [self._tag_key(t) for t in _tag_names(tags)]
                current = yield from self._op_versions(keys, self._fresh())
                versions = tuple((tk, current[tk]) for tk in dict.fromkeys(keys))
            else:
                versions = ()
        except self._errors as e:
            return self._failed("add" if nx else "set", e, False)
        if ms == 0 and not nx:
            return (yield from self._op_set(made, value, timeout, False))
        data = self._encode_tagged(inner, versions) if versions else inner
        token = self._l1_begin(made)  # before the write: kills in-flight fills of older values
        px = "" if ms is None else max(ms, 1)
        keys = [made, *(tk for tk, _ in check)]
        try:
            stored = yield from self._script(
                _SET, keys, data, px, "1" if nx else "", self._channel, *(v for _, v in check)
            )
            if stored == 1 and ms == 0:
                # Django: add() with timeout 0 reports success and stores nothing.
                yield from self._exec([("delete", (made,), {})], [made])
                self._l1_drop([made])
                return True
        except self._errors as e:
            self._l1_drop([made])
            return self._failed("add" if nx else "set", e, False)
        if stored == 1:
            ttl = None if ms is None else ms / 1000
            if versions:
                self._l1_put(made, token, _Tagged(value, versions), ttl)
            else:
                self._l1_put(made, token, value, ttl, pickled)
        else:
            self._l1_drop([made])
        return stored == 1

    def _op_invalidate_tags(self, tags: tuple[str, ...]) -> _Op:
        keys = list(dict.fromkeys(self._tag_key(t) for t in tags))
        if not keys:
            return 0
        for tk in keys:
            self._l1_begin(tk)  # kills in-flight fills of the old versions in this process
        try:
            yield from self._script(_BUMP, keys, *(_seed() for _ in keys), self._channel)
        except self._errors as e:
            return self._failed("invalidate_tags", e, 0)
        finally:
            self._l1_drop(keys)
        return len(keys)

    # Operations (generators shared by the sync and async methods) -----------------------------

    def _op_get(self, made: str, default: Any, fresh: bool) -> _Op:
        stale = _MISS
        token = None
        if not fresh and self._options.stale_if_error:
            # Keep L1 untouched while the lease is out, so it can serve if Redis fails.
            stale = self._h.get(made, _MISS)
        else:
            token = self._l1_begin(made)
        try:
            raw, pttl = yield from self._script(_GET, [made])
        except self._errors as e:
            if stale is not _MISS and self._stale_ok():
                return stale.value if type(stale) is _Tagged else stale
            return self._failed("get", e, default)
        if raw is None:
            self._counters.add(misses=1)
            return default
        entry, pickled = self._unpack(made, raw)
        if type(entry) is _Tagged:
            return (yield from self._op_got_tagged(made, default, fresh, token, entry, pttl))
        if entry is _MISS:
            self._counters.add(misses=1)
            return default
        self._counters.add(l2_hits=1)
        self._l1_put(made, token, entry, None if pttl == -1 else pttl / 1000, pickled)
        return entry

    def _op_got_tagged(
        self, made: str, default: Any, fresh: bool, token: Any, entry: _Tagged, pttl: int
    ) -> _Op:
        """The rest of a read from Redis that found a tagged entry: its value if its versions
        still hold (then into L1), else ``default``."""
        try:
            (ok,) = yield from self._op_valid([entry], fresh)
        except self._errors as e:
            return self._failed("get", e, default)
        if not ok:
            self._counters.add(misses=1)
            return default
        self._counters.add(l2_hits=1)
        self._l1_put(made, token, entry, None if pttl == -1 else pttl / 1000)
        return entry.value

    def _get_remote(self, made: str, default: Any, fresh: bool) -> Any:
        """``get``'s read from Redis: ``_op_get`` on ``_Conn.call`` when it can (the same steps,
        with GET and PTTL pipelined rather than in a script)."""
        if self._generation != _STATE.generation:
            self._bind()
        conn = self._conn
        if not conn.direct or (not fresh and self._options.stale_if_error):
            return self._run(self._op_get(made, default, fresh))
        token = self._l1_begin(made)
        try:
            # Not atomic, unlike _GET: a change between the two (new value or TTL, expiry,
            # delete) invalidates the key, which kills the placeholder or drops what it stored
            # (the fill race of any read); a key gone by PTTL (-2) is not stored.
            raw, pttl = conn.call(("GET", made), ("PTTL", made))
        except self._errors as e:
            return self._failed("get", e, default)
        if raw is None:
            self._counters.add(misses=1)
            return default
        entry, pickled = self._unpack(made, raw)
        if type(entry) is _Tagged:
            return self._run(self._op_got_tagged(made, default, fresh, token, entry, pttl))
        if entry is _MISS:
            self._counters.add(misses=1)
            return default
        self._counters.l2_hit()
        self._l1_put(made, token, entry, None if pttl == -1 else pttl / 1000, pickled)
        return entry

    def _stale_ok(self) -> bool:
        window = self._options.stale_if_error
        ok = bool(window) and time.monotonic() - self._counters.last_fresh <= window
        if ok:
            logger.warning(
                "NearCache %r: Redis failed; serving L1 (STALE_IF_ERROR)", self._options.location
            )
        return ok

    def _op_get_many(self, made_keys: list[str], fresh: bool) -> _Op:
        """``{made: value}`` for the keys Redis has (L1 already consulted by the caller)."""
        found: dict[str, Any] = {}
        stale = self._options.stale_if_error and not fresh
        for start in range(0, len(made_keys), _MGET_CHUNK):
            chunk = made_keys[start : start + _MGET_CHUNK]
            tokens = [None] * len(chunk) if stale else [self._l1_begin(m) for m in chunk]
            try:
                values, ttls = yield from self._script(_MGET, chunk)
            except self._errors as e:
                if stale and self._stale_ok():
                    for made in made_keys[start:]:
                        value = self._h.get(made, _MISS)
                        if value is not _MISS:
                            found[made] = value.value if type(value) is _Tagged else value
                    return found
                return self._failed("get_many", e, found)
            decoded = [
                _MISS if raw is None else self._decode(made, raw)
                for made, raw in zip(chunk, values, strict=True)
            ]
            tagged = [e for e in decoded if type(e) is _Tagged]
            try:
                valid = iter((yield from self._op_valid(tagged, fresh)))
            except self._errors as e:
                return self._failed("get_many", e, found)
            hits = misses = 0
            for made, token, entry, pttl in zip(chunk, tokens, decoded, ttls, strict=True):
                value = entry
                if type(entry) is _Tagged:
                    value = entry.value if next(valid) else _MISS
                if value is _MISS:
                    misses += 1
                    continue
                hits += 1
                found[made] = value
                self._l1_put(made, token, entry, None if pttl < 0 else pttl / 1000)
            self._counters.add(l2_hits=hits, misses=misses)
        return found

    def _set(self, made: str, value: Any, timeout: Any) -> bool:
        """``set``: ``_op_set`` on ``_Conn.call`` when it can (one SET, no MULTI)."""
        if self._generation != _STATE.generation:
            self._bind()
        conn = self._conn
        if not conn.direct or self._pubsub:
            return self._run(self._op_set(made, value, timeout, False))
        data, pickled = self._encode_pickled(made, value)  # a pickling error comes first
        ms = self._ms(timeout)
        if ms == 0:
            return self._run(self._op_set(made, value, timeout, False))
        token = self._l1_begin(made)  # kills older fills
        self._near.note_writes((made,))  # as _exec does: the write starts now
        try:
            conn.call(("SET", made, data) if ms is None else ("SET", made, data, "PX", ms))
        except self._errors as e:
            self._l1_drop([made])
            return self._failed("set", e, False)
        self._l1_put(made, token, value, None if ms is None else ms / 1000, pickled)
        return True

    def _op_set(self, made: str, value: Any, timeout: Any, nx: bool) -> _Op:
        data, pickled = self._encode_pickled(made, value)  # a pickling error comes first
        ms = self._ms(timeout)
        token = self._l1_begin(made)  # before the write: kills in-flight fills of older values
        try:
            if ms == 0 and not nx:
                yield from self._exec([("delete", (made,), {})], [made])
                self._l1_drop([made])
                return True
            (stored,) = yield from self._exec([self._set_cmd(made, data, ms or None, nx)], [made])
            if nx and stored and ms == 0:
                # Django: add() with timeout 0 reports success and stores nothing.
                yield from self._exec([("delete", (made,), {})], [made])
                return True
        except self._errors as e:
            self._l1_drop([made])
            return self._failed("add" if nx else "set", e, False)
        if stored:
            self._l1_put(made, token, value, None if ms is None else ms / 1000, pickled)
        else:
            self._l1_drop([made])
        return bool(stored)

    def _op_set_many(self, items: list[tuple[str, Any]], timeout: Any) -> _Op:
        ms = self._ms(timeout)
        encoded = [self._encode_pickled(made, value) for made, value in items]
        tokens = [self._l1_begin(made) for made, _ in items]
        if ms == 0:
            cmds = [("delete", tuple(made for made, _ in items), {})]
        else:
            cmds = [
                self._set_cmd(made, data, ms)
                for (made, _), (data, _) in zip(items, encoded, strict=True)
            ]
        try:
            yield from self._exec(cmds, [made for made, _ in items])
        except self._errors as e:
            self._l1_drop([made for made, _ in items])
            return self._failed("set_many", e, False)
        if ms != 0:
            ttl = None if ms is None else ms / 1000
            for (made, value), token, (_, pickled) in zip(items, tokens, encoded, strict=True):
                self._l1_put(made, token, value, ttl, pickled)
        return True

    def _op_delete(self, made_keys: list[str], what: str) -> _Op:
        try:
            (count,) = yield from self._exec([("delete", tuple(made_keys), {})], made_keys)
        except self._errors as e:
            return self._failed(what, e, 0)
        finally:
            self._l1_drop(made_keys)
        return count

    def _op_script(self, what: str, script: _Script, made: str, failed: Any) -> _Op:
        """A read-only script on ``made`` (has_key, ttl); ``failed`` under IGNORE_EXCEPTIONS."""
        try:
            return (yield from self._script(script, [made]))
        except self._errors as e:
            return self._failed(what, e, failed)

    def _op_touch(self, made: str, timeout: Any) -> _Op:
        ms = self._ms(timeout)
        try:
            touched = yield from self._script(
                _TOUCH, [made], "" if ms is None else ms, self._channel
            )
        except self._errors as e:
            return self._failed("touch", e, False)
        finally:
            self._l1_drop([made])  # its L1 expiry may now be too long
        return bool(touched)

    def _op_incr(self, made: str, delta: Any) -> _Op:
        try:
            value = yield from self._script(_INCR, [made], delta, self._channel)
        finally:
            self._l1_drop([made])
        if value is None:
            raise ValueError(f"Key '{made}' not found.")
        return value

    def _op_clear(self) -> _Op:
        cmds: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [("flushdb", (), {})]
        if self._pubsub:
            cmds.append(("publish", (self._channel, "*"), {}))
        try:
            yield lambda c: _pipe(c, cmds, True) if self._pubsub else c.flushdb()
        except self._errors as e:
            return self._failed("clear", e, None)
        finally:
            self._h.clear()

    def _scan_match(self, pattern: str, version: Any) -> tuple[str, str]:
        if self.key_func is not default_key_func:
            raise NotImplementedError(
                "NearCache keys()/iter_keys()/delete_pattern() need Django's default KEY_FUNCTION"
            )
        base = self.make_key("", version=version)
        return base, _glob_escape(base) + pattern

    def _op_delete_pattern(self, pattern: str, version: Any) -> _Op:
        base, match = self._scan_match(pattern, version)
        deleted = 0
        cursor: Any = 0
        while True:
            cursor, batch = yield lambda c, cur=cursor: c.scan(cur, match=match, count=1000)
            made = [k.decode() if isinstance(k, bytes) else k for k in batch]
            if made:
                (count,) = yield from self._exec([("delete", tuple(made), {})], made)
                deleted += count
                self._l1_drop(made)
            if int(cursor) == 0:
                return deleted

    # Django's cache API -------------------------------------------------------------------

    def _probe(self, key: Any, version: Any) -> Any:
        """L1's answer on the hot path: the value of a plain hit, else ``_get_rest``'s ``found``
        (``_STALE`` when not on the hot path or the lease is not fresh, ``_MISS``, or the
        ``_Tagged`` entry). When armed (``_arm``), the handle's ``near_peek`` instead."""
        if self._hot and self._near.fresh():
            return self._fast.get(key, _MISS, version)  # Rust makes and validates the key
        return _STALE

    def get(self, key: Any, default: Any = None, version: Any = None) -> Any:
        """The value (from L1 while the lease is fresh, else from Redis), or ``default``.

        When armed (``_arm``), the handle's ``near_get``: the same, with an L1 hit answered in
        Rust and the rest by ``_get_rest``."""
        found = self._probe(key, version)
        if found is _STALE or found is _MISS or type(found) is _Tagged:
            return self._get_rest(key, default, version, found)
        return found

    get = FastMethod(get, "_fast_get")  # type: ignore[assignment]

    def _get_rest(self, key: Any, default: Any, version: Any, found: Any) -> Any:
        """``get`` when L1 gave no plain hit; ``found`` as ``_probe`` returns it."""
        if found is not _STALE:  # the key was made and validated in Rust, the lease was fresh
            made = self.make_key(key, version=version)
            if found is not _MISS:
                return self._run(self._op_l1_tagged(made, found, default))
            return self._get_remote(made, default, True)
        made = self.make_and_validate_key(key, version=version)
        fresh = self._fresh()
        if fresh:
            value = self._h.get(made, _MISS)
            if type(value) is _Tagged:
                return self._run(self._op_l1_tagged(made, value, default))
            if value is not _MISS:
                return value
        return self._get_remote(made, default, fresh)

    def set(
        self,
        key: Any,
        value: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: Any = None,
        tags: Any = None,
    ) -> None:
        """Store in Redis, then in this process's L1. With ``tags``, the entry carries their
        versions (with a snapshot: stored only if none of its tags moved since)."""
        if self._rust_keys:
            made = self._fast.make_key(key, version)  # Rust makes and validates the key
        else:
            made = self.make_and_validate_key(key, version=version)
        if tags is None:
            self._set(made, value, timeout)
        else:
            self._run(self._op_set_tagged(made, value, timeout, False, tags))

    def add(
        self,
        key: Any,
        value: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: Any = None,
        tags: Any = None,
    ) -> bool:
        """SET NX in Redis (an entry whose tags moved counts as absent): True if this call stored
        the value."""
        made = self.make_and_validate_key(key, version=version)
        return self._run(self._op_set_tagged(made, value, timeout, True, tags))

    def touch(self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: Any = None) -> bool:
        """Give the key a new timeout in Redis; False if it is missing."""
        made = self.make_and_validate_key(key, version=version)
        return self._run(self._op_touch(made, timeout))

    def delete(self, key: Any, version: Any = None) -> bool:
        """Delete in Redis (and L1); True if Redis had the key."""
        made = self.make_and_validate_key(key, version=version)
        return bool(self._run(self._op_delete([made], "delete")))

    def has_key(self, key: Any, version: Any = None) -> bool:
        """Whether Redis has the key (never answered by L1)."""
        made = self.make_and_validate_key(key, version=version)
        return bool(self._run(self._op_script("has_key", _HAS, made, 0)))

    def incr(self, key: Any, delta: int = 1, version: Any = None) -> Any:
        """INCRBY in Redis, only if the key exists (ValueError if not)."""
        made = self.make_and_validate_key(key, version=version)
        return self._run(self._op_incr(made, delta))

    def _l1_many(
        self, keys: Iterable[Any], version: Any
    ) -> tuple[dict[str, Any], dict[Any, Any], list[str], bool]:
        """``(key_map, found, lacking, fresh)``: ``found`` L1's hits (tagged ones unchecked),
        ``lacking`` the made keys L1 does not hold, ``key_map`` ``{made: key}`` for at least
        those and the tagged hits. Armed (``_arm``), one call into Rust while the lease is fresh."""
        if self._armed:
            l1 = self._fast.near_many(keys, version)
            if l1 is not None:
                found, rest, lacking = l1
                return rest, found, lacking, True
        key_map = {self.make_and_validate_key(k, version=version): k for k in keys}
        found: dict[Any, Any] = {}
        fresh = self._fresh()
        if not fresh:
            return key_map, found, list(key_map), fresh
        lacking = []
        for made, key in key_map.items():
            value = self._h.get(made, _MISS)
            if value is _MISS:
                lacking.append(made)
            else:
                found[key] = value  # a tagged hit (_Tagged) is checked by _op_many_rest
        return key_map, found, lacking, fresh

    def _op_many_rest(
        self, key_map: dict[str, Any], found: dict[Any, Any], lacking: list[str], fresh: bool
    ) -> _Op:
        """Check L1's tagged hits (their versions from L1, or in one round trip), then read what
        L1 lacked, or held with a moved tag, from Redis."""
        tagged = [(made, key) for made, key in key_map.items() if type(found.get(key)) is _Tagged]
        if tagged:
            try:
                valid = yield from self._op_valid([found[key] for _, key in tagged], True)
            except self._errors as e:
                valid = self._failed("get_many", e, [False] * len(tagged))
            for (made, key), ok in zip(tagged, valid, strict=True):
                if ok:
                    found[key] = found[key].value
                else:
                    del found[key]
                    lacking.append(made)
        if lacking:
            for made, value in (yield from self._op_get_many(lacking, fresh)).items():
                found[key_map[made]] = value
        return found

    def get_many(self, keys: Iterable[Any], version: Any = None) -> dict[Any, Any]:
        """L1's hits, plus one MGET (per 1000 keys) for the keys L1 lacks."""
        key_map, found, lacking, fresh = self._l1_many(keys, version)
        if lacking or (key_map and any(type(v) is _Tagged for v in found.values())):
            return self._run(self._op_many_rest(key_map, found, lacking, fresh))
        return found

    def set_many(
        self,
        data: Mapping[Any, Any],
        timeout: Any = DEFAULT_TIMEOUT,
        version: Any = None,
        tags: Any = None,
    ) -> list[Any]:
        """One pipeline of SETs; returns the keys not stored (all of them on an ignored error).
        With ``tags``, one tagged ``set`` per key (the versions read once)."""
        if not data:
            return []
        items = [(self.make_and_validate_key(k, version=version), v) for k, v in data.items()]
        if tags is None:
            return [] if self._run(self._op_set_many(items, timeout)) else list(data)
        if not isinstance(tags, NearTagSnapshot):
            tags = self._run(self._op_snapshot(tags))
        return [
            key
            for key, (made, value) in zip(data, items, strict=True)
            if not self._run(self._op_set_tagged(made, value, timeout, False, tags))
        ]

    def get_or_set(
        self,
        key: Any,
        default: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: Any = None,
        tags: Any = None,
    ) -> Any:
        """``FillMixin.get_or_set``: a miss is filled with ``add`` (Redis decides who stores),
        one thread of this process computing it while the others wait (``STAMPEDE_WAIT``). With
        ``tags``, they are snapshotted before ``default`` is computed and the result is stored
        only if none of them was invalidated meanwhile (it is returned either way).

        With ``STAMPEDE_LOCK``, the thread that computes first takes a lock in Redis, so that
        across processes too one computes and the others wait for its value (``_fill``)."""
        # No early refresh: L1's expiry is not Redis's, so XFetch would judge the wrong TTL.
        return super().get_or_set(key, default, timeout, version, tags, early_refresh=0.0)

    # STAMPEDE_LOCK: get_or_set's single-flight across processes -------------------------------

    def _fill(
        self,
        key: Any,
        default: Any,
        timeout: Any,
        version: Any,
        tags: Any,
        replace: bool,
        fill: Any = None,
    ) -> Any:
        """``FillMixin._fill`` (compute, ``add``, read back) behind the cross-process lock when
        ``STAMPEDE_LOCK`` is on: this thread computes only once it holds the lock, or when
        another process's value did not come in time (``_op_stampede``). Called by the one
        thread of this process that leads the key's in-process flight (or that gave up waiting
        for it), so the others never talk to Redis about the lock."""
        lock = None if replace else self._lock_for(key, default, timeout, version)
        held = None
        if lock is not None:
            got = self._run(self._op_stampede(*lock, secrets.token_hex(16), self._pause))
            if type(got) is _Held:
                held = got
            elif got is not _UNLOCKED:
                return got  # the holder's value
        try:
            with self._holding(held):
                return super()._fill(key, default, timeout, version, tags, replace, fill)
        finally:
            if held is not None:
                self._run(self._op_unlock(held))

    @contextlib.contextmanager
    def _holding(self, held: _Held | None) -> Iterator[None]:
        """While this call computes under ``held`` (if any): a ``default()`` asking for its own
        key does not wait for the lock (``_HELD_LOCKS``), and ``_RENEWER`` extends it."""
        if held is None:
            yield
            return
        renewal = _RENEWER.hold(self, held)
        mark = _HELD_LOCKS.set(_HELD_LOCKS.get() | {held.lock})
        try:
            yield
        finally:
            renewal.cancel()
            _HELD_LOCKS.reset(mark)

    def _lock_for(
        self, key: Any, default: Any, timeout: Any, version: Any
    ) -> tuple[str, str] | None:
        """The made key and lock key a fill takes the lock on, or None (no lock): it is on, the
        ``default`` is callable, the timeout stores something (with 0 there is no value to wait
        for), and this thread or task does not already hold it (a ``default()`` asking for its
        own key again)."""
        if not self._options.stampede_lock or not callable(default) or self._ms(timeout) == 0:
            return None
        made = self.make_and_validate_key(key, version=version)
        lock = self._lock_key(made)
        return None if lock in _HELD_LOCKS.get() else (made, lock)

    def _lock_key(self, made: str) -> str:
        """The lock of ``made``: ``<KEY_PREFIX>:#l:<made key>``, inside the BCAST prefix (every
        listener hears of its release) and, like tag keys, never a made key of any version but
        ``"#l"``, so ``keys()`` never lists it."""
        return f"{self.key_prefix}:#l:{made}"

    def _op_stampede(
        self, made: str, lock: str, token: str, pause: Callable[[float, str, int | None], Any]
    ) -> _Op:
        """Take ``made``'s lock, or wait for its holder's value: ``_Held`` (compute under
        ``_holding``, then ``_op_unlock``), the value, or ``_UNLOCKED`` (compute without it).

        The lock is ``SET NX PX`` of ``token`` (random), expiring after ``STAMPEDE_LOCK`` seconds,
        so a holder that dies frees it by expiry (a live one extends it: ``_Renewer``). Once
        taken, the value is read again (it may have been stored since this caller's miss). A waiter
        polls it (5 ms, doubling up to 100 ms), sleeping in ``pause`` (``_pause`` or
        ``_apause``), woken early by its listener applying the release's invalidation; once it
        is gone, the value is read, and if there is none (the holder failed or died), the waiter
        tries to take the lock itself. The wait is bounded: after ``_LOCK_LIFE + 1`` times
        ``STAMPEDE_LOCK`` in all (a holder's longest life, then its successor's computation), or
        a Redis error ignored by ``IGNORE_EXCEPTIONS``, the caller computes without the lock."""
        seconds = self._options.stampede_lock
        ms = max(1, round(seconds * 1000))
        deadline = None
        applied = getattr(self._near, "applied_ns", None)
        while True:
            try:
                taken = yield lambda c: c.set(lock, token, nx=True, px=ms)
            except self._errors as e:
                return self._failed("get_or_set's STAMPEDE_LOCK", e, _UNLOCKED)
            if taken:
                held = _Held(lock, token, os.getpid())
                # A holder may have stored the value and released its lock between this
                # caller's miss and its SET NX: then the value is there, and computing it again
                # is what the lock is for avoiding. Read it once more, under the lock.
                try:
                    value = yield from self._op_get(made, _MISS, self._fresh())
                except BaseException:
                    yield from self._op_unlock(held)
                    raise
                if value is _MISS:
                    return held
                yield from self._op_unlock(held)
                return value
            now = time.monotonic()
            if deadline is None:
                deadline = now + (_LOCK_LIFE + 1) * seconds
            step = _LOCK_POLL_FIRST
            while True:
                if now >= deadline:
                    return _UNLOCKED
                # Read before the poll: a release applied after it changes what this says.
                since = applied(lock) if applied is not None else None
                try:
                    pttl = yield lambda c: c.pttl(lock)
                except self._errors as e:
                    return self._failed("get_or_set's STAMPEDE_LOCK", e, _UNLOCKED)
                if pttl == -2:
                    break  # released (after its holder stored the value) or expired
                wait = min(step, deadline - now)
                if pttl > 0:
                    wait = min(wait, pttl / 1000)
                yield lambda c, wait=wait, since=since: pause(wait, lock, since)
                step = min(step * 2, _LOCK_POLL_MAX)
                now = time.monotonic()
            value = yield from self._op_get(made, _MISS, self._fresh())
            if value is not _MISS:
                return value
            if time.monotonic() >= deadline:
                return _UNLOCKED

    def _op_unlock(self, held: _Held) -> _Op:
        """Free ``held`` if it is still ours (compare-and-delete). Never raises: a lock left
        behind frees itself by expiry, so an error is logged and counted, not reported as the
        ``get_or_set``'s."""
        if held.pid != os.getpid():
            return  # taken by the parent before a fork(): not this process's to free
        try:
            yield from self._script(_UNLOCK, [held.lock], held.token, self._channel)
        except self._errors as e:
            self._counters.add(errors=1)
            logger.warning(
                "NearCache %r: releasing get_or_set's STAMPEDE_LOCK failed (it expires by "
                "itself): %r",
                self._options.location,
                e,
            )

    def _ticks(self, seconds: float, lock: str, since: int | None) -> Iterator[float]:
        """The sleeps of a lock waiter's pause: ``seconds`` in 5 ms ticks, ending early once
        the listener has applied an invalidation of ``lock`` (its release) since ``since``."""
        applied = getattr(self._near, "applied_ns", None)
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            yield min(left, _LOCK_TICK)
            if applied is not None and applied(lock) != since:
                return

    def _pause(self, seconds: float, lock: str, since: int | None) -> None:
        """``_op_stampede``'s pause on the sync path: ``time.sleep`` (the GIL released)."""
        for tick in self._ticks(seconds, lock, since):
            time.sleep(tick)

    async def _apause(self, seconds: float, lock: str, since: int | None) -> None:
        """``_op_stampede``'s pause on the event loop: ``asyncio.sleep`` (never blocking it)."""
        for tick in self._ticks(seconds, lock, since):
            await asyncio.sleep(tick)

    def delete_many(self, keys: Iterable[Any], version: Any = None) -> None:
        """One DEL for every key."""
        made = [self.make_and_validate_key(k, version=version) for k in keys]
        if made:
            self._run(self._op_delete(made, "delete_many"))

    def clear(self) -> None:
        """FLUSHDB (as Django's RedisCache): empties the whole database and every process's L1."""
        self._run(self._op_clear())

    def close(self, **kwargs: Any) -> None:
        """Nothing to release: the client and its pool live as long as the process."""

    # Beyond Django's API -------------------------------------------------------------------

    def ttl(self, key: Any, version: Any = None) -> float | None:
        """Seconds left in Redis: None for no expiry, 0 for a missing key (as django-redis)."""
        made = self.make_and_validate_key(key, version=version)
        ms = self._run(self._op_script("ttl", _TTL, made, -2))
        return None if ms == -1 else max(0, ms) / 1000

    def iter_keys(self, pattern: str = "*", version: Any = None) -> Iterator[str]:
        """The caller's keys matching the Redis glob ``pattern``, by SCAN (never KEYS)."""
        base, match = self._scan_match(pattern, version)
        for made in self._client().scan_iter(match=match, count=1000):
            made = made.decode() if isinstance(made, bytes) else made
            yield made[len(base) :]

    def keys(self, pattern: str = "*", version: Any = None) -> list[str]:
        """``list(iter_keys(pattern, version))``."""
        return list(self.iter_keys(pattern, version))

    def delete_pattern(self, pattern: str, version: Any = None) -> int:
        """Delete every key matching the glob ``pattern`` (SCAN + DEL); returns how many."""
        return self._run(self._op_delete_pattern(pattern, version))

    def stats(self) -> dict[str, Any]:
        """L1 hits, L2 hits, misses, ignored errors, the L1 store's and the listener's stats.

        The listener's include when it last applied an invalidation (``last_invalidation_age_ms``
        ago) and ``last_invalidation_lag_ms``: for the last invalidation of a write this process
        made, the time from just before the write was sent to this process's listener applying
        its invalidation (what other processes' listeners see too, give or take their own
        connection), ``invalidation_lags_measured`` such lags so far.
        """
        l1 = self._h.stats()
        c = self._counters
        return {
            "l1_hits": l1.get("hits", 0),
            "l2_hits": c.l2_hits,
            "misses": c.misses,
            "errors_ignored": c.errors,
            "bad_signatures": c.bad_signatures,
            "bad_frames": c.bad_frames,
            "l1": l1,
            "listener": dict(self._near.stats()),
        }

    def invalidate_tags(self, tags: Iterable[str]) -> int:
        """Make every entry carrying any of ``tags`` a miss, in every process: one script INCRs
        their versions in Redis. Returns how many distinct tags it bumped (entries in other
        processes cannot be counted); 0 on an error ignored by IGNORE_EXCEPTIONS."""
        tags = (tags,) if isinstance(tags, str) else tuple(_tag_names(tags))
        count = self._invalidate_tags(tags)
        logger.debug(
            "invalidated tags %s in %r: %d tags", ", ".join(tags), self._options.location, count
        )
        return count

    def _invalidate_tags(self, tags: tuple[str, ...]) -> int:
        """``invalidate_tags`` without its log line (model invalidation logs its own line)."""
        count = self._run(self._op_invalidate_tags(tuple(_tag_names(tags))))
        tags_invalidated.send(sender=type(self), cache=self, tags=tags, count=count)
        return count

    async def ainvalidate_tags(self, tags: Iterable[str]) -> int:
        """``invalidate_tags`` on redis.asyncio."""
        tags = (tags,) if isinstance(tags, str) else tuple(_tag_names(tags))
        count = await self._arun(self._op_invalidate_tags(tags))
        logger.debug(
            "invalidated tags %s in %r: %d tags", ", ".join(tags), self._options.location, count
        )
        tags_invalidated.send(sender=type(self), cache=self, tags=tags, count=count)
        return count

    def snapshot_tags(self, tags: Iterable[str]) -> NearTagSnapshot:
        """Current versions of ``tags``; pass it as ``tags=`` to store only if none moved since."""
        if isinstance(tags, NearTagSnapshot):
            return tags
        return self._run(self._op_snapshot(tags))

    # Async: L1 hits are answered directly; a miss goes to redis.asyncio. -------------------

    async def aget(self, key: Any, default: Any = None, version: Any = None) -> Any:
        """``get`` on redis.asyncio; an L1 hit is answered by one call into Rust (``_probe``)."""
        found = self._probe(key, version)
        if found is not _STALE and found is not _MISS and type(found) is not _Tagged:
            return found
        if found is not _STALE:
            made = self.make_key(key, version=version)
            if found is not _MISS:
                return await self._arun(self._op_l1_tagged(made, found, default))
            return await self._arun(self._op_get(made, default, True))
        made = self.make_and_validate_key(key, version=version)
        fresh = self._fresh()
        if fresh:
            value = self._h.get(made, _MISS)
            if type(value) is _Tagged:
                return await self._arun(self._op_l1_tagged(made, value, default))
            if value is not _MISS:
                return value
        return await self._arun(self._op_get(made, default, fresh))

    async def aset(
        self,
        key: Any,
        value: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: Any = None,
        tags: Any = None,
    ) -> None:
        made = self.make_and_validate_key(key, version=version)
        if tags is None:
            await self._arun(self._op_set(made, value, timeout, False))
        else:
            await self._arun(self._op_set_tagged(made, value, timeout, False, tags))

    async def aadd(
        self,
        key: Any,
        value: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: Any = None,
        tags: Any = None,
    ) -> bool:
        made = self.make_and_validate_key(key, version=version)
        return await self._arun(self._op_set_tagged(made, value, timeout, True, tags))

    async def atouch(self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: Any = None) -> bool:
        made = self.make_and_validate_key(key, version=version)
        return await self._arun(self._op_touch(made, timeout))

    async def adelete(self, key: Any, version: Any = None) -> bool:
        made = self.make_and_validate_key(key, version=version)
        return bool(await self._arun(self._op_delete([made], "delete")))

    async def ahas_key(self, key: Any, version: Any = None) -> bool:
        made = self.make_and_validate_key(key, version=version)
        return bool(await self._arun(self._op_script("has_key", _HAS, made, 0)))

    async def aincr(self, key: Any, delta: int = 1, version: Any = None) -> Any:
        made = self.make_and_validate_key(key, version=version)
        try:
            return await self._arun(self._op_incr(made, delta))
        except ValueError:
            # As Django's BaseCache.aincr: the message names the caller's key.
            raise ValueError(f"Key '{key}' not found") from None

    async def aget_many(self, keys: Iterable[Any], version: Any = None) -> dict[Any, Any]:
        key_map, found, lacking, fresh = self._l1_many(keys, version)
        if lacking or (key_map and any(type(v) is _Tagged for v in found.values())):
            return await self._arun(self._op_many_rest(key_map, found, lacking, fresh))
        return found

    async def aset_many(
        self,
        data: Mapping[Any, Any],
        timeout: Any = DEFAULT_TIMEOUT,
        version: Any = None,
        tags: Any = None,
    ) -> list[Any]:
        if not data:
            return []
        items = [(self.make_and_validate_key(k, version=version), v) for k, v in data.items()]
        if tags is None:
            return [] if await self._arun(self._op_set_many(items, timeout)) else list(data)
        if not isinstance(tags, NearTagSnapshot):
            tags = await self._arun(self._op_snapshot(tags))
        return [
            key
            for key, (made, value) in zip(data, items, strict=True)
            if not await self._arun(self._op_set_tagged(made, value, timeout, False, tags))
        ]

    async def adelete_many(self, keys: Iterable[Any], version: Any = None) -> None:
        made = [self.make_and_validate_key(k, version=version) for k in keys]
        if made:
            await self._arun(self._op_delete(made, "delete_many"))

    async def aget_or_set(
        self,
        key: Any,
        default: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: Any = None,
        tags: Any = None,
    ) -> Any:
        """``get_or_set`` on redis.asyncio (no thread hop): ``aget``, then on a miss
        ``AsyncFillMixin``'s single-flight around ``_afill`` (``aadd``, then ``aget``)."""
        value = await self.aget(key, self._missing_key, version=version)
        if value is self._missing_key:
            return await self._afill_missed(key, default, timeout, version, tags)
        return value

    # AsyncFillMixin's hooks, on redis.asyncio: the sync ones would block the event loop.

    async def _aread(self, key: Any, version: Any) -> Any:
        return await self.aget(key, self._missing_key, version=version)

    async def _afill(
        self, key: Any, default: Any, timeout: Any, version: Any, tags: Any, fill: Any = None
    ) -> Any:
        # `fill` holds the key's single-flight in this process; Redis's SET NX decides who stores.
        # With STAMPEDE_LOCK, the lock across processes too (as in `_fill`).
        lock = self._lock_for(key, default, timeout, version)
        held = None
        if lock is not None:
            token = secrets.token_hex(16)
            try:
                got = await self._arun(self._op_stampede(*lock, token, self._apause))
            except asyncio.CancelledError:
                # Cancelled while its SET NX was on the wire, the lock may be ours in Redis:
                # free it (only if it is: compare-and-delete), not leave it to expire.
                await self._arun(self._op_unlock(_Held(lock[1], token, os.getpid())))
                raise
            if type(got) is _Held:
                held = got
            elif got is not _UNLOCKED:
                return got  # the holder's value
        try:
            with self._holding(held):
                return await self._afill_here(key, default, timeout, version, tags)
        finally:
            if held is not None:
                await self._arun(self._op_unlock(held))

    async def _afill_here(
        self, key: Any, default: Any, timeout: Any, version: Any, tags: Any
    ) -> Any:
        """``_afill``'s computation: snapshot the tags, compute, ``aadd``, read back."""
        if tags is not None and not isinstance(tags, NearTagSnapshot):
            # The race guard: the versions are taken before computing (see get_or_set).
            tags = await self._arun(self._op_snapshot(tags))
        if callable(default):
            default = default()
        await self.aadd(key, default, timeout=timeout, version=version, tags=tags)
        # Whoever added first won: return what Redis holds now.
        return await self.aget(key, default, version=version)

    async def aclear(self) -> None:
        await self._arun(self._op_clear())

    async def attl(self, key: Any, version: Any = None) -> float | None:
        made = self.make_and_validate_key(key, version=version)
        ms = await self._arun(self._op_script("ttl", _TTL, made, -2))
        return None if ms == -1 else max(0, ms) / 1000

    async def adelete_pattern(self, pattern: str, version: Any = None) -> int:
        return await self._arun(self._op_delete_pattern(pattern, version))

    async def aclose(self, **kwargs: Any) -> None:
        """Nothing to release (see ``close``)."""

    # Locks and health (django-redis's ``lock``; ``check`` for health-check apps) ------------

    def lock(
        self,
        key: Any,
        version: Any = None,
        timeout: float | None = None,
        sleep: float = 0.1,
        blocking: bool = True,
        blocking_timeout: float | None = None,
        client: Any = None,
        thread_local: bool = True,
        **kwargs: Any,
    ) -> Any:
        """redis-py's ``Lock`` on the made key of ``key``, as django-redis's ``cache.lock``
        (same arguments, same order; ``kwargs`` such as ``lock_class`` or
        ``raise_on_release_error`` go to redis-py's ``Redis.lock``).

        The lock is a key under this alias's prefix (``make_key(key, version)``): taking or
        releasing it sends an invalidation to every process's listener (there is nothing in L1 to
        drop), ``keys()`` lists it while held and ``delete_pattern``/``clear`` remove it (freeing
        it), as with django-redis. Errors are raised whatever IGNORE_EXCEPTIONS says: a lock must
        never look taken when it is not."""
        made = self.make_key(key, version=version)
        return (client or self._client()).lock(
            made,
            timeout=timeout,
            sleep=sleep,
            blocking=blocking,
            blocking_timeout=blocking_timeout,
            thread_local=thread_local,
            **kwargs,
        )

    def alock(
        self,
        key: Any,
        version: Any = None,
        timeout: float | None = None,
        sleep: float = 0.1,
        blocking: bool = True,
        blocking_timeout: float | None = None,
        thread_local: bool = True,
        **kwargs: Any,
    ) -> Any:
        """``lock`` on redis.asyncio: ``async with cache.alock("name"):`` (a plain method, called
        inside the running event loop, whose client it uses; its ``acquire``/``release`` are
        coroutines)."""
        made = self.make_key(key, version=version)
        return self._aclient().lock(
            made,
            timeout=timeout,
            sleep=sleep,
            blocking=blocking,
            blocking_timeout=blocking_timeout,
            thread_local=thread_local,
            **kwargs,
        )

    def _ops_client(self, timeout: float) -> Any:
        """A redis-py client of its own for health and ``manage.py rustcache``: the pool's
        connection class and options, but connect and every reply bounded by ``timeout`` and no
        retries, so it never hangs. The caller disconnects its pool."""
        redis = _redis()
        if self._generation != _STATE.generation:
            self._bind()
        pool = self._conn._pool
        kwargs = dict(pool.connection_kwargs)
        kwargs.pop("retry_on_timeout", None)
        kwargs.pop("retry_on_error", None)
        kwargs.update(
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
        )
        ops_pool = redis.ConnectionPool(
            connection_class=pool.connection_class, max_connections=1, **kwargs
        )
        return redis.Redis(connection_pool=ops_pool)

    def check(self, timeout: float = 2.0) -> dict[str, Any]:
        """Health, for health-check apps and ``manage.py rustcache``: never raises because Redis
        is unreachable or slow, and returns within ``4 * timeout`` seconds (connect, two PINGs,
        the lease wait: each bounded by ``timeout``).

        Opens a connection of its own (the pool's class and options, but connect and reply each
        bounded by ``timeout`` and no retries), times a PING, then gives the listener up to
        ``timeout`` to hold a fresh lease (starting it if this process had not yet). Returns
        ``ok`` (PING answered), ``ping_ms``, ``error`` (why not ok, else None), ``lease_ok``
        (L1 may serve hits now: without it every read goes to Redis, correct but slower),
        ``listener_connected``, ``listener_last_error``, ``last_pong_rtt_ms``, ``invalidation``,
        ``backend``, ``scope`` (``"shared"``: every process) and ``location`` (its password
        masked)."""
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
            raise ValueError(f"timeout must be a number of seconds > 0, not {timeout!r}")
        self._near.ensure_started()
        ping_ms = error = None
        try:
            client = self._ops_client(timeout)
            try:
                client.ping()  # connects
                start = time.perf_counter()
                client.ping()
                ping_ms = round((time.perf_counter() - start) * 1000, 3)
            finally:
                client.connection_pool.disconnect()
        except (_redis().exceptions.RedisError, OSError) as e:
            error = f"{type(e).__name__}: {e}"
        listener = dict(self._near.stats())
        if error is None and not listener.get("lease_ok"):
            self._near.wait_fresh(float(timeout))
            listener = dict(self._near.stats())
        return {
            "ok": error is None,
            "backend": "NearCache",
            "location": _masked(self._options.location),
            "scope": "shared",
            "ping_ms": ping_ms,
            "error": error,
            "lease_ok": bool(listener.get("lease_ok")),
            "listener_connected": bool(listener.get("connected")),
            "listener_last_error": listener.get("last_error"),
            "last_pong_rtt_ms": listener.get("last_pong_rtt_ms"),
            "invalidation": self._options.invalidation,
        }


def _masked(location: str) -> str:
    """``location`` with the password of its ``user:password@`` part replaced by ``***``."""
    location = re.sub(r"^([a-z]+://[^/@:]*:)[^/@]*@", r"\1***@", location, flags=re.IGNORECASE)
    return re.sub(r"([?&]password=)[^&]*", r"\1***", location, flags=re.IGNORECASE)
