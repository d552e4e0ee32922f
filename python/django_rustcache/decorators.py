"""``@cached`` for functions and methods, and ``cache_page_tagged`` for views.

Both take tags and guard their fills: the tags' versions are read before computing, so a value
whose computation overlapped an invalidation of one of its tags is returned but never stored.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import threading
from collections.abc import Callable, Iterable
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

from django.core.cache import caches
from django.core.cache.backends.base import DEFAULT_TIMEOUT
from django.db.models import Model
from django.middleware.cache import CacheMiddleware
from django.utils.decorators import decorator_from_middleware_with_args

#: A tag or key: a ``str.format`` template over the arguments (``"shop.product:{pk}"``), or a
#: callable of the arguments returning a string, an iterable of strings or None.
Spec = str | Callable[..., Any]
_MISSING = object()
_PLAIN = (str, int, float, bool, bytes, Decimal, date, datetime, time, timedelta, UUID)


def _as_specs(value: Spec | Iterable[Spec] | None) -> tuple[Spec, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) or callable(value) else tuple(value)


def _expand(specs: Iterable[Spec], call: tuple[tuple, dict], fmt: tuple[tuple, dict]) -> list[str]:
    """Tags from specs: callables get ``call``'s arguments, templates are formatted with ``fmt``."""
    out: list[str] = []
    for spec in specs:
        value = spec(*call[0], **call[1]) if callable(spec) else spec.format(*fmt[0], **fmt[1])
        if value is not None:
            out.extend([value] if isinstance(value, str) else value)
    return list(dict.fromkeys(out))


def _type_name(value: Any) -> str:
    return f"{type(value).__module__}.{type(value).__qualname__}"


def _key_part(value: Any) -> Any:
    """A stable, repr-able stand-in for an argument; TypeError if it has no stable identity.

    Plain values stand for themselves; anything else becomes a tuple led by its kind and type
    (a list, a tuple of the same items and an object whose repr is some str argument's text all
    differ), so that distinct arguments give distinct keys.
    """
    if value is None or isinstance(value, _PLAIN):
        return value
    if isinstance(value, Model):
        if value.pk is None:
            raise TypeError(f"cannot build a cache key from unsaved {value!r}; pass key=")
        return ("model", value._meta.label_lower, value.pk)
    if isinstance(value, dict):
        items = sorted(((repr(_key_part(k)), _key_part(v)) for k, v in value.items()), key=_first)
        return ("dict", _type_name(value), tuple(items))
    if isinstance(value, (set, frozenset)):
        return ("set", _type_name(value), tuple(sorted(repr(_key_part(v)) for v in value)))
    if isinstance(value, (list, tuple)):
        return ("seq", _type_name(value), tuple(_key_part(v) for v in value))
    if type(value).__repr__ is object.__repr__:
        raise TypeError(
            f"cannot build a cache key from {type(value).__name__!r} (its repr is its address); "
            "give it a __repr__ or pass key="
        )
    return ("repr", _type_name(value), repr(value))


def _first(pair: tuple[str, Any]) -> str:
    return pair[0]


#: How many ``@cached`` functions have been made under each qualified name: a later one (a
#: closure made again by its factory, a method of a class made in a function) gets a numbered
#: name, so that two functions never share results.
_names: dict[str, int] = {}
_names_lock = threading.Lock()


def _unique_name(fn: Callable[..., Any]) -> str:
    name = f"{fn.__module__}.{fn.__qualname__}"
    with _names_lock:
        seen = _names.get(name, 0)
        _names[name] = seen + 1
    return name if seen == 0 else f"{name}#{seen + 1}"


