"""The async side of both backends.

``AsyncFillMixin``: the miss of an ``aget_or_set`` (single-flight, where a follower waits for
another thread's fill by polling between ``asyncio.sleep`` steps instead of blocking the loop).
Over ``FillMixin``'s hooks plus two async ones, ``_aread`` and ``_afill``.

``AsyncMixin``: the ``a*`` twins of a backend none of whose operations block (``RustCache``):
each runs the sync operation directly, no thread hop. A backend doing I/O (``NearCache``) must not
compose it: every twin it did not override would block the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from django.core.cache.backends.base import DEFAULT_TIMEOUT

from django_rustcache._fill import Tags

#: A follower's poll of a flight led by another thread: first and longest sleep (seconds).
_POLL_FIRST = 0.001
_POLL_MAX = 0.02


class AsyncFillMixin:
    """``aget_or_set``'s miss: lead the key's fill, or follow another thread's without blocking."""

    # Provided by the backend (see ``_fill.FillMixin``).
    _h: Any
    _options: Any
    _missing_key: Any
    get: Callable[..., Any]
    _fill: Callable[..., Any]
    _begin_fill: Callable[..., Any]

    async def _afill_missed(
        self, key: Any, default: Any, timeout: Any, version: Any, tags: Tags
    ) -> Any:
        """Fill a missed key (``_afill``), at most one thread of the process at a time.

        A miss of a key another thread is computing waits for that value as ``get_or_set`` does,
        at most ``STAMPEDE_WAIT`` seconds, but by polling the key's single-flight between
        ``asyncio.sleep`` steps (1 ms, doubling up to 20 ms) instead of blocking the thread.
        """
        wait = self._options.stampede_wait
        if not callable(default):
            return await self._afill(key, default, timeout, version, tags)
        if wait <= 0:
            with self._begin_fill(key, version, tags) as fill:
                return await self._afill(key, default, timeout, version, tags, fill)
        # `wait=0` joins the key's single-flight without waiting: a Fill if this caller leads.
        fill = self._begin_fill(key, version, tags, wait=0.0)
        if fill is None:
            # Another thread leads: wait for it, then read what it stored.
            fill = await self._follow(key, version, tags, wait)
            with fill if fill is not None else contextlib.nullcontext():
                val = await self._aread(key, version)
                if val is not self._missing_key:
                    return val
                if fill is not None:
                    return await self._afill(key, default, timeout, version, tags, fill)
            # The leader is too slow: compute here, without the flight, as get_or_set does.
            fill = self._begin_fill(key, version, tags)
        with fill:
            return await self._afill(key, default, timeout, version, tags, fill)

    async def _aread(self, key: Any, version: Any) -> Any:
        """The cached value or ``_missing_key`` (here: the sync ``get``, which never blocks)."""
        return self.get(key, self._missing_key, version=version)

    async def _afill(
        self, key: Any, default: Any, timeout: Any, version: Any, tags: Tags, fill: Any = None
    ) -> Any:
        """Compute and ``add`` ``default`` through ``fill``; what the cache holds then
        (``FillMixin._fill``)."""
        return self._fill(key, default, timeout, version, tags, replace=False, fill=fill)

    async def _follow(self, key: Any, version: Any, tags: Tags, wait: float) -> Any:
        """Await the end of another thread's fill of ``key`` without blocking the loop: a
        ``_core.Fill`` once this caller leads the key (the other one ended), None if ``wait``
        passed first. Holds nothing while it sleeps, so cancelling it leaves no flight behind."""
        deadline = time.monotonic() + wait
        step = _POLL_FIRST
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            await asyncio.sleep(min(step, left))
            step = min(step * 2, _POLL_MAX)
            fill = self._begin_fill(key, version, tags, wait=0.0)
            if fill is not None:
                return fill


