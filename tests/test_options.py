"""Settings are read as Django's BaseCache reads them (``int()`` for MAX_ENTRIES, CULL_FREQUENCY and
TIMEOUT), and timeouts as LocMemCache takes them. Where Django would silently fall back to a default
or fail later, RustCache raises ImproperlyConfigured at once; values past the store's range are
clamped, never an OverflowError.
"""

from __future__ import annotations

import threading
import uuid
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest
from django.core.cache.backends.base import BaseCache
from django.core.cache.backends.locmem import LocMemCache
from django.core.exceptions import ImproperlyConfigured
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from django_rustcache import RustCache
from django_rustcache.options import STAMPEDE_WAIT_MAX


def make(options: dict[str, Any] | None = None, **params: Any) -> RustCache:
    """A backend on a fresh LOCATION of its own."""
    if options is not None:
        params["OPTIONS"] = options
    return RustCache(f"options-{uuid.uuid4().hex}", params)


# MAX_ENTRIES, CULL_FREQUENCY, MAX_BYTES: anything int() takes ----------------------------------


@pytest.mark.parametrize(
    ("value", "parsed"),
    [(10e9, 10_000_000_000), ("500", 500), (Decimal("7.9"), 7), (b"12", 12), (True, 1), (3.0, 3)],
)
def test_max_entries_and_cull_frequency_accept_what_djangos_int_accepts(value, parsed):
    c = make({"MAX_ENTRIES": value, "CULL_FREQUENCY": value})
    assert (c._max_entries, c._cull_frequency) == (parsed, parsed)
    c.set("k", 1)
    assert c.get("k") == 1


def test_an_orm_caching_apps_max_entries_of_10e9_works_through_caches(settings):
    from django.core.cache import caches

    settings.CACHES = {
        **settings.CACHES,
        "orm": {"BACKEND": "django_rustcache.RustCache", "OPTIONS": {"MAX_ENTRIES": 10e9}},
    }
    caches["orm"].set("k", "v")
    assert caches["orm"].get("k") == "v"


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"OPTIONS": {"MAX_ENTRIES": "1e3"}}, "MAX_ENTRIES"),
        ({"OPTIONS": {"MAX_ENTRIES": float("nan")}}, "MAX_ENTRIES"),
        ({"OPTIONS": {"MAX_ENTRIES": float("inf")}}, "MAX_ENTRIES"),
        ({"OPTIONS": {"MAX_ENTRIES": None}}, "MAX_ENTRIES"),
        ({"OPTIONS": {"CULL_FREQUENCY": [3]}}, "CULL_FREQUENCY"),
        ({"OPTIONS": {"MAX_BYTES": "lots"}}, "MAX_BYTES"),
        ({"OPTIONS": {"MAX_BYTES": float("inf")}}, "MAX_BYTES"),
        ({"max_entries": "many"}, "max_entries"),
        ({"cull_frequency": object()}, "cull_frequency"),
        ({"TIMEOUT": "soon"}, "TIMEOUT"),
        ({"TIMEOUT": float("nan")}, "TIMEOUT"),
        ({"TIMEOUT": float("inf")}, "TIMEOUT"),
        ({"timeout": "5 minutes"}, "timeout"),
    ],
)
def test_what_int_rejects_is_improperly_configured_not_djangos_silent_fallback(params, named):
    with pytest.raises(ImproperlyConfigured, match=named):
        make(**params)


def test_a_bad_value_is_named_by_the_key_django_read_it_from():
    with pytest.raises(ImproperlyConfigured, match=r"max_entries must be >= 1"):
        make({"EVICTION_POLICY": "s3fifo", "MAX_ENTRIES": 5}, max_entries=0)
    with pytest.raises(ImproperlyConfigured, match=r"OPTIONS\['CULL_FREQUENCY'\] must be >= 0"):
        make({"CULL_FREQUENCY": -2})
    with pytest.raises(ImproperlyConfigured, match=r"MAX_BYTES'\] must be an integer.*'x'\.$"):
        make({"MAX_BYTES": "x"})


def test_a_top_level_lowercase_key_wins_over_options_as_in_django():
    # Django reads `max_entries` and ignores OPTIONS' MAX_ENTRIES then: so do we.
    c = make({"MAX_ENTRIES": "not read"}, max_entries="40", cull_frequency=2.0, timeout="60")
    assert (c._max_entries, c._cull_frequency, c.default_timeout) == (40, 2, 60)


