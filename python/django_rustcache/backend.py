"""``RustCache``: Django's cache API over the Rust store in ``django_rustcache._core``.

Each method is a line or two: the Rust handle builds and checks the key, encodes the value and
runs the operation. A custom ``KEY_FUNCTION`` or an overridden ``validate_key``/``make_key``
switches the instance to *raw* mode, where Python makes the key as Django does and passes it in.
"""

from __future__ import annotations

import fnmatch
import logging
import pickle
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from django.core.cache.backends.base import (
    DEFAULT_TIMEOUT,
    BaseCache,
    CacheKeyWarning,
    default_key_func,
    memcache_key_warnings,
)
from django.core.exceptions import ImproperlyConfigured

from django_rustcache._async import AsyncMixin
from django_rustcache._core import FastMethod, Handle
from django_rustcache._fill import FillMixin, Tags
from django_rustcache.checks import warn_if_app_missing
from django_rustcache.options import RustCacheOptions, clamp_store_int
from django_rustcache.signals import tags_invalidated

logger = logging.getLogger("django_rustcache")


def _warn_key(key: str) -> None:
    """Emit Django's memcached-safety warnings for a made key (called by Rust only when needed)."""
    for warning in memcache_key_warnings(key):
        warnings.warn(warning, CacheKeyWarning, stacklevel=3)


class _Synced:
    """An attribute that, when assigned, pushes the instance's settings down to the Rust handle.

    Django's tests (and users) assign ``cache.key_func`` or ``cache._max_entries`` on a live
    instance; the handle must see the new value at the next operation.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = "_synced_" + name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        return obj.__dict__[self.slot]

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.slot] = value
        obj._sync()


class _ExpiryView(Mapping[str, float | None]):
    """Read-only ``made key -> expiry (time.time() scale)`` view, LocMemCache's ``_expire_info``."""

    def __init__(self, location: str) -> None:
        self._h = Handle(location, DEFAULT_TIMEOUT, _warn_key)
        self._h.configure("", 1, None, True)

    def __getitem__(self, key: str) -> float | None:
        if not self._h.has_key(key):
            raise KeyError(key)
        return self._h.expiry(key)

    def __iter__(self) -> Iterator[str]:
        raise TypeError("the store's keys are not iterable through _expire_info")

    def __len__(self) -> int:
        return len(self._h)


