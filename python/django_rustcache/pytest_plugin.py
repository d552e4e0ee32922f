"""pytest plugin (registered through the ``pytest11`` entry point).

* ``rustcache``: the ``default`` RustCache (or ``@pytest.mark.rustcache(alias="other")``),
  emptied before and after the test.
* ``assert_invalidates(tags=..., keys=..., cache="default")``: a context manager failing the test
  unless the block invalidated every tag and removed every key (keys must be cached on entry).

Django is imported only inside the fixtures, so projects without Django settings are unaffected.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "rustcache(alias='default'): the cache alias the rustcache fixture empties"
    )


def _rust_cache(alias: str) -> Any:
    """The RustCache for ``alias``; skips the test when Django is not configured."""
    from django.conf import settings

    if not settings.configured:
        pytest.skip("the rustcache fixture needs Django settings (DJANGO_SETTINGS_MODULE)")
    from django.core.cache import caches

    from django_rustcache import RustCache

    cache = caches[alias]
    if not isinstance(cache, RustCache):
        pytest.fail(f"CACHES[{alias!r}] is {type(cache).__name__}, not django_rustcache.RustCache")
    return cache


@pytest.fixture
def rustcache(request: pytest.FixtureRequest) -> Iterator[Any]:
    """An empty RustCache (``default`` unless marked), cleared again after the test."""
    marker = request.node.get_closest_marker("rustcache")
    cache = _rust_cache(marker.kwargs.get("alias", "default") if marker else "default")
    cache.clear()
    yield cache
    cache.clear()


@dataclass
class Invalidations:
    """What a block invalidated: the tags passed to ``invalidate_tags`` on the watched cache."""

    tags: list[str] = field(default_factory=list)


def _same_store(a: Any, b: Any) -> bool:
    """Whether two backend instances (one per thread) share a store and a key prefix."""
    if a is b:
        return True
    return a.stats()["location"] == b.stats()["location"] and a.key_prefix == b.key_prefix


@contextmanager
def assert_invalidates(
    tags: Iterable[str] = (), keys: Iterable[Any] = (), cache: str = "default"
) -> Iterator[Invalidations]:
    """Fail unless the block invalidated each of ``tags`` and removed each of ``keys``.

    A key must be cached when the block starts (otherwise its absence proves nothing) and missing
    when it ends. Yields an ``Invalidations`` record of every tag invalidated on ``cache``.
    """
    from django_rustcache.signals import tags_invalidated

    store = _rust_cache(cache)
    tags, keys = list(tags), list(keys)
    absent = [key for key in keys if not store.has_key(key)]
    if absent:
        pytest.fail(f"assert_invalidates: keys not cached before the block: {absent}")
    record = Invalidations()

    def receiver(sender: type, **kwargs: Any) -> None:
        if _same_store(kwargs["cache"], store):
            record.tags.extend(kwargs["tags"])

    tags_invalidated.connect(receiver, weak=False)
    try:
        yield record
    finally:
        tags_invalidated.disconnect(receiver)
    missed = [tag for tag in tags if tag not in record.tags]
    kept = [key for key in keys if store.has_key(key)]
    if missed or kept:
        pytest.fail(
            "assert_invalidates: "
            + (f"tags not invalidated: {missed} (invalidated: {record.tags}) " if missed else "")
            + (f"keys still cached: {kept}" if kept else "")
        )


@pytest.fixture(name="assert_invalidates")
def assert_invalidates_fixture() -> Callable[..., Any]:
    """The ``assert_invalidates`` context manager, as a fixture."""
    return assert_invalidates