def test_max_entries_cull_frequency_and_max_bytes_past_the_stores_range_are_clamped():
    c = make({"MAX_ENTRIES": 10**20, "CULL_FREQUENCY": 10**30, "MAX_BYTES": 2**70})
    assert c._max_entries == 10**20  # Django's value stays visible
    c.set("k", "v")
    assert c.get("k") == "v"
    assert c.stats()["max_bytes"] == 2**63 - 1
    c._max_entries = -(10**25)  # assigned on a live instance, as Django's tests do
    c.set("k", "w")
    assert c.get("k") == "w"


def test_a_timeout_setting_past_a_floats_range_is_improperly_configured():
    # LocMemCache accepts it and then raises OverflowError from every set.
    with pytest.raises(ImproperlyConfigured, match="TIMEOUT"):
        make(TIMEOUT=10**400)


# STAMPEDE_WAIT and EARLY_REFRESH -------------------------------------------------------------


@pytest.mark.parametrize("wait", [float("inf"), 1e300, 10**400, Decimal("1e500")])
def test_an_endless_stampede_wait_is_clamped_and_a_waiter_gets_the_leaders_value(wait):
    c = make({"STAMPEDE_WAIT": wait})
    assert c._options.stampede_wait == STAMPEDE_WAIT_MAX
    inside, release = threading.Event(), threading.Event()
    got: dict[str, Any] = {}

    def slow() -> str:
        inside.set()
        release.wait(10)
        return "leader"

    def run(name: str, default: Any) -> None:
        try:
            got[name] = c.get_or_set("k", default)
        except Exception as exc:  # noqa: BLE001 - the assertion below shows it
            got[name] = exc

    leader = threading.Thread(target=run, args=("leader", slow))
    leader.start()
    assert inside.wait(10)
    waiter = threading.Thread(target=run, args=("waiter", lambda: "waiter"))
    waiter.start()
    # The waiter is waiting (or about to): let the leader finish.
    threading.Timer(0.3, release.set).start()
    for t in (leader, waiter):
        t.join(30)
        assert not t.is_alive()
    assert got == {"leader": "leader", "waiter": "leader"}


@pytest.mark.parametrize("wait", [float("nan"), Decimal("sNaN"), -1, "5", True, None])
def test_a_stampede_wait_that_is_not_seconds_is_improperly_configured(wait):
    with pytest.raises(ImproperlyConfigured, match="STAMPEDE_WAIT"):
        make({"STAMPEDE_WAIT": wait})


def test_an_early_refresh_past_a_floats_range_is_a_clear_error_not_overflow():
    with pytest.raises(ImproperlyConfigured, match="EARLY_REFRESH"):
        make({"EARLY_REFRESH": 10**400})
    with pytest.raises(ValueError, match="finite"):
        make().get_or_set("k", lambda: 1, early_refresh=10**400)


# KEY_PREFIX and VERSION are any object, formatted with %s ---------------------------------------


@pytest.mark.parametrize(
    "params", [{"KEY_PREFIX": "\udc80"}, {"VERSION": "v\ud800"}, {"KEY_PREFIX": "a\udfff:b"}]
)
def test_a_prefix_or_version_with_lone_surrogates_behaves_as_in_locmemcache(params):
    loc = f"options-{uuid.uuid4().hex}"
    ours, other = RustCache(loc, params), RustCache(loc, {})
    ref = LocMemCache(loc, params)
    for c in (ours, ref):
        c.set("k", "v")
        c.set_many({"m": 1, "n": 2})
        assert c.add("a", 1) and not c.add("a", 2)
        assert c.incr("a", 5) == 6
    for name in ("k", "m", "n", "a"):
        assert ours.get(name) == ref.get(name)
        assert ours.has_key(name) and not other.has_key(name)
    assert ours.get_many(["k", "m", "z"]) == ref.get_many(["k", "m", "z"])
    assert sorted(ours.keys()) == ["a", "k", "m", "n"]
    other.set("k", "other's")
    assert ours.get("k") == "v"
    assert ours.delete("k") and not ours.has_key("k") and other.get("k") == "other's"
    with pytest.raises(ValueError, match="not found"):
        ours.incr("missing")


def test_prefix_and_version_objects_are_formatted_as_django_formats_them():
    for params in ({"KEY_PREFIX": 7, "VERSION": 2.5}, {"KEY_PREFIX": None}, {"VERSION": b"v"}):
        c = make(**params)
        c.set("k", 1)
        assert c.get("k") == 1 and c.keys() == ["k"]
        assert c.make_key("k") == BaseCache(params).make_key("k")


# Property test: RustCache reads Django's settings as BaseCache does ----------------------------

_ATTR = {
    "MAX_ENTRIES": "_max_entries",
    "CULL_FREQUENCY": "_cull_frequency",
    "TIMEOUT": "default_timeout",
}

