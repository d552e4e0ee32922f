"""``python manage.py rustcache``: stats, health, invalidation and clearing of cache aliases.

    rustcache stats [--alias A ...] [--json] [--probe] [--timeout S]
    rustcache health [--alias A ...] [--json] [--timeout S]
    rustcache invalidate (--tags T ... | --model app.Model | --keys K ...) [--alias A]
    rustcache clear [--alias A] [--noinput]

A NearCache alias is reached in every process (through Redis and the listeners). A RustCache
alias (or LocMemCache) lives inside each process: this command, being a process of its own, then
reaches only itself, and says so.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from django.apps import apps
from django.conf import settings
from django.core.cache import caches
from django.core.cache.backends.locmem import LocMemCache
from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_rustcache.backend import RustCache
from django_rustcache.invalidation import invalidate_model
from django_rustcache.near import NearCache, _masked
from django_rustcache.signals import tags_invalidated

#: What this command says for an alias whose store lives inside each process.
LOCAL_ONLY = (
    "alias {alias!r} is a {backend}: its store lives inside each process, so this reached only "
    "this command's own process (pid {pid}), not your running web or worker processes, which "
    "is usually pointless. To reach them, run this from inside them (the code that changes the "
    "data, or a view), restart them, or use NearCache, which reaches every process."
)


def _redis_errors() -> tuple[type[BaseException], ...]:
    """redis-py's errors (none when redis-py is not installed: no NearCache then)."""
    try:
        from redis.exceptions import RedisError
    except ImportError:  # pragma: no cover - depends on the environment
        return ()
    return (RedisError,)


def _backend_name(cache: Any) -> str:
    cls = type(cache)
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_local(cache: Any) -> bool:
    """Whether ``cache``'s data lives inside each process (so this command reaches only itself)."""
    return isinstance(cache, (RustCache, LocMemCache))


def _ms(value: Any) -> str:
    return (
        "-" if value is None else f"{value:.3f} ms" if isinstance(value, float) else f"{value} ms"
    )


