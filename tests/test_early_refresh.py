"""Probabilistic early refresh (XFetch) in ``get_or_set``: a hit is recomputed by one caller
shortly before it expires, with probability ``exp(-t / (delta * beta))`` at time ``t`` left."""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import threading
import time
import uuid
from fractions import Fraction
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from django_rustcache import RustCache
from tests.threads import run_threads

#: `_early_random` returning this gives the draw u = 2**-53, so -ln(u) = 36.7: with a recorded
#: compute time of 10 s and beta 1, any entry with less than 367 s left is refreshed.
ALMOST_ONE = 1.0 - 2**-53


def make(location: str | None = None, **options: Any) -> RustCache:
    return RustCache(location or f"early-{uuid.uuid4().hex}", {"OPTIONS": options})


def fake_timing(c: RustCache, delta: float) -> None:
    """Make every computation of ``default()`` measure exactly ``delta`` seconds."""
    c._early_clock = itertools.count(0.0, delta).__next__


def counter() -> tuple[list[int], Any]:
    calls: list[int] = []

    def compute() -> int:
        calls.append(1)
        return len(calls)

    return calls, compute


@pytest.mark.parametrize("left", [2.0, 10.0, 20.0, 40.0])
def test_refresh_rate_matches_the_xfetch_model(left: float) -> None:
    """At time ``left`` before expiry a fraction exp(-left / (delta*beta)) of callers refresh.

    Each refresh stores the value again with the same timeout, so every call sees (within
    microseconds) the same time left. With delta=10 s and beta=2 the expected fractions are
    0.905, 0.607, 0.368 and 0.135: ignoring beta (0.819, 0.368, 0.135, 0.018), flipping the
    sign of ln (0) or inverting the draw's use would each miss by dozens of standard deviations.
    """
    delta, beta, n = 10.0, 2.0, 3000
    c = make()
    fake_timing(c, delta)
    c._early_random = random.Random(f"xfetch-{left}").random
    calls, compute = counter()
    assert c.get_or_set("hot", compute, timeout=left, early_refresh=beta) == 1  # the first fill
    for _ in range(n):
        c.get_or_set("hot", compute, timeout=left, early_refresh=beta)
    refreshed = len(calls) - 1
    p = math.exp(-left / (delta * beta))
    expected, sd = n * p, math.sqrt(n * p * (1 - p))
    assert abs(refreshed - expected) <= 4 * sd, (refreshed, expected, sd)
    assert c.get("hot") == len(calls)  # the latest computation is what the cache holds


def test_a_refresh_replaces_the_value_with_a_new_timeout() -> None:
    c = make(EARLY_REFRESH=1.0)
    fake_timing(c, 10.0)
    c._early_random = lambda: 0.0  # u = 1: never early
    assert c.get_or_set("k", lambda: "old", timeout=60) == "old"
    assert c.get_or_set("k", lambda: "new", timeout=60) == "old"
    c._early_random = lambda: ALMOST_ONE  # refresh window 367 s > 60 s left
    assert c.get_or_set("k", lambda: "new", timeout=600) == "new"
    assert c.get("k") == "new"
    ttl = c.ttl("k")
    assert ttl is not None and ttl > 590  # `set` semantics: the refresh's timeout applies
    # 600 s left is outside the 367 s window: the same draw no longer refreshes.
    assert c.get_or_set("k", lambda: "newer", timeout=600) == "new"


def test_beta_zero_and_entries_without_delta_or_expiry_never_refresh_early() -> None:
    calls, compute = counter()
    # Off by default: OPTIONS without EARLY_REFRESH, even with the most eager draw.
    c = make()
    fake_timing(c, 10.0)
    c._early_random = lambda: ALMOST_ONE
    assert c.get_or_set("k", compute, timeout=60) == 1
    for _ in range(100):
        assert c.get_or_set("k", compute, timeout=60) == 1
    # A per-call 0 overrides OPTIONS.
    on = make(EARLY_REFRESH=5.0)
    fake_timing(on, 10.0)
    on._early_random = lambda: ALMOST_ONE
    on.set("k", "v", 60)
    assert on.get_or_set("k", compute, timeout=60, early_refresh=0) == "v"
    # Stored by `set`: no compute time recorded, so never refreshed early.
    assert on.get_or_set("k", compute, timeout=60) == "v"
    # No expiry: nothing to refresh ahead of.
    assert on.get_or_set("forever", lambda: "f", timeout=None) == "f"
    assert on.get_or_set("forever", compute, timeout=None) == "f"
    # A non-callable default cannot be recomputed.
    assert on.get_or_set("plain", "p", timeout=60) == "p"
    assert on.get_or_set("plain", "q", timeout=60) == "p"
    assert len(calls) == 1
    # The compute time is recorded even while early refresh is off, so a per-call beta works.
    assert c.get_or_set("k", compute, timeout=60, early_refresh=1) == 2


