"""``RustCache.get``/``set`` are the Rust handle's methods themselves on an instance with Django's
key function (no Python frame per call). Every way Django's tests and users replace or extend a
method must still work: mocks on the instance or the class, subclasses, a custom key function."""

from __future__ import annotations

import asyncio
import inspect
import uuid
from typing import Any
from unittest import mock

import pytest
from django.core.cache.backends.base import DEFAULT_TIMEOUT

from django_rustcache import RustCache
from django_rustcache._core import FastMethod


def make(cls: type[RustCache] = RustCache, **params: Any) -> RustCache:
    return cls(f"fast-{uuid.uuid4().hex}", params)


def test_get_and_set_keep_djangos_signature_and_results():
    c = make(TIMEOUT=60)
    assert c.set("k", {"a": 1}) is None
    assert c.set("k2", 2, 10, None) is None
    assert c.set(key="k3", value=3, timeout=None, version=2) is None
    assert c.get("k") == {"a": 1} and c.get(key="k2") == 2
    assert c.get("k3") is None and c.get("k3", version=2) == 3
    marker = object()
    assert c.get("missing", marker) is marker and c.get("missing", default=marker) is marker
    # Omitted timeout and DEFAULT_TIMEOUT both mean the backend's TIMEOUT; None means forever.
    assert 55 < c.ttl("k") <= 60
    c.set("d", 1, DEFAULT_TIMEOUT)
    assert 55 < c.ttl("d") <= 60
    assert c.ttl("k3", version=2) is None
    c.set("gone", 1, 0)
    assert not c.has_key("gone")


def test_class_attribute_is_the_python_function():
    assert inspect.isfunction(RustCache.get) and inspect.isfunction(RustCache.set)
    assert RustCache.get.__name__ == "get"
    assert "default" in inspect.signature(RustCache.get).parameters
    assert isinstance(RustCache.__dict__["get"], FastMethod)
    assert RustCache.__dict__["set"].__wrapped__ is RustCache.set


def test_mocking_the_instance_or_the_class_still_applies():
    c = make()
    c.set("k", "real")
    with mock.patch.object(c, "get", return_value="instance mock"):
        assert c.get("k") == "instance mock"
    assert c.get("k") == "real"
    with mock.patch.object(RustCache, "get", return_value="class mock"):
        assert c.get("k") == "class mock"
    assert c.get("k") == "real"
    assert isinstance(RustCache.__dict__["get"], FastMethod)  # restored as it was
    with mock.patch("django_rustcache.RustCache.set") as fake_set:
        c.set("k", "other")
        fake_set.assert_called_once_with("k", "other")
    assert c.get("k") == "real"


def test_subclass_overrides_and_super_calls_work():
    calls = []

    class Logged(RustCache):
        def get(self, key: Any, default: Any = None, version: Any = None) -> Any:
            calls.append(("get", key))
            return super().get(key, default, version)

        def set(self, key: Any, value: Any, *args: Any, **kwargs: Any) -> None:
            calls.append(("set", key))
            super().set(key, value, *args, **kwargs)

    c = make(Logged)
    c.set("k", [1])
    assert c.get("k") == [1]
    assert asyncio.run(c.aget("k")) == [1]
    asyncio.run(c.aset("k", [2]))
    assert calls == [("set", "k"), ("get", "k"), ("get", "k"), ("set", "k")]


def test_custom_key_function_switches_to_the_python_methods_and_back():
    c = make()
    c.set("k", "plain")
    c.key_func = lambda key, prefix, version: f"custom-{key}"
    assert c.get("k") is None  # a different made key
    c.set("k", "custom")
    assert c.get("k") == "custom"
    assert "_fast_get" not in vars(c)
    from django.core.cache.backends.base import default_key_func

    c.key_func = default_key_func
    assert c.get("k") == "plain"
    assert vars(c)["_fast_get"] is not None


def test_overridden_make_key_is_honoured():
    class Upper(RustCache):
        def make_key(self, key: Any, version: Any = None) -> str:
            return super().make_key(str(key).upper(), version)

    c = make(Upper)
    c.set("k", 1)
    assert c.get("K") == 1 and c.get("k") == 1
    assert "_fast_get" not in vars(c) and "_fast_set" not in vars(c)


def test_fast_method_rejects_a_non_callable():
    with pytest.raises(TypeError, match="function"):
        FastMethod(42, "_slot")


@pytest.mark.parametrize("early_refresh", [0.0, 1e9])
def test_get_or_set_goes_through_a_subclass_get_and_add(early_refresh: float):
    """get_or_set reads and stores through the handle only when get/add/set are RustCache's."""
    calls = []

    class Logged(RustCache):
        def get(self, key: Any, default: Any = None, version: Any = None) -> Any:
            calls.append("get")
            return super().get(key, default, version)

        def add(self, key: Any, value: Any, *args: Any, **kwargs: Any) -> bool:
            calls.append("add")
            return super().add(key, value, *args, **kwargs)

    c = make(Logged)
    assert c.get_or_set("k", lambda: 5, early_refresh=early_refresh) == 5
    assert "add" in calls and "get" in calls
    calls.clear()
    assert c.get_or_set("k", lambda: 6) == 5
    assert calls == ["get"]
    assert make().get_or_set("k", lambda: 7) == 7  # RustCache itself: the direct path