class Command(BaseCommand):
    """``rustcache stats|health|invalidate|clear``."""

    help = (
        "django-rustcache operations: stats (L1, Redis, lease, invalidation lag), health "
        "(PING and lease; exit status 1 if not ok), invalidate (tags, a model, keys) and clear. "
        "A NearCache alias is reached in every process; a RustCache alias only in this one."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

        stats = sub.add_parser("stats", help="per alias: L1, Redis, lease, invalidation lag")
        stats.add_argument(
            "--alias", action="append", help="a CACHES alias (repeatable; default: all)"
        )
        stats.add_argument("--json", action="store_true", help="print one JSON object")
        stats.add_argument(
            "--probe",
            action="store_true",
            help="NearCache: write (then delete) a probe key and time its invalidation's "
            "round trip through Redis back to this process's listener",
        )
        stats.add_argument("--timeout", type=float, default=2.0, help="seconds per Redis call")

        health = sub.add_parser("health", help="PING and lease per alias; exit 1 if not ok")
        health.add_argument(
            "--alias", action="append", help="a CACHES alias (repeatable; default: all)"
        )
        health.add_argument("--json", action="store_true", help="print one JSON object")
        health.add_argument("--timeout", type=float, default=2.0, help="seconds per Redis call")

        inv = sub.add_parser("invalidate", help="invalidate tags, a model or keys")
        what = inv.add_mutually_exclusive_group(required=True)
        what.add_argument("--tags", nargs="+", metavar="TAG", help="invalidate_tags(TAG ...)")
        what.add_argument(
            "--model", metavar="APP.MODEL", help="invalidate_model: its tag and its rules'"
        )
        what.add_argument("--keys", nargs="+", metavar="KEY", help="delete_many(KEY ...)")
        inv.add_argument("--alias", default="default", help="the CACHES alias (default: default)")
        inv.add_argument(
            "--key-version", type=int, default=None, help="the version of --keys (default: VERSION)"
        )

        clear = sub.add_parser("clear", help="clear() the alias (NearCache: FLUSHDB)")
        clear.add_argument("--alias", default="default", help="the CACHES alias (default: default)")
        clear.add_argument(
            "--noinput",
            "--no-input",
            action="store_false",
            dest="interactive",
            help="do not ask before clearing a shared (Redis) alias",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        action = options["action"]
        try:
            if action == "stats":
                self._stats(options)
            elif action == "health":
                self._health(options)
            elif action == "invalidate":
                self._invalidate(options)
            else:
                self._clear(options)
        except _redis_errors() as e:
            # A Redis failure is the operator's answer, not a traceback (stats and health
            # report unreachable servers themselves: this is invalidate and clear).
            raise CommandError(f"{action} failed: Redis error: {type(e).__name__}: {e}") from e

    # Helpers ----------------------------------------------------------------------------

    def _aliases(self, given: list[str] | None) -> list[str]:
        aliases = list(dict.fromkeys(given)) if given else list(settings.CACHES)
        unknown = [a for a in aliases if a not in settings.CACHES]
        if unknown:
            raise CommandError(
                f"unknown cache alias {unknown[0]!r}; CACHES has: {', '.join(settings.CACHES)}"
            )
        return aliases

    def _cache(self, alias: str) -> Any:
        return caches[self._aliases([alias])[0]]

    def _note_local(self, alias: str, cache: Any) -> None:
        if _is_local(cache):
            self.stdout.write(
                self.style.WARNING(
                    "NOTE: "
                    + LOCAL_ONLY.format(alias=alias, backend=type(cache).__name__, pid=os.getpid())
                )
            )

    def _json(self, data: Any) -> None:
        self.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str))

    # stats / health ---------------------------------------------------------------------

    def _stats(self, options: dict[str, Any]) -> None:
        timeout = self._timeout(options)
        out = {}
        for alias in self._aliases(options["alias"]):
            cache = caches[alias]
            if isinstance(cache, NearCache):
                out[alias] = near_stats(cache, timeout, options["probe"])
            elif isinstance(cache, RustCache):
                out[alias] = {
                    "backend": _backend_name(cache),
                    "scope": "process",
                    "location": cache._options.location,
                    "note": "figures of this command's own process: each process has its own "
                    "store, which no other process can read",
                    "stats": cache.stats(),
                }
            else:
                out[alias] = {"backend": _backend_name(cache), "stats": None}
        if options["json"]:
            self._json(out)
        else:
            for alias, data in out.items():
                self._print_stats(alias, data)
        self._fail_if_down(out)

    def _health(self, options: dict[str, Any]) -> None:
        timeout = self._timeout(options)
        out = {}
        for alias in self._aliases(options["alias"]):
            cache = caches[alias]
            check = getattr(cache, "check", None)
            if isinstance(cache, (NearCache, RustCache)) and check is not None:
                out[alias] = {"health": check(timeout)}
            else:
                out[alias] = {"backend": _backend_name(cache), "health": None}
        if options["json"]:
            self._json(out)
        else:
            for alias, data in out.items():
                h = data["health"]
                if h is None:
                    self.stdout.write(f"{alias}: {data['backend']}: no health check")
                elif not h["ok"]:
                    self.stdout.write(self.style.ERROR(f"{alias}: DOWN: {h['error']}"))
                elif h["backend"] == "NearCache":
                    lease = "lease ok" if h["lease_ok"] else "NO LEASE (reads go to Redis)"
                    self.stdout.write(f"{alias}: ok, PING {_ms(h['ping_ms'])}, {lease}")
                else:
                    self.stdout.write(f"{alias}: ok ({h['backend']}, this process only)")
        self._fail_if_down(out)

    def _timeout(self, options: dict[str, Any]) -> float:
        timeout = options["timeout"]
        if not timeout > 0:
            raise CommandError(f"--timeout must be > 0 seconds, not {timeout}")
        return timeout

    def _fail_if_down(self, out: dict[str, Any]) -> None:
        down = [a for a, d in out.items() if d.get("health") and not d["health"]["ok"]]
        if down:
            raise CommandError(f"Redis unreachable for cache alias(es): {', '.join(down)}")

    def _print_stats(self, alias: str, d: dict[str, Any]) -> None:
        w = self.stdout.write
        if d.get("stats", True) is None:
            w(f"{alias}: {d['backend']}: no stats (not a django_rustcache backend)")
            return
        if d["scope"] == "process":
            s = d["stats"]
            w(f"{alias}: RustCache {d['location']!r} (this process only)")
            w(
                f"  store: {s.get('entries')} entries, {s.get('bytes')} bytes, "
                f"hits {s.get('hits')}, misses {s.get('misses')}, sets {s.get('sets')}, "
                f"evictions {s.get('evictions')}"
            )
            w(self.style.WARNING(f"  NOTE: {d['note']}"))
            return
        h, st, lis = d["health"], d["settings"], d["listener"]
        w(
            f"{alias}: NearCache {h['location']} KEY_PREFIX {st['key_prefix']!r} "
            f"(LEASE {st['lease']} s, L1_MAX_TTL {st['l1_max_ttl']} s, "
            f"INVALIDATION {st['invalidation']})"
        )
        if h["ok"]:
            w(f"  health: ok, PING {_ms(h['ping_ms'])}")
        else:
            w(self.style.ERROR(f"  health: DOWN: {h['error']}"))
        lease = "lease ok" if h["lease_ok"] else "NO LEASE (L1 not served: reads go to Redis)"
        conn = "connected" if lis.get("connected") else "not connected"
        w(
            f"  listener (this process): {conn}, {lease}, "
            f"last PONG {_ms(lis.get('last_pong_rtt_ms'))}, reconnects {lis.get('reconnects')}, "
            f"flushes {lis.get('flushes')}, last error {lis.get('last_error') or '-'}"
        )
        probe = d.get("probe")
        if probe is None:
            lag = "not measured (--probe times a write's invalidation)"
        elif probe.get("error"):
            lag = f"probe write failed: {probe['error']}"
        elif probe["lag_ms"] is None:
            lag = f"probe: no invalidation came back within {probe['waited_ms']} ms"
        else:
            lag = f"{_ms(probe['lag_ms'])} (probe write -> invalidation applied here)"
        w(
            f"  invalidation lag: {lag}; last invalidation applied "
            f"{_ms(lis.get('last_invalidation_age_ms'))} ago"
        )
        p = d["this_process"]
        l1 = p["l1"]
        w(
            f"  L1 (this process): {l1.get('entries')} entries, {l1.get('bytes')} bytes, "
            f"L1 hits {p['l1_hits']}, L2 hits {p['l2_hits']}, misses {p['misses']}, "
            f"errors ignored {p['errors_ignored']}, bad signatures {p['bad_signatures']}"
        )
        r = d["redis"]
        if r is None:
            w("  Redis: -")
        elif "error" in r:
            w(self.style.ERROR(f"  Redis: INFO failed: {r['error']}"))
        else:
            listeners = (
                f"subscribers of the channel {r['channel_subscribers']}"
                if "channel_subscribers" in r
                else f"tracking clients {r.get('tracking_clients')}"
            )
            w(
                f"  Redis: {r.get('server')} {r.get('version')}, used_memory "
                f"{r.get('used_memory_human')} (maxmemory {r.get('maxmemory_human')}, "
                f"{r.get('maxmemory_policy')}), clients {r.get('connected_clients')} "
                f"({listeners}), db{r['db']}: {r['db_keys']} keys, {r['db_expires']} with expiry, "
                f"evicted {r.get('evicted_keys')}, expired {r.get('expired_keys')}"
            )

    # invalidate / clear -----------------------------------------------------------------

    def _invalidate(self, options: dict[str, Any]) -> None:
        alias = options["alias"]
        cache = self._cache(alias)
        if options["tags"]:
            if not hasattr(cache, "invalidate_tags"):
                raise CommandError(f"alias {alias!r} ({_backend_name(cache)}) has no tags")
            count = cache.invalidate_tags(options["tags"])
            self._say_tags(alias, cache, options["tags"], count)
            self._note_local(alias, cache)
        elif options["model"]:
            try:
                model = apps.get_model(options["model"])
            except (LookupError, ValueError) as e:
                raise CommandError(f"--model {options['model']!r}: {e}") from None
            seen: list[tuple[Any, tuple[str, ...], int]] = []

            def record(sender: Any, cache: Any, tags: Any, count: int, **kwargs: Any) -> None:
                seen.append((cache, tuple(tags), count))

            tags_invalidated.connect(record, weak=False)
            try:
                invalidate_model(model, cache=alias)
            finally:
                tags_invalidated.disconnect(record)
            by_id = {}
            for a in settings.CACHES:
                try:
                    by_id[id(caches[a])] = a
                except Exception:  # an alias that cannot be built was not reached either
                    continue
            self.stdout.write(
                f"invalidated model {model._meta.label}: its tag and its invalidate_on rules' "
                "fixed tags and keys"
            )
            reached: dict[str, Any] = {}
            for c, tags, count in seen:
                a = by_id.get(id(c), repr(c))
                self._say_tags(a, c, tags, count)
                reached[a] = c
            reached.setdefault(alias, cache)
            for a, c in reached.items():
                self._note_local(a, c)
        else:
            keys = options["keys"]
            cache.delete_many(keys, version=options["key_version"])
            where = "in Redis and every process's L1" if isinstance(cache, NearCache) else ""
            self.stdout.write(f"{alias}: deleted {len(keys)} key(s) {where}".rstrip())
            self._note_local(alias, cache)

    def _say_tags(self, alias: str, cache: Any, tags: Any, count: int) -> None:
        names = ", ".join(tags)
        if isinstance(cache, NearCache):
            if not count and tags:
                raise CommandError(
                    f"{alias}: invalidating tags {names} failed: IGNORE_EXCEPTIONS hid the "
                    "error (see the django_rustcache.near log)"
                )
            self.stdout.write(
                f"{alias}: bumped {count} tag version(s) in Redis ({names}): entries carrying "
                "them are misses in every process"
            )
        else:
            self.stdout.write(f"{alias}: invalidated tags {names}: {count} entries removed")

    def _clear(self, options: dict[str, Any]) -> None:
        alias = options["alias"]
        cache = self._cache(alias)
        if isinstance(cache, NearCache):
            o = cache._options
            db = o.url.get("db", o.redis_options.get("db", 0)) or 0
            what = (
                f"database {db} of {_masked(o.location)} (FLUSHDB: every alias, prefix and key "
                "in it, not only this KEY_PREFIX) and every process's L1"
            )
            if options["interactive"]:
                answer = input(f"This will empty {what}. Type 'yes' to continue: ")
                if answer != "yes":
                    raise CommandError("clear cancelled")
            cache.clear()
            self.stdout.write(f"{alias}: cleared: {what}")
        else:
            cache.clear()
            self.stdout.write(f"{alias}: cleared ({_backend_name(cache)})")
            self._note_local(alias, cache)