_values = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(),
    st.decimals(),
    st.fractions(),
    st.booleans(),
    st.none(),
    st.text(max_size=6),
    st.integers(min_value=-(10**25), max_value=10**25).map(str),
    st.integers(min_value=-(10**6), max_value=10**6).map(lambda i: f" {i}\n".encode()),
    st.floats().map(str),
    st.complex_numbers(),
    st.lists(st.integers(), max_size=2),
)


@hsettings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(["MAX_ENTRIES", "CULL_FREQUENCY", "TIMEOUT"]),
    lower=st.booleans(),
    value=_values,
)
def test_settings_are_parsed_exactly_as_djangos_basecache_parses_them(name, lower, value):
    """Same value as BaseCache, or ImproperlyConfigured exactly where BaseCache silently falls
    back (int() raises ValueError/TypeError) or raises OverflowError (inf), and for the documented
    stricter checks: a negative CULL_FREQUENCY and a TIMEOUT past a float's range."""
    key = name.lower() if lower else name
    params = {"OPTIONS": {name: value}} if name != "TIMEOUT" and not lower else {key: value}
    try:
        expected: Any = getattr(BaseCache(params), _ATTR[name])
        django_fails = False
    except OverflowError:
        django_fails = True
    if name == "TIMEOUT" and value is None:
        falls_back = False
    else:
        try:
            int(value)
            falls_back = False
        except (ValueError, TypeError):
            falls_back = True
        except OverflowError:
            falls_back = False  # django_fails
    stricter = not django_fails and (
        (name == "CULL_FREQUENCY" and expected < 0)
        or (name == "TIMEOUT" and expected is not None and _seconds(expected) is None)
    )
    try:
        got: Any = getattr(RustCache("options-property", params), _ATTR[name])
    except ImproperlyConfigured:
        assert django_fails or falls_back or stricter, (value, "rejected")
        return
    assert not (django_fails or falls_back or stricter), (value, "accepted", got)
    assert got == expected and type(got) is type(expected)


# Per-call timeouts: as LocMemCache takes them ----------------------------------------------------


def _outcome(cache: Any, op: str, timeout: Any) -> tuple[Any, Any]:
    """(result or exception type, what the key reads afterwards) of one operation."""
    key = f"k-{uuid.uuid4().hex}"
    if op == "touch":
        cache.set(key, "old", None)
    try:
        if op == "set":
            result: Any = cache.set(key, "v", timeout)
        elif op == "add":
            result = cache.add(key, "v", timeout)
        elif op == "touch":
            result = cache.touch(key, timeout)
        elif op == "set_many":
            result = cache.set_many({key: "v"}, timeout)
        elif op == "get_or_set":
            result = cache.get_or_set(key, "v", timeout)
        else:
            result = cache.get_or_set(key, lambda: "v", timeout)
    except Exception as e:  # noqa: BLE001 - the exception type is the outcome compared
        result = type(e)
    return result, cache.get(key)


def _seconds(timeout: Any) -> float | None:
    try:
        return float(timeout)
    except (TypeError, ValueError, OverflowError):
        return None


_timeouts = st.one_of(
    st.floats(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.integers(min_value=-5, max_value=5),
    st.decimals(),
    st.fractions(),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, Decimal(0)]),
    st.sampled_from([Fraction(0), Fraction(-1, 3), Fraction(5, 2), 10**400, -(10**400)]),
)


@hsettings(max_examples=300, deadline=None)
@given(
    op=st.sampled_from(["set", "add", "touch", "set_many", "get_or_set", "get_or_set_callable"]),
    timeout=_timeouts,
)
def test_odd_timeouts_do_what_they_do_in_locmemcache(op, timeout):
    seconds = _seconds(timeout)
    if seconds is not None and 0 < seconds < 5:
        return  # expires while we compare: a race, not a difference
    ours = _outcome(RustCache("options-timeouts", {}), op, timeout)
    theirs = _outcome(LocMemCache("options-timeouts", {}), op, timeout)
    assert ours == theirs


def test_nan_decimal_and_huge_timeouts_match_locmemcache():
    c = make()
    c.set("nan", 1, float("nan"))
    assert c.get("nan") == 1 and c.ttl("nan") is None  # kept forever, as in LocMemCache
    with pytest.raises(TypeError):
        c.set("dec", 1, Decimal("10"))
    with pytest.raises(OverflowError):
        c.set("big", 1, 10**400)
    with pytest.raises(OverflowError):
        c.touch("nan", -(10**400))
    c.set("frac", 1, Fraction(60))
    assert c.get("frac") == 1
    c.set("zero", 1, Decimal(0))  # Django's `timeout == 0` check lets it through
    assert not c.has_key("zero")
    with pytest.raises(TypeError):
        c.set("c", 1, 1j)  # LocMemCache stores it, then its next read raises TypeError