def test_hot_key_near_expiry_is_refreshed_by_few_callers_and_never_missed() -> None:
    """Eight threads hammer a 2 s key for 4 s. Each computation is recorded as taking 100 ms (the
    real one sleeps 10 ms; a fixed figure keeps GIL hand-off delays out of the model): at call
    rates from 100/s (a loaded machine) to 5000/s, the first refresh comes 0.23-0.6 s before
    expiry, a wide margin against a thread stalled by the scheduler."""
    location = f"early-{uuid.uuid4().hex}"
    computations: list[float] = []
    lock = threading.Lock()

    def compute() -> int:
        time.sleep(0.01)
        with lock:
            computations.append(time.monotonic())
            return len(computations)

    def instance() -> RustCache:
        c = make(location, EARLY_REFRESH=1.0)  # Django gives each thread its own instance
        fake_timing(c, 0.1)
        return c

    first = instance()
    assert first.get_or_set("hot", compute, timeout=2.0) == 1
    misses = first.stats()["misses"]
    stop = time.monotonic() + 4.0

    def hammer() -> int:
        c = instance()
        n = 0
        while time.monotonic() < stop:
            value = c.get_or_set("hot", compute, timeout=2.0)
            assert isinstance(value, int) and value >= 1
            n += 1
        return n

    results = run_threads(8, hammer)
    assert all(kind == "ok" for kind, _ in results), results
    callers = sum(n for _, n in results)
    refreshes = len(computations) - 1
    # The 2 s value lived through 4 s of traffic: it was refreshed, about once per lifetime ...
    assert 1 <= refreshes <= 12, refreshes
    assert callers >= 20 * len(computations), (callers, len(computations))
    # ... always before it expired: no caller ever missed.
    assert first.stats()["misses"] == misses


def test_only_one_caller_refreshes_and_the_others_get_the_cached_value_at_once() -> None:
    location = f"early-{uuid.uuid4().hex}"
    c = make(location, EARLY_REFRESH=1.0, STAMPEDE_WAIT=30)
    fake_timing(c, 10.0)
    assert c.get_or_set("k", lambda: "old", timeout=60) == "old"
    inside, release = threading.Event(), threading.Event()

    def slow_refresh() -> str:
        inside.set()
        release.wait(10)
        return "new"

    def refresher() -> None:
        r = make(location, EARLY_REFRESH=1.0)
        r._early_random = lambda: ALMOST_ONE
        r.get_or_set("k", slow_refresh, timeout=60)

    t = threading.Thread(target=refresher)
    t.start()
    try:
        assert inside.wait(5)
        others, compute = counter()
        c._early_random = lambda: ALMOST_ONE  # they would refresh too, but the flight is taken
        started = time.monotonic()
        results = run_threads(8, lambda: c.get_or_set("k", compute, timeout=60))
        assert time.monotonic() - started < 5  # nobody waited for the 10 s refresh
        assert results == [("ok", "old")] * 8 and others == []
    finally:
        release.set()
        t.join(10)
    assert c.get("k") == "new"


def test_a_raising_early_refresh_keeps_the_old_value_and_hangs_nobody() -> None:
    c = make(EARLY_REFRESH=1.0, STAMPEDE_WAIT=30)
    fake_timing(c, 10.0)
    assert c.get_or_set("k", lambda: "old", timeout=60) == "old"
    c._early_random = lambda: ALMOST_ONE

    def boom() -> str:
        raise RuntimeError("backend down")

    started = time.monotonic()
    with pytest.raises(RuntimeError, match="backend down"):
        c.get_or_set("k", boom, timeout=60)
    assert c.get("k") == "old"
    ttl = c.ttl("k")
    assert ttl is not None and 55 < ttl <= 60  # untouched: neither removed nor re-timed
    # The flight was released: another thread refreshes at once instead of being turned away
    # (it would get "old") or waiting.
    other = make(c._h.location, EARLY_REFRESH=1.0)
    other._early_random = lambda: ALMOST_ONE
    assert run_threads(1, lambda: other.get_or_set("k", lambda: "new", timeout=60)) == [
        ("ok", "new")
    ]
    assert time.monotonic() - started < 5