def near_stats(cache: NearCache, timeout: float, probe: bool) -> dict[str, Any]:
    """What ``rustcache stats`` reports for a NearCache alias (also its ``--json`` object)."""
    o = cache._options
    health = cache.check(timeout)
    out: dict[str, Any] = {
        "backend": _backend_name(cache),
        "scope": "shared",
        "health": health,
        "settings": {
            "key_prefix": cache.key_prefix,
            "tracked_prefix": cache._track_prefix,
            "lease": o.lease,
            "l1_max_ttl": o.l1_max_ttl,
            "invalidation": o.invalidation,
            "signed": o.signed,
        },
        "probe": _probe(cache, timeout) if probe and health["ok"] else None,
    }
    s = cache.stats()
    out["listener"] = s["listener"]
    out["this_process"] = {k: v for k, v in s.items() if k != "listener"}
    out["redis"] = _redis_figures(cache, timeout) if health["ok"] else None
    return out


def _probe(cache: NearCache, timeout: float) -> dict[str, Any]:
    """Write a probe key under the alias's prefix and wait (at most ``timeout``) for this
    process's listener to apply its invalidation: ``lag_ms`` is the listener's own measure of
    that round trip (write sent -> Redis -> push -> L1 updated), as for any write."""
    key = f"rustcache-probe:{socket.gethostname()}:{os.getpid()}"
    before = cache.stats()["listener"].get("invalidation_lags_measured", 0)
    start = time.monotonic()
    lag = None
    try:
        cache.set(key, 1, timeout=max(10, int(timeout) + 1))
        while time.monotonic() - start < timeout:
            listener = cache.stats()["listener"]
            if listener.get("invalidation_lags_measured", 0) > before:
                lag = listener.get("last_invalidation_lag_ms")
                break
            time.sleep(0.002)
    except _redis_errors() as e:
        return {"key": cache.make_key(key), "lag_ms": None, "error": f"{type(e).__name__}: {e}"}
    finally:
        try:
            cache.delete(key)  # it expires anyway
        except _redis_errors():
            pass
    return {
        "key": cache.make_key(key),
        "lag_ms": lag,
        "waited_ms": round((time.monotonic() - start) * 1000, 1),
    }