class AsyncMixin(AsyncFillMixin):
    """The ``a*`` twins for a backend whose operations never block: each runs the sync one."""

    _get_or_refresh: Callable[..., Any]
    add: Callable[..., Any]
    set: Callable[..., Any]
    touch: Callable[..., Any]
    delete: Callable[..., Any]
    has_key: Callable[..., Any]
    incr: Callable[..., Any]
    get_many: Callable[..., Any]
    set_many: Callable[..., Any]
    delete_many: Callable[..., Any]
    incr_version: Callable[..., Any]
    decr_version: Callable[..., Any]
    invalidate_tags: Callable[..., Any]
    delete_pattern: Callable[..., Any]
    ttl: Callable[..., Any]
    clear: Callable[..., Any]
    close: Callable[..., Any]

    async def aadd(
        self,
        key: Any,
        value: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: Any = None,
        tags: Tags = None,
    ) -> bool:
        return self.add(key, value, timeout, version, tags)

    async def aget(self, key: Any, default: Any = None, version: Any = None) -> Any:
        return self.get(key, default, version)

    async def aset(
        self,
        key: Any,
        value: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: Any = None,
        tags: Tags = None,
    ) -> None:
        self.set(key, value, timeout, version, tags)

    async def atouch(self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: Any = None) -> bool:
        return self.touch(key, timeout, version)

    async def adelete(self, key: Any, version: Any = None) -> bool:
        return self.delete(key, version)

    async def ahas_key(self, key: Any, version: Any = None) -> bool:
        return self.has_key(key, version)

    async def aincr(self, key: Any, delta: Any = 1, version: Any = None) -> Any:
        try:
            return self.incr(key, delta, version)
        except ValueError:
            # Django's BaseCache.aincr names the caller's key, not the made key, when it is missing.
            raise ValueError(f"Key '{key}' not found") from None

    async def adecr(self, key: Any, delta: Any = 1, version: Any = None) -> Any:
        return await self.aincr(key, -delta, version)

    async def aget_many(self, keys: Iterable[Any], version: Any = None) -> dict[Any, Any]:
        return self.get_many(keys, version)

    async def aset_many(
        self,
        data: Mapping[Any, Any],
        timeout: Any = DEFAULT_TIMEOUT,
        version: Any = None,
        tags: Tags = None,
    ) -> list[Any]:
        return self.set_many(data, timeout, version, tags)

    async def adelete_many(self, keys: Iterable[Any], version: Any = None) -> None:
        self.delete_many(keys, version)

    async def aget_or_set(
        self,
        key: Any,
        default: Any | Callable[[], Any],
        timeout: Any = DEFAULT_TIMEOUT,
        version: Any = None,
        tags: Tags = None,
        *,
        early_refresh: float | None = None,
    ) -> Any:
        """``get_or_set`` that never blocks the event loop.

        A miss of a key another thread is computing waits for that value as ``get_or_set`` does
        (see ``AsyncFillMixin._afill_missed``), polling instead of blocking the thread.
        Like Django's, it calls ``default`` directly (a ``default`` that blocks, blocks the loop).
        """
        val = self._get_or_refresh(key, default, timeout, version, tags, early_refresh)
        if val is not self._missing_key:
            return val
        return await self._afill_missed(key, default, timeout, version, tags)

    async def aincr_version(self, key: Any, delta: int = 1, version: Any = None) -> int:
        return self.incr_version(key, delta, version)

    async def adecr_version(self, key: Any, delta: int = 1, version: Any = None) -> int:
        return self.decr_version(key, delta, version)

    async def ainvalidate_tags(self, tags: Iterable[str]) -> int:
        return self.invalidate_tags(tags)

    async def adelete_pattern(self, pattern: str, version: Any = None) -> int:
        return self.delete_pattern(pattern, version)

    async def attl(self, key: Any, version: Any = None) -> float | None:
        return self.ttl(key, version)

    async def aclear(self) -> None:
        self.clear()

    async def aclose(self, **kwargs: Any) -> None:
        self.close(**kwargs)