class RustCache(FillMixin, AsyncMixin, BaseCache):
    """An in-process cache with LocMemCache's semantics and a Rust store shared per LOCATION.

    ``get_or_set`` and its fills come from ``FillMixin``, the ``a*`` twins from ``AsyncMixin``.
    """

    pickle_protocol = pickle.HIGHEST_PROTOCOL

    key_func = _Synced()
    key_prefix = _Synced()
    version = _Synced()
    default_timeout = _Synced()
    _max_entries = _Synced()
    _cull_frequency = _Synced()

    def __init__(self, name: str, params: dict[str, Any]) -> None:
        self._options = RustCacheOptions.from_params(name, params)
        # Django parses TIMEOUT, MAX_ENTRIES and the rest first (`_sync` waits for the handle);
        # MAX_ENTRIES as it reads it decides the shard count of a store made now.
        super().__init__(params)
        try:
            self._h = Handle(
                self._options.location,
                DEFAULT_TIMEOUT,
                _warn_key,
                policy=self._options.eviction_policy,
                max_entries=clamp_store_int(self._max_entries),
            )
        except ValueError as e:
            # Another alias created this LOCATION's store with another EVICTION_POLICY.
            raise ImproperlyConfigured(
                f"RustCache LOCATION {self._options.location!r}: OPTIONS['EVICTION_POLICY'] is "
                f"{self._options.eviction_policy!r}, but {e}."
            ) from None
        self._sync()
        warn_if_app_missing()
        # LocMemCache's introspection points, which Django's own tests use: `_cache` is the store,
        # `_lock.locked()` tells whether a store lock is held, `_expire_info[made_key]` the expiry.
        self._cache = self._h
        self._lock = self._h
        self._expire_info = _ExpiryView(self._options.location)

    def _sync(self) -> None:
        """Push prefix, version, timeout, limits and key mode into the Rust handle."""
        d = self.__dict__
        if "_h" not in d or any(
            "_synced_" + n not in d
            for n in (
                "key_func",
                "key_prefix",
                "version",
                "default_timeout",
                "_max_entries",
                "_cull_frequency",
            )
        ):
            return  # still inside BaseCache.__init__
        cls = type(self)
        raw = (
            self.key_func is not default_key_func
            or cls.validate_key is not BaseCache.validate_key
            or cls.make_key is not BaseCache.make_key
            or cls.make_and_validate_key is not BaseCache.make_and_validate_key
        )
        self._raw = raw
        # get_or_set may read and store through the handle itself only when `get`, `add` and `set`
        # are RustCache's own: a subclass overriding one of them sees get_or_set go through it.
        own = {n: getattr(cls, n) is getattr(RustCache, n) for n in ("get", "add", "set")}
        self._direct = not raw and own["get"]
        self._own_writes = own["add"] and own["set"]
        self._h.configure(self.key_prefix, self.version, self.default_timeout, raw)
        self._h.set_limits(
            clamp_store_int(self._max_entries),
            clamp_store_int(self._cull_frequency),
            self._options.max_bytes,
        )
        # With Django's key function, `get` and `set` are the handle's methods themselves (no
        # Python frame per call; see `FastMethod`); in raw mode, the Python methods below.
        if raw:
            d.pop("_fast_get", None)
            d.pop("_fast_set", None)
        else:
            d["_fast_get"] = self._h.get
            d["_fast_set"] = self._h.set_value

    def _k(self, key: Any, version: Any) -> Any:
        """The key as the handle wants it: the caller's key, or in raw mode the made key."""
        return self.make_and_validate_key(key, version) if self._raw else key

    # Django's cache API -------------------------------------------------------------------

    def add(
        self,
        key: Any,
        value: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: Any = None,
        tags: Tags = None,
    ) -> bool:
        """Store only if the key is missing (or expired); True if stored."""
        if self._raw:
            key = self.make_and_validate_key(key, version)
        return self._h.add(key, value, timeout, version, tags)

    def get(self, key: Any, default: Any = None, version: Any = None) -> Any:
        """The value, or the very ``default`` object on a miss."""
        if self._raw:
            key = self.make_and_validate_key(key, version)
        return self._h.get(key, default, version)

    get = FastMethod(get, "_fast_get")  # type: ignore[assignment]

    def set(
        self,
        key: Any,
        value: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: Any = None,
        tags: Tags = None,
    ) -> None:
        """Store the value (a value larger than MAX_BYTES stores nothing)."""
        if self._raw:
            key = self.make_and_validate_key(key, version)
        self._h.set(key, value, timeout, version, tags)

    set = FastMethod(set, "_fast_set")  # type: ignore[assignment]

    def touch(self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: Any = None) -> bool:
        """Give a live key a new timeout; False if missing."""
        if self._raw:
            key = self.make_and_validate_key(key, version)
        return self._h.touch(key, timeout, version)

    def delete(self, key: Any, version: Any = None) -> bool:
        """Remove the key; True if a live entry was removed."""
        if self._raw:
            key = self.make_and_validate_key(key, version)
        return self._h.delete(key, version)

    def has_key(self, key: Any, version: Any = None) -> bool:
        """Whether a live entry exists (does not refresh its recency)."""
        if self._raw:
            key = self.make_and_validate_key(key, version)
        return self._h.has_key(key, version)

    def incr(self, key: Any, delta: Any = 1, version: Any = None) -> Any:
        """Add ``delta`` atomically, keeping the expiry; ValueError if missing."""
        if self._raw:
            key = self.make_and_validate_key(key, version)
        return self._h.incr(key, delta, version)

    def get_many(self, keys: Iterable[Any], version: Any = None) -> dict[Any, Any]:
        """``{key: value}`` for the keys present, keyed by the caller's keys."""
        if self._raw:
            return super().get_many(keys, version=version)
        return self._h.get_many(keys, version)

    def set_many(
        self,
        data: Mapping[Any, Any],
        timeout: Any = DEFAULT_TIMEOUT,
        version: Any = None,
        tags: Tags = None,
    ) -> list[Any]:
        """Store every item; returns the keys that could not be stored (larger than MAX_BYTES)."""
        if self._raw:
            return [
                key
                for key, value in data.items()
                if not self._h.set(self._k(key, version), value, timeout, None, tags)
            ]
        return self._h.set_many(data, timeout, version, tags)

    def delete_many(self, keys: Iterable[Any], version: Any = None) -> None:
        """Remove every key."""
        if self._raw:
            for key in keys:
                self._h.delete(self._k(key, version))
            return
        self._h.delete_many(keys, version)

    def clear(self) -> None:
        """Empty the whole store (every prefix and version sharing this LOCATION)."""
        self._h.clear()

    def close(self, **kwargs: Any) -> None:
        """Nothing to release: the store outlives requests (Django calls this on each one)."""

    # Beyond Django's API -------------------------------------------------------------------

    def invalidate_tags(self, tags: Iterable[str]) -> int:
        """Make every entry carrying any of ``tags`` a miss at once; returns how many it removed.

        Costs the number of tags plus the entries that carried them, never a scan of the store.
        Tags are namespaced by KEY_PREFIX, like keys.
        """
        tags = (tags,) if isinstance(tags, str) else tuple(tags)
        count = self._invalidate_tags(tags)
        logger.debug(
            "invalidated tags %s in %r: %d entries", ", ".join(tags), self._options.location, count
        )
        return count

    def _invalidate_tags(self, tags: tuple[str, ...]) -> int:
        """``invalidate_tags`` without its log line (model invalidation logs its own line)."""
        count = self._h.invalidate_tags(tags)
        tags_invalidated.send(sender=type(self), cache=self, tags=tags, count=count)
        return count

    def snapshot_tags(self, tags: Iterable[str]) -> Any:
        """Current versions of ``tags``; pass it as ``tags=`` to store only if none moved since."""
        return self._h.snapshot_tags(tags)

    def ttl(self, key: Any, version: Any = None) -> float | None:
        """Seconds left: None for no expiry, 0 for a missing or expired key (as django-redis)."""
        if self._raw:
            key = self.make_and_validate_key(key, version)
        return self._h.ttl(key, version)

    def iter_keys(self, pattern: str = "*", version: Any = None) -> Iterator[str]:
        """Yield the caller's keys (not made keys) matching the glob ``pattern``."""
        for key in self._h.keys(version):
            if fnmatch.fnmatchcase(key, pattern):
                yield key

    def keys(self, pattern: str = "*", version: Any = None) -> list[str]:
        """The caller's keys matching the glob ``pattern`` (see ``iter_keys``)."""
        return list(self.iter_keys(pattern, version))

    def delete_pattern(self, pattern: str, version: Any = None) -> int:
        """Delete every key matching the glob ``pattern`` (as django-redis); returns how many."""
        matched = self.keys(pattern, version)
        deleted = sum(self._h.delete(key, version) for key in matched)
        logger.debug("deleted pattern %r in %r: %d keys", pattern, self._options.location, deleted)
        return deleted

    def stats(self) -> dict[str, Any]:
        """Counters and sizes: hits, misses, sets, deletes, evictions, expirations, entries, ..."""
        return self._h.stats()

    def check(self, timeout: float = 2.0) -> dict[str, Any]:
        """Health, shaped as ``NearCache.check``'s: always ``ok`` (the store is this process's
        memory, nothing to reach); ``scope`` says it is this process's alone. ``timeout`` is
        accepted for the same signature."""
        return {
            "ok": True,
            "backend": "RustCache",
            "location": self._options.location,
            "error": None,
            "scope": "process",
            "entries": self._h.stats().get("entries"),
        }