def _redis_figures(cache: NearCache, timeout: float) -> dict[str, Any]:
    """The server's figures (one INFO, plus PUBSUB NUMSUB in pubsub mode), on a connection
    bounded by ``timeout``."""
    o = cache._options
    db = int(o.url.get("db", o.redis_options.get("db", 0)) or 0)
    try:
        client = cache._ops_client(timeout)
        try:
            info = client.info()
            subscribers = None
            if cache._pubsub:
                subscribers = dict(client.pubsub_numsub(cache._channel)).get(
                    cache._channel.encode(), 0
                )
        finally:
            client.connection_pool.disconnect()
    except Exception as e:  # INFO may be renamed or denied by ACLs: report, do not fail
        return {"db": db, "error": f"{type(e).__name__}: {e}"}
    keyspace = info.get(f"db{db}") or {}
    server = "valkey" if "valkey_version" in info else info.get("server_name") or "redis"
    figures = {
        "server": server,
        "version": info.get("valkey_version") or info.get("redis_version"),
        "db": db,
        "db_keys": keyspace.get("keys", 0),
        "db_expires": keyspace.get("expires", 0),
    }
    for name in (
        "used_memory",
        "used_memory_human",
        "maxmemory",
        "maxmemory_human",
        "maxmemory_policy",
        "connected_clients",
        "tracking_clients",
        "keyspace_hits",
        "keyspace_misses",
        "evicted_keys",
        "expired_keys",
        "uptime_in_seconds",
    ):
        if name in info:
            figures[name] = info[name]
    if subscribers is not None:
        figures["channel_subscribers"] = subscribers
    return figures
