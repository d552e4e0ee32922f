"""``FillMixin``: ``get_or_set`` with single-flight, tag-guarded fills and XFetch early refresh.

Shared by ``RustCache`` and ``NearCache``. What a backend provides (its hooks):

- ``_h``: a ``_core.Handle`` on the backend's Rust store: ``fill`` (a ``_core.Fill`` guard: the
  key's single-flight, a placeholder that any removal or write of the key cancels, the tag
  versions; ended by ``put`` or by leaving its ``with`` block) and ``get_early``.
- ``_k(key, version)``: the key as ``_h`` wants it (the caller's key, or the made key).
- ``_direct``: True when ``get`` is the handle's own read, so the hit path may call ``_h.get``.
- ``_own_writes``: True when ``add``/``set`` are the handle's own, so a fill may store through
  ``Fill.put`` (which also records how long ``default()`` took, for early refresh).
- ``_options.stampede_wait`` and ``_options.early_refresh`` (seconds; XFetch beta, 0 = off).
- ``snapshot_tags(tags)``: the tag versions a fill is checked against (taken before computing).
- Django's ``get``, ``add`` and ``set``, which a fill falls back on otherwise.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from typing import Any

from django.core.cache.backends.base import DEFAULT_TIMEOUT

from django_rustcache.options import check_early_refresh

Tags = Iterable[str] | None


class FillMixin:
    """``get_or_set`` over the hooks listed in this module's docstring."""

    # Provided by the backend (see the module docstring); declared here for type checkers.
    _h: Any
    _options: Any
    _direct: bool = False
    _own_writes: bool = False
    _missing_key: Any
    get: Callable[..., Any]
    add: Callable[..., Any]
    set: Callable[..., Any]
    make_key: Callable[..., Any]

    def _k(self, key: Any, version: Any) -> Any:
        """The key as the handle wants it; backends override this."""
        raise NotImplementedError

    def get_or_set(
        self,
        key: Any,
        default: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: Any = None,
        tags: Tags = None,
        *,
        early_refresh: float | None = None,
    ) -> Any:
        """Return the value; on a miss store ``default`` (called if callable) and return it.

        When many threads miss the same key at once, one calls ``default`` and the others wait
        (without the GIL, at most ``OPTIONS["STAMPEDE_WAIT"]`` seconds) and then read its value;
        if it raised, each waiter calls ``default`` itself.

        With ``early_refresh`` (XFetch's beta; default ``OPTIONS["EARLY_REFRESH"]``, 0 = off) and
        a callable ``default``, a hit may be recomputed shortly before it expires by one caller
        (see ``_refresh_early``); everyone else keeps getting the cached value meanwhile.
        """
        val = self._get_or_refresh(key, default, timeout, version, tags, early_refresh)
        if val is not self._missing_key:
            return val
        if not callable(default):
            return self._fill(key, default, timeout, version, tags, replace=False)
        wait = self._options.stampede_wait
        # `_begin_fill`, inlined on this hot path (a miss of every cold key).
        fill = self._h.fill(
            self.make_key(key, version),
            wait if wait > 0 else None,
            False,
            tags if self._own_writes else None,
        )
        if fill is None:
            # Another thread's fill led the key and ended (or is too slow): its value, if any.
            val = self.get(key, self._missing_key, version=version)
            if val is not self._missing_key:
                return val
            fill = self._begin_fill(key, version, tags)  # compute here, without the flight
        # `with fill:` ends it too; `release()` is one call where `with` makes two. Ended here,
        # not when a traceback holding it is cleared: the callers waiting for the key wake now.
        try:
            return self._fill(key, default, timeout, version, tags, replace=False, fill=fill)
        finally:
            fill.release()

    def _begin_fill(
        self,
        key: Any,
        version: Any,
        tags: Tags,
        *,
        wait: float | None = None,
        exclusive: bool = False,
    ) -> Any:
        """``_h.fill`` for ``key``: a ``_core.Fill``, or None (see ``Handle.fill``).

        The fill takes the tag versions only when it is what stores (``_own_writes``); otherwise
        ``_fill`` snapshots them for the backend's own ``add``/``set``.
        """
        made = self.make_key(key, version)
        return self._h.fill(made, wait, exclusive, tags if self._own_writes else None)

    def _get_or_refresh(
        self,
        key: Any,
        default: Any,
        timeout: Any,
        version: Any,
        tags: Tags,
        early_refresh: float | None,
    ) -> Any:
        """``get_or_set``'s read: the cached (or early-refreshed) value, or ``_missing_key``."""
        if early_refresh is None:
            beta = self._options.early_refresh
        else:
            beta = check_early_refresh(early_refresh)
        if not beta or not callable(default):
            # The ordinary hit path. Reading through the handle (what `get` does) rather than
            # `self.get` saves about what looking up `beta` costs.
            if self._direct:
                return self._h.get(key, self._missing_key, version)
            return self.get(key, self._missing_key, version=version)
        # One uniform draw in (0, 1]; `_early_random` is injectable for seeded tests.
        val, refresh = self._h.get_early(
            self._k(key, version), self._missing_key, version, beta, 1.0 - self._early_random()
        )
        if refresh:
            return self._refresh_early(key, val, default, timeout, version, tags)
        return val

    #: Uniform random source in [0, 1) for early refresh; replace it on an instance to seed it.
    _early_random: Callable[[], float] = staticmethod(random.random)
    #: Clock (seconds) timing ``default()`` for early refresh; replaceable for tests.
    _early_clock: Callable[[], float] = staticmethod(time.perf_counter)

    def _refresh_early(
        self,
        key: Any,
        cached: Any,
        default: Callable[[], Any],
        timeout: Any,
        version: Any,
        tags: Tags,
    ) -> Any:
        """Recompute a live value before it expires, unless another caller already is.

        The refresher takes the key's single-flight without waiting; if someone holds it, the
        cached value is returned at once. The new value replaces the old one as ``set`` does (new
        timeout). If ``default()`` raises, the exception reaches this caller and the old value
        stays in place.
        """
        fill = self._begin_fill(key, version, tags, exclusive=True)
        if fill is None:
            return cached
        with fill:
            return self._fill(key, default, timeout, version, tags, replace=True, fill=fill)

    def _fill(
        self,
        key: Any,
        default: Any,
        timeout: Any,
        version: Any,
        tags: Tags,
        replace: bool,
        fill: Any = None,
    ) -> Any:
        """Compute ``default`` (timing it, for early refresh) and store it: ``add``, or ``set``.

        With the backend's own writes, a callable ``default``'s value is stored by ``fill`` (a
        ``_core.Fill`` begun before computing it: a removal or write of the key, or an
        invalidation of one of its tags, while ``default()`` runs makes it store nothing).
        """
        own = fill is not None and self._own_writes and callable(default)
        if tags is not None and not own:
            # Take the tag versions before computing: if one of the tags is invalidated while
            # `default()` runs, the value may be stale and storing it stores nothing.
            tags = self.snapshot_tags(tags)  # NearCache's versions live in Redis, not in _h
        if not callable(default):
            self.add(key, default, timeout=timeout, version=version, tags=tags)
        else:
            clock = self._early_clock
            start = clock()
            default = default()
            delta = clock() - start
            if own:
                fill.put(self._k(key, version), default, timeout, version, delta, replace)
            else:
                extra = {} if tags is None else {"tags": tags}
                store = self.set if replace else self.add
                store(key, default, timeout=timeout, version=version, **extra)
        # A racing caller may have added first: return what the cache holds now.
        return self.get(key, default, version=version)