class CachedFunction:
    """A function whose results are cached under a key built from its arguments.

    Made by ``@cached``; ``fn.invalidate(*args)`` drops one result, ``fn.cache_key(*args)``
    names it. On a method, ``obj.method.invalidate()`` works the same (``self`` is an argument).
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        timeout: Any,
        tags: tuple[Spec, ...],
        key: Spec | None,
        cache: str,
    ) -> None:
        if inspect.iscoroutinefunction(inspect.unwrap(fn)):
            # Its "result" would be a coroutine object: never run, and not picklable.
            raise TypeError(
                f"@cached cannot cache the async function {fn.__qualname__!r}: cache what it "
                "awaits in a sync function, or use cache.aget_or_set in it"
            )
        functools.update_wrapper(self, fn)
        self.fn, self.timeout, self.tags, self.key, self.cache_alias = fn, timeout, tags, key, cache
        self._signature = inspect.signature(fn)
        self._name = _unique_name(fn)

    def _bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return bound.arguments

    def cache_key(self, *args: Any, **kwargs: Any) -> str:
        """The key a call with these arguments is cached under."""
        named = self._bind(args, kwargs)
        if callable(self.key):
            return self.key(*args, **kwargs)
        if self.key is not None:
            return self.key.format(*args, **named)
        parts = repr(tuple(_key_part(v) for v in named.values())).encode()
        return f"cached:{self._name}:{hashlib.blake2b(parts, digest_size=16).hexdigest()}"

    def tags_for(self, *args: Any, **kwargs: Any) -> list[str]:
        """The tags a call with these arguments is stored with."""
        return _expand(self.tags, (args, kwargs), (args, self._bind(args, kwargs)))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        cache = caches[self.cache_alias]
        key = self.cache_key(*args, **kwargs)
        value = cache.get(key, _MISSING)
        if value is not _MISSING:
            return value
        # get_or_set snapshots the tags before computing (the race guard) and, on RustCache,
        # lets one caller compute while concurrent callers of the same key wait for its value.
        fill = functools.partial(self.fn, *args, **kwargs)
        tags = self.tags_for(*args, **kwargs)
        if tags:
            return cache.get_or_set(key, fill, self.timeout, tags=tags)
        return cache.get_or_set(key, fill, self.timeout)

    def invalidate(self, *args: Any, **kwargs: Any) -> bool:
        """Drop the result cached for these arguments; True if there was one."""
        return caches[self.cache_alias].delete(self.cache_key(*args, **kwargs))

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        return self if obj is None else _BoundCached(self, obj)


class _BoundCached:
    """``obj.method`` for a cached method: calls, keys and invalidations get ``obj`` first."""

    def __init__(self, cached: CachedFunction, obj: Any) -> None:
        self._cached, self._obj = cached, obj
        self.__wrapped__ = cached.fn.__get__(obj)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._cached(self._obj, *args, **kwargs)

    def invalidate(self, *args: Any, **kwargs: Any) -> bool:
        return self._cached.invalidate(self._obj, *args, **kwargs)

    def cache_key(self, *args: Any, **kwargs: Any) -> str:
        return self._cached.cache_key(self._obj, *args, **kwargs)

    def tags_for(self, *args: Any, **kwargs: Any) -> list[str]:
        return self._cached.tags_for(self._obj, *args, **kwargs)


def cached(
    timeout: Any = DEFAULT_TIMEOUT,
    *,
    tags: Spec | Iterable[Spec] | None = None,
    key: Spec | None = None,
    cache: str = "default",
) -> Any:
    """Cache a function's or method's results, by default under its qualified name and arguments.

    ``tags`` and ``key`` are ``str.format`` templates over the arguments (``"shop.product:{pk}"``)
    or callables of them. Usable bare (``@cached``) or with arguments (``@cached(60, tags=...)``).
    Arguments in a default key must be plain values, model instances (by pk) or have a ``repr``.
    """
    if callable(timeout):
        return CachedFunction(timeout, DEFAULT_TIMEOUT, (), None, cache)

    def decorate(fn: Callable[..., Any]) -> CachedFunction:
        return CachedFunction(fn, timeout, _as_specs(tags), key, cache)

    return decorate


class _TaggedCache:
    """A cache whose ``set`` stores with a tag snapshot; everything else is the cache itself."""

    def __init__(self, cache: Any, snapshot: Any) -> None:
        self._cache, self._snapshot = cache, snapshot

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)

    def set(
        self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: Any = None
    ) -> None:
        self._cache.set(key, value, timeout, version, tags=self._snapshot)


class TaggedCacheMiddleware(CacheMiddleware):
    """Django's ``CacheMiddleware`` storing pages (and their header lists) with tags.

    The tags are resolved from the view's arguments and snapshotted before the view runs, so a
    page rendered while one of its tags was invalidated is served but not stored.
    """

    def __init__(self, get_response: Callable, tags: Iterable[Spec] = (), **kwargs: Any) -> None:
        super().__init__(get_response, **kwargs)
        self.tags = _as_specs(tags)
        self._snapshot: Any = None

    @property
    def cache(self) -> Any:
        cache = caches[self.cache_alias]
        return cache if self._snapshot is None else _TaggedCache(cache, self._snapshot)

    def process_view(self, request: Any, view_func: Callable, args: tuple, kwargs: dict) -> None:
        tags = _expand(self.tags, ((request, *args), kwargs), (args, kwargs))
        request._rustcache_page_snapshot = caches[self.cache_alias].snapshot_tags(tags)

    def process_response(self, request: Any, response: Any) -> Any:
        snapshot = getattr(request, "_rustcache_page_snapshot", None)
        if snapshot is None:
            return response  # the view's tags are unknown: do not store an untagged page
        # A per-request copy: the middleware instance is shared by every request to the view.
        tagged = copy.copy(self)
        tagged._snapshot = snapshot
        return CacheMiddleware.process_response(tagged, request, response)


def cache_page_tagged(
    timeout: Any,
    *,
    tags: Spec | Iterable[Spec] = (),
    cache: str | None = None,
    key_prefix: str | None = None,
) -> Callable:
    """Django's ``cache_page`` plus tags: templates over the view's URL arguments
    (``"shop.product:{pk}"``) or callables of ``(request, *args, **kwargs)``.
    """
    return decorator_from_middleware_with_args(TaggedCacheMiddleware)(
        page_timeout=timeout, cache_alias=cache, key_prefix=key_prefix, tags=tags
    )
