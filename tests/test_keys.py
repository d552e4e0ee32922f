"""Distinct keys stay distinct: every caller key (any str, lone surrogates and U+FFFF included)
has its own entry, and listing keys gives back the caller's keys, in both key modes."""

from __future__ import annotations

import glob
import uuid
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from django.core.cache.backends.base import CacheKeyWarning, memcache_key_warnings
from hypothesis import example, given, settings
from hypothesis import strategies as st

from django_rustcache import RustCache

#: Pieces an escaping scheme is made of: the escape character U+FFFF, lone surrogates, hex digits.
TRICKY = ["\uffff", "\udc80", "\ud800", "\udfff", "dc80", "ed", "b2", "80", "ffff", ":", "*"]
#: Any str: every code point (lone surrogates included), often built from the tricky pieces.
keys = st.lists(st.one_of(st.characters(codec=None), st.sampled_from(TRICKY))).map("".join)
distinct_pairs = st.tuples(keys, keys).filter(lambda p: p[0] != p[1])
#: Pairs that collided under the escape of lone surrogates as U+FFFF + hex bytes, and under
#: escapes that forget to escape U+FFFF itself.
COLLIDED = [
    ("\udc80", "\uffffed\uffffb2\uffff80"),
    ("\udc80", "\uffffdc80"),
    ("\uffff", "\uffffffff"),
    ("a\ud800b", "a\uffffed\uffffa0\uffff80b"),
    # The store keeps a made key that starts with ":1:" without those 3 bytes (and a bit that
    # says so): keys that differ only there.
    (":1:abc", "abc"),
    (":1:", ""),
    (":1:abc", ":10:abc"),
    (":1:1:abc", ":1:abc"),
    (":1", ":1:"),
]


def with_collided(test: Any) -> Any:
    """Make sure the property test tries each pair of ``COLLIDED``, in both orders."""
    for a, b in COLLIDED:
        test = example(pair=(a, b))(example(pair=(b, a))(test))
    return test


def identity_key(key: str, key_prefix: str, version: Any) -> str:
    """A custom KEY_FUNCTION (raw mode) that passes the caller's key through as the made key."""
    return key


def make(mode: str = "fast", **params: Any) -> RustCache:
    """A backend on a fresh LOCATION: Django's key function ("fast") or a custom one ("raw")."""
    if mode == "raw":
        params["KEY_FUNCTION"] = identity_key
    return RustCache(f"test-keys-{uuid.uuid4().hex}", params)