def test_a_refresh_that_reads_its_own_key_gets_the_cached_value() -> None:
    c = make(EARLY_REFRESH=1.0, STAMPEDE_WAIT=30)
    fake_timing(c, 10.0)
    assert c.get_or_set("k", lambda: "old", timeout=60) == "old"
    c._early_random = lambda: ALMOST_ONE  # every read would refresh
    inner: list[Any] = []

    def recompute() -> str:
        inner.append(c.get_or_set("k", recompute, timeout=60))
        return "new"

    started = time.monotonic()
    assert c.get_or_set("k", recompute, timeout=60) == "new"
    assert inner == ["old"]  # no second refresh inside the first, and no wait on itself
    assert time.monotonic() - started < 1


def test_refresh_keeps_working_with_tags_raw_keys_and_async() -> None:
    # Tags: the refreshed value carries them, so invalidation still reaches it.
    c = make(EARLY_REFRESH=1.0)
    fake_timing(c, 10.0)
    c.get_or_set("k", lambda: "old", timeout=60, tags=["t"])
    c._early_random = lambda: ALMOST_ONE
    assert c.get_or_set("k", lambda: "new", timeout=60, tags=["t"]) == "new"
    assert c.invalidate_tags(["t"]) == 1 and c.get("k") is None
    # A custom KEY_FUNCTION (raw mode).
    raw = RustCache(
        f"early-{uuid.uuid4().hex}",
        {"KEY_FUNCTION": lambda key, prefix, version: f"custom-{key}"},
    )
    fake_timing(raw, 10.0)
    raw.get_or_set("k", lambda: "old", timeout=60)
    raw._early_random = lambda: ALMOST_ONE
    assert raw.get_or_set("k", lambda: "new", timeout=60, early_refresh=1) == "new"
    assert raw.get("k") == "new"
    # aget_or_set takes the same keyword.
    a = make()
    fake_timing(a, 10.0)
    assert asyncio.run(a.aget_or_set("k", lambda: "old", timeout=60)) == "old"
    a._early_random = lambda: ALMOST_ONE
    assert asyncio.run(a.aget_or_set("k", lambda: "new", 60)) == "old"
    assert asyncio.run(a.aget_or_set("k", lambda: "new", 60, early_refresh=1.0)) == "new"


@pytest.mark.parametrize("beta", [-1, -0.5, float("nan"), float("inf"), "1", None, True, [1]])
def test_bad_early_refresh_option_is_improperly_configured(beta: Any) -> None:
    with pytest.raises(ImproperlyConfigured, match="EARLY_REFRESH"):
        make(EARLY_REFRESH=beta)


@pytest.mark.parametrize(
    ("beta", "error"),
    [
        (-1, ValueError),
        (-1e-9, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        ("1", TypeError),
        (True, TypeError),
        (b"1", TypeError),
        (1j, TypeError),
    ],
)
def test_bad_early_refresh_argument_is_refused(beta: Any, error: type[Exception]) -> None:
    c = make()
    c.set("k", "v", 60)
    with pytest.raises(error, match="early refresh beta"):
        c.get_or_set("k", lambda: "x", early_refresh=beta)
    with pytest.raises(error, match="early refresh beta"):
        asyncio.run(c.aget_or_set("k", lambda: "x", early_refresh=beta))
    assert c.get("k") == "v"


def test_good_early_refresh_values_and_a_broken_random_source() -> None:
    c = make(EARLY_REFRESH=2)  # an int is fine
    assert c._options.early_refresh == 2.0
    assert c.get_or_set("k", lambda: "v", early_refresh=Fraction(1, 2)) == "v"
    assert c.get_or_set("k", lambda: "w", early_refresh=0.0) == "v"
    # A replacement random source must give [0, 1): anything else is an error, not a silent
    # "always" or "never".
    fake_timing(c, 10.0)
    c._early_random = lambda: 1.5
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        c.get_or_set("k", lambda: "w")
