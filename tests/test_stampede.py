"""Stampede protection: concurrent misses of one key compute the value once; failures and slow
leaders never leave anyone waiting forever."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from django_rustcache import RustCache
from tests.threads import run_threads


def make(**options: Any) -> RustCache:
    return RustCache(f"stampede-{uuid.uuid4().hex}", {"OPTIONS": options})


def test_32_threads_missing_one_key_compute_it_once():
    c = make()
    calls = []

    def slow() -> dict[str, int]:
        calls.append(threading.get_ident())
        time.sleep(0.3)
        return {"value": 42}

    results = run_threads(32, lambda: c.get_or_set("hot", slow, timeout=60))
    assert len(calls) == 1
    assert results == [("ok", {"value": 42})] * 32


def test_a_raising_computation_hangs_nobody():
    c = make(STAMPEDE_WAIT=30)
    calls = []

    def boom() -> Any:
        calls.append(1)
        time.sleep(0.05)
        raise RuntimeError("backend down")

    started = time.monotonic()
    results = run_threads(16, lambda: c.get_or_set("hot", boom))
    assert time.monotonic() - started < 10
    assert all(kind == "error" and isinstance(exc, RuntimeError) for kind, exc in results)
    assert 1 <= len(calls) <= 16
    assert c.get_or_set("hot", lambda: "recovered") == "recovered"


def test_wait_is_bounded_by_stampede_wait():
    c = make(STAMPEDE_WAIT=0.2)
    leader_in = threading.Event()
    release = threading.Event()

    def leader_value() -> str:
        leader_in.set()
        release.wait(10)
        return "leader"

    leader = threading.Thread(target=lambda: c.get_or_set("k", leader_value))
    leader.start()
    assert leader_in.wait(5)
    started = time.monotonic()
    assert c.get_or_set("k", lambda: "follower") == "follower"
    assert 0.15 < time.monotonic() - started < 5
    release.set()
    leader.join(5)
    assert c.get("k") == "follower"  # the follower's add won; the leader's add found it


def test_recursive_get_or_set_of_the_same_key_does_not_wait_on_itself():
    c = make(STAMPEDE_WAIT=5)
    started = time.monotonic()
    assert c.get_or_set("k", lambda: c.get_or_set("k", "inner")) == "inner"
    assert time.monotonic() - started < 1


def test_stampede_wait_zero_disables_single_flight_and_bad_values_are_refused():
    c = make(STAMPEDE_WAIT=0)
    inner = []
    # Without single-flight a nested fill of the same key from another thread does not wait.
    value = c.get_or_set(
        "k", lambda: run_threads(1, lambda: inner.append(c.get_or_set("k", "other")))[0][1] or 1
    )
    assert inner == ["other"] and value == "other"
    with pytest.raises(ImproperlyConfigured, match="STAMPEDE_WAIT"):
        make(STAMPEDE_WAIT=-1)
    with pytest.raises(ImproperlyConfigured, match="STAMPEDE_WAIT"):
        make(STAMPEDE_WAIT="5")


@pytest.mark.parametrize("early", [0.0, 1.0])
def test_keys_with_lone_surrogates_take_the_flight_too(early: float):
    """A key Python can make but UTF-8 cannot encode still gets single-flight and early refresh."""
    c = make(EARLY_REFRESH=early)
    key = "lone\udcffsurrogate"
    results = run_threads(8, lambda: c.get_or_set(key, lambda: time.sleep(0.05) or 7))
    assert results == [("ok", 7)] * 8
    assert c.get_or_set(key, lambda: 8) == 7
    c.delete(key)
    with pytest.raises(ZeroDivisionError):
        c.get_or_set(key, lambda: 1 / 0)
    assert not c.has_key(key)