@pytest.fixture(autouse=True)
def _quiet_key_warnings() -> Iterator[None]:
    """Arbitrary keys draw Django's memcached-safety warnings; they are not what is tested here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CacheKeyWarning)
        yield


def exact(pattern: str) -> str:
    """A glob pattern that matches exactly ``pattern`` (``*``, ``?`` and ``[`` taken literally)."""
    return glob.escape(pattern)


# The reported case ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fast", "raw"])
def test_a_lone_surrogate_key_and_its_old_escape_text_are_two_entries(mode: str) -> None:
    c = make(mode)
    c.set("\udc80", "a")
    c.set("\uffffed\uffffb2\uffff80", "b")
    assert c.get("\udc80") == "a"
    assert c.get("\uffffed\uffffb2\uffff80") == "b"
    assert c.delete("\udc80")
    assert c.get("\udc80") is None
    assert c.get("\uffffed\uffffb2\uffff80") == "b"


def test_keys_lists_the_callers_keys_with_surrogates_not_their_escaped_text() -> None:
    c = make()
    c.set("\udc80x", 1)
    c.set("plain", 2)
    c.set("\uffff", 3)
    assert sorted(c.keys()) == sorted(["\udc80x", "plain", "\uffff"])
    assert list(c.iter_keys("\udc80*")) == ["\udc80x"]
    assert c.delete_pattern("\udc80*") == 1
    assert sorted(c.keys()) == ["plain", "\uffff"]


def test_a_version_with_a_lone_surrogate_lists_and_deletes_its_keys() -> None:
    c = make()
    c.set("k", 1, version="v\udc80")
    c.set("k", 2, version="v\uffff")
    assert c.keys(version="v\udc80") == ["k"]
    assert c.delete_pattern("*", version="v\udc80") == 1
    assert c.get("k", version="v\uffff") == 2


def test_key_prefixes_with_a_lone_surrogate_or_the_escape_character_are_kept_apart() -> None:
    loc = f"test-keys-{uuid.uuid4().hex}"
    a = RustCache(loc, {"KEY_PREFIX": "p\udc80"})
    b = RustCache(loc, {"KEY_PREFIX": "p\uffffdc80"})
    a.set("k", "a")
    b.set("k", "b")
    assert (a.get("k"), b.get("k")) == ("a", "b")
    assert a.keys() == ["k"] and b.keys() == ["k"]
    assert a.delete_pattern("*") == 1
    assert b.get("k") == "b"


def test_tags_of_two_key_prefixes_sharing_a_location_are_kept_apart() -> None:
    loc = f"test-keys-{uuid.uuid4().hex}"
    a = RustCache(loc, {"KEY_PREFIX": "a"})
    b = RustCache(loc, {"KEY_PREFIX": "a:b"})
    a.set("k", 1, tags=["b:c"])
    assert b.invalidate_tags(["c"]) == 0
    assert a.get("k") == 1
    assert a.invalidate_tags(["b:c"]) == 1


def test_a_version_given_as_int_or_as_its_str_is_one_version_as_in_django() -> None:
    c = make()
    c.set("k", 1, version=2)
    assert c.get("k", version="2") == 1
    assert c.make_key("k", version=2) == c.make_key("k", version="2")


# Django's default made-key prefix ":1:" is left out of the store's blocks --------------------


def near_prefix_caches() -> tuple[RustCache, RustCache, RustCache, RustCache]:
    """Four instances on one LOCATION (one store): Django's defaults (made keys ":1:..."),
    VERSION 10 (":10:..."), KEY_PREFIX "p" ("p:1:...") and raw mode (made key = caller's key)."""
    loc = f"test-keys-{uuid.uuid4().hex}"
    room = {"OPTIONS": {"MAX_ENTRIES": 100_000}}
    return (
        RustCache(loc, {**room}),
        RustCache(loc, {**room, "VERSION": 10}),
        RustCache(loc, {**room, "KEY_PREFIX": "p"}),
        RustCache(loc, {**room, "KEY_FUNCTION": identity_key}),
    )


def test_made_keys_that_differ_only_around_the_elided_prefix_are_distinct_entries() -> None:
    default, v10, prefixed, raw = near_prefix_caches()
    default.set("abc", "default abc")  # ":1:abc"
    default.set("", "default empty")  # ":1:"
    default.set("1:abc", "default 1:abc")  # ":1:1:abc"
    v10.set("abc", "v10 abc")  # ":10:abc"
    prefixed.set("abc", "p abc")  # "p:1:abc"
    raw.set("abc", "raw abc")
    raw.set("", "raw empty")
    raw.set(":1", "raw :1")
    made = {
        ":1:abc": "default abc",
        ":1:": "default empty",
        ":1:1:abc": "default 1:abc",
        ":10:abc": "v10 abc",
        "p:1:abc": "p abc",
        "abc": "raw abc",
        "": "raw empty",
        ":1": "raw :1",
    }
    assert raw.get_many(list(made)) == made
    assert default.get("abc", version=10) == "v10 abc"
    assert (default.get("abc"), v10.get("abc"), prefixed.get("abc")) == (
        "default abc",
        "v10 abc",
        "p abc",
    )
    # Each instance lists its own caller keys, under its own or a given version.
    assert sorted(default.keys()) == ["", "1:abc", "abc"]
    assert v10.keys() == ["abc"] and prefixed.keys() == ["abc"]
    assert default.keys(version=10) == ["abc"]
    assert default.keys("a*") == ["abc"]
    # Deleting by pattern under the defaults leaves the keys that only look alike.
    assert default.delete_pattern("a*") == 1
    assert raw.get(":1:abc") is None
    assert default.delete_pattern("*") == 2
    del made[":1:abc"], made[":1:"], made[":1:1:abc"]
    assert raw.get_many([":1:abc", ":1:", ":1:1:abc", *made]) == made
    assert v10.delete_pattern("*") == 1 and prefixed.delete_pattern("*") == 1
    assert raw.get_many(["abc", "", ":1"]) == {"abc": "raw abc", "": "raw empty", ":1": "raw :1"}
    for key in ["abc", "", ":1"]:
        assert raw.delete(key)
    assert default.stats()["entries"] == 0


def test_many_made_keys_stay_found_as_the_tables_grow() -> None:
    default, v10, _, raw = near_prefix_caches()
    n = 20_000
    for i in range(n):
        default.set(f"k{i}", i)  # ":1:k{i}"
        raw.set(f"k{i}", -i)
        v10.set(f"k{i}", n + i)
    assert default.get_many([f"k{i}" for i in range(n)]) == {f"k{i}": i for i in range(n)}
    assert raw.get_many([f"k{i}" for i in range(n)]) == {f"k{i}": -i for i in range(n)}
    assert v10.get_many([f"k{i}" for i in range(n)]) == {f"k{i}": n + i for i in range(n)}
    assert len(default.keys()) == n and len(v10.keys()) == n
    assert default.delete_pattern("k1*") == len([i for i in range(n) if str(i).startswith("1")])
    assert raw.get("k1") == -1 and v10.get("k1") == n + 1
    assert default.get("k1") is None and default.get("k2") == 2


def test_tags_and_incr_work_on_entries_of_elided_keys() -> None:
    default, _, _, raw = near_prefix_caches()
    default.set("abc", 1, tags=["t"])
    raw.set("abc", 10, tags=["u"])  # (same KEY_PREFIX: one tag namespace)
    assert default.incr("abc") == 2 and raw.incr("abc", 5) == 15
    assert default.invalidate_tags(["t"]) == 1
    assert (default.get("abc"), raw.get("abc")) == (None, 15)


def test_a_made_key_under_djangos_defaults_is_charged_3_bytes_less() -> None:
    # Issue 12 item 3's entry: ":1:user:123456:profile" and 100 bytes take a 144-byte malloc
    # chunk (a 136-byte block); under KEY_PREFIX "p" its made key is 4 bytes longer, and the
    # block takes the next chunk (160). Before the prefix was left out (and the header shrank),
    # both took 160.
    loc = f"test-keys-{uuid.uuid4().hex}"
    default = RustCache(loc, {})
    prefixed = RustCache(loc + "-p", {"KEY_PREFIX": "p"})
    grown = []
    for c in (default, prefixed):
        before = c.stats()["bytes"]
        c.set("user:123456:profile", b"%010d" % 7 * 10, timeout=3600)
        grown.append(c.stats()["bytes"] - before)
    assert grown[1] - grown[0] == 16


#: Caller keys built from pieces that look like the elided prefix (as made keys and raw keys).
NEAR_PIECES = [":1:", ":1", ":", "1", "a", "\u00e9", ":10:", "\udc80"]
near_keys = st.lists(st.sampled_from(NEAR_PIECES), max_size=3).map("".join)
near_ops = st.lists(
    st.tuples(
        st.sampled_from(["set", "get", "delete", "incr", "touch", "has_key", "get_many"]),
        st.sampled_from(["default", "raw"]),
        near_keys,
        st.one_of(st.integers(-3, 3), st.floats(-3, 3, allow_nan=False)),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(ops=near_ops)
def test_keys_around_the_elided_prefix_behave_as_in_locmemcache(ops: list[Any]) -> None:
    """A default instance (made keys ":1:...") and a raw one (made key = caller's key) on one
    LOCATION, driven like LocMemCache's pair: equal results, and ``keys()`` lists what
    LocMemCache holds (incr of a float takes the snapshot and replace path)."""
    from django.core.cache.backends.locmem import LocMemCache

    tail = uuid.uuid4().hex
    params: dict[str, Any] = {"OPTIONS": {"MAX_ENTRIES": 10_000}}
    ours = {
        "default": RustCache(f"near-{tail}", params),
        "raw": RustCache(f"near-{tail}", {**params, "KEY_FUNCTION": identity_key}),
    }
    ref = {
        "default": LocMemCache(f"near-{tail}", params),
        "raw": LocMemCache(f"near-{tail}", {**params, "KEY_FUNCTION": identity_key}),
    }

    def run(cache: Any, op: str, key: str, value: Any) -> Any:
        if op == "set":
            return cache.set(key, value)
        if op == "incr":
            try:
                return cache.incr(key, 2)
            except ValueError:
                return "missing"
        if op == "touch":
            return cache.touch(key, None)
        if op == "get_many":
            return cache.get_many([key, f":1:{key}", key[3:]])
        return getattr(cache, op)(key)

    for op, who, key, value in ops:
        assert run(ours[who], op, key, value) == run(ref[who], op, key, value), (op, who, key)
    held = list(ref["default"]._cache)
    assert sorted(ours["default"].keys()) == sorted(k[3:] for k in held if k.startswith(":1:"))
    assert sorted(ours["default"].keys("a*")) == sorted(k[3:] for k in held if k.startswith(":1:a"))
    assert ours["default"].delete_pattern(":*") == sum(k.startswith(":1::") for k in held)


# Django's memcached-safety warning judges the caller's made key --------------------------------


@pytest.mark.parametrize("key", ["\udc80" * 240, "\uffff" * 240, "a\uffff\udc80" * 80])
def test_a_key_of_fewer_than_250_characters_draws_no_length_warning(key: str) -> None:
    c = make()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheKeyWarning)
        c.set(key, 1)
        assert c.get(key) == 1


@pytest.mark.parametrize("key", ["\udc80 x", "\uffff x", "\uffff" * 250])
def test_a_key_with_a_space_or_too_long_still_draws_djangos_warning(key: str) -> None:
    c = make()
    with pytest.warns(CacheKeyWarning) as record:
        c.set(key, 1)
    expected = list(memcache_key_warnings(f":1:{key}"))
    assert expected and [str(w.message) for w in record] == expected


# The single-flight table ----------------------------------------------------------------------


def test_a_fill_of_one_key_does_not_hold_up_a_fill_of_its_old_escape_text() -> None:
    c = make()
    one, other = c.make_key("\udc80"), c.make_key("\uffffed\uffffb2\uffff80")
    with c._h.fill(one, exclusive=True) as first:
        assert first is not None and first.leads
        with c._h.fill(other, exclusive=True) as second:
            assert second is not None and second.leads


# Properties -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fast", "raw"])
@settings(max_examples=300, deadline=None)
@with_collided
@given(pair=distinct_pairs)
def test_two_distinct_keys_have_two_entries(mode: str, pair: tuple[str, str]) -> None:
    a, b = pair
    c = make(mode)
    c.set(a, "A")
    c.set(b, "B")
    assert (c.get(a), c.get(b)) == ("A", "B")
    assert c.has_key(a) and c.has_key(b)
    assert c.delete(a)
    assert (c.get(a), c.get(b)) == (None, "B")
    assert not c.delete(a)
    assert c.add(a, "A2")
    assert (c.get(a), c.get(b)) == ("A2", "B")


@pytest.mark.parametrize("mode", ["fast", "raw"])
@settings(max_examples=200, deadline=None)
@with_collided
@given(pair=distinct_pairs)
def test_two_distinct_keys_stay_apart_through_the_many_operations(
    mode: str, pair: tuple[str, str]
) -> None:
    a, b = pair
    c = make(mode)
    assert c.set_many({a: "A", b: "B"}) == []
    assert c.get_many([a, b]) == {a: "A", b: "B"}
    c.delete_many([a])
    assert c.get_many([a, b]) == {b: "B"}
    c.delete_many([b])
    assert c.get_many([a, b]) == {}


@settings(max_examples=300, deadline=None)
@with_collided
@given(pair=distinct_pairs)
def test_keys_iter_keys_and_delete_pattern_give_back_exactly_the_callers_keys(
    pair: tuple[str, str],
) -> None:
    a, b = pair
    c = make()
    c.set(a, "A")
    c.set(b, "B")
    assert sorted(c.keys()) == sorted([a, b])
    assert sorted(c.iter_keys()) == sorted([a, b])
    assert list(c.iter_keys(exact(a))) == [a]
    assert c.delete_pattern(exact(a)) == 1
    assert (c.get(a), c.get(b)) == (None, "B")
    assert c.keys() == [b]
    assert c.delete_pattern("*") == 1
    assert c.keys() == []


@settings(max_examples=200, deadline=None)
@given(key=keys, version=st.one_of(st.integers(), keys))
def test_any_key_under_any_version_lists_as_itself(key: str, version: int | str) -> None:
    c = make()
    c.set(key, 1, version=version)
    assert c.keys(version=version) == [key]
    assert c.get(key, version=version) == 1
    assert c.delete_pattern("*", version=version) == 1
    assert c.get(key, version=version) is None


@settings(max_examples=200, deadline=None)
@with_collided
@given(pair=distinct_pairs)
def test_two_distinct_tags_invalidate_only_their_own_entries(pair: tuple[str, str]) -> None:
    t, u = pair
    c = make()
    c.set("a", "A", tags=[t])
    c.set("b", "B", tags=[u])
    assert c.invalidate_tags([t]) == 1
    assert (c.get("a"), c.get("b")) == (None, "B")


# @cached builds keys from arguments: different arguments, different keys --------------------


class Named:
    """An argument whose repr is the text of a str argument."""

    def __repr__(self) -> str:
        return "Named()"


def test_cached_keeps_arguments_of_different_types_apart() -> None:
    from django_rustcache.decorators import cached

    @cached(60)
    def kind(x: Any) -> str:
        return type(x).__name__

    assert kind([1, 2]) == "list"
    assert kind((1, 2)) == "tuple"
    assert kind({"a": 1}) == "dict"
    assert kind((("'a'", 1),)) == "tuple"
    assert kind({1, 2}) == "set"
    assert kind(frozenset({1, 2})) == "frozenset"
    assert kind(("1", "2")) == "tuple"
    assert kind(Named()) == "Named"
    assert kind("Named()") == "str"
    args = [[1, 2], (1, 2), {"a": 1}, (("'a'", 1),), {1, 2}, ("1", "2"), Named(), "Named()"]
    assert len({kind.cache_key(a) for a in args}) == len(args)


def test_cached_closures_of_one_name_do_not_share_results() -> None:
    from django_rustcache.decorators import cached

    def times(n: int) -> Any:
        @cached(60)
        def scaled(x: int) -> int:
            return x * n

        return scaled

    double, triple = times(2), times(3)
    assert double(5) == 10
    assert triple(5) == 15
    assert double.cache_key(5) != triple.cache_key(5)


def test_locations_with_a_lone_surrogate_or_the_escape_character_are_two_stores() -> None:
    tail = uuid.uuid4().hex
    a = RustCache(f"x\udc80{tail}", {})
    b = RustCache(f"x\uffffdc80{tail}", {})
    a.set("k", "a")
    assert b.get("k") is None
    assert a.stats()["location"] == f"x\udc80{tail}"
    assert RustCache(f"x\udc80{tail}", {}).get("k") == "a"


@settings(max_examples=100, deadline=None)
@given(key=keys)
def test_the_handles_made_key_is_djangos_not_the_stores_text(key: str) -> None:
    c = make()
    assert c._h.make_key(key) == c.make_key(key)
