"""Plain values (exact dict, list and tuple of str, bytes, int, float, bool and None, nested) are
stored in a structural form and copied without pickle on ``get``. The result must be exactly what
LocMemCache (a pickle round trip) gives: same value, types, key order and sharing structure, a
fresh copy every time; and the stored form must cost the garbage collector nothing and be counted
in MAX_BYTES."""

from __future__ import annotations

import asyncio
import gc
import math
import pickle
import sys
import threading
import uuid
import weakref
from typing import Any

import pytest
from django.core.cache.backends.locmem import LocMemCache
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from django_rustcache import RustCache
from tests.describe import shape
from tests.threads import run_threads


def make(**options: Any) -> RustCache:
    """A RustCache on a LOCATION of its own, with nothing culled unless asked."""
    options.setdefault("MAX_ENTRIES", 10**7)
    return RustCache(f"plain-{uuid.uuid4().hex}", {"TIMEOUT": None, "OPTIONS": options})


def locmem() -> LocMemCache:
    return LocMemCache(f"plain-ref-{uuid.uuid4().hex}", {"TIMEOUT": None})


# Subclasses of the plain types: they must take the pickle path (which keeps type and attributes).
class DictSub(dict):
    pass


class ListSub(list):
    pass


class StrSub(str):
    pass


class IntSub(int):
    pass


class TupleSub(tuple):
    pass


def test_shape_tells_apart_what_pickle_keeps():
    x = [1]
    assert shape([x, x]) != shape([x, [1]])
    assert shape([True]) != shape([1]) and shape([1.0]) != shape([1])
    assert shape({"a": 1, "b": 2}) != shape({"b": 2, "a": 1})
    assert shape((1,)) != shape([1])
    assert shape(StrSub("a")) != shape("a") and shape(DictSub()) != shape({})
    assert shape(float("nan")) == shape(float("nan"))


# Strategies -------------------------------------------------------------------------------

surrogates = st.sampled_from(["\ud800", "a\udfffb", "\udc80\ud83d"])
atoms = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    surrogates,
    st.binary(max_size=12),
)
hashable = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=6)
    ),
    lambda inner: st.tuples(inner, inner),
    max_leaves=4,
)
subclassed = st.one_of(
    st.builds(StrSub, st.text(max_size=5)),
    st.builds(IntSub, st.integers()),
)


def containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """One level of containers over ``inner``: plain ones and, less often, subclasses."""
    return st.one_of(
        st.lists(inner, max_size=5),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(hashable, inner, max_size=5),
        st.lists(inner, max_size=3).map(ListSub),
        st.dictionaries(st.text(max_size=3), inner, max_size=3).map(DictSub),
        st.lists(inner, max_size=3).map(TupleSub),
    )


def shared(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Values holding one sub-object twice, or themselves (what pickle keeps by identity)."""

    def twice(x: Any) -> Any:
        return {"a": x, "b": [x, (x,)]}

    def cycle(x: Any) -> Any:
        v: list[Any] = [x]
        v.append({"self": v})
        return v

    return st.one_of(inner.map(twice), inner.map(cycle))


plain_values = st.recursive(
    atoms,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(hashable, inner, max_size=5),
    ),
    max_leaves=30,
)
any_values = st.recursive(
    st.one_of(atoms, subclassed),
    lambda inner: st.one_of(containers(inner), shared(inner)),
    max_leaves=25,
)


def mutate(v: Any) -> None:
    """Change every mutable container reachable from ``v`` (in place)."""
    seen: set[int] = set()

    def walk(x: Any) -> None:
        if id(x) in seen:
            return
        seen.add(id(x))
        if isinstance(x, dict):
            for k in list(x):
                walk(x[k])
            x["__mutated__"] = True
        elif isinstance(x, list):
            for item in list(x):
                walk(item)
            x.append("mutated")
        elif isinstance(x, tuple):
            for item in x:
                walk(item)

    walk(v)


# Differential: RustCache against LocMemCache ------------------------------------------------


RUST = make()
REF = locmem()


def check_same_as_locmem(value: Any) -> None:
    """set/get on both caches give the same shape; mutating either side never leaks into them."""
    expected = shape(value)
    RUST.set("k", value)
    REF.set("k", value)
    got, ref = RUST.get("k"), REF.get("k")
    assert shape(got) == shape(ref)
    assert RUST.get_many(["k", "missing"]).keys() == {"k"}
    assert shape(RUST.get_many(["k"])["k"]) == shape(ref)
    # Isolation: neither the original nor a returned copy is the stored value.
    mutate(value)
    mutate(got)
    assert shape(RUST.get("k")) == shape(REF.get("k"))
    assert shape(REF.get("k")) == expected


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plain_values)
def test_plain_values_match_locmem(value: Any) -> None:
    check_same_as_locmem(value)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_values)
def test_subclasses_and_shared_parts_match_locmem(value: Any) -> None:
    check_same_as_locmem(value)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(alphabet="abcxyz", max_size=5), plain_values, max_size=8))
def test_set_many_get_many_match_locmem(data: dict[str, Any]) -> None:
    RUST.clear()
    REF.clear()
    assert RUST.set_many(data) == REF.set_many(data) == []
    keys = [*data, "missing"]
    assert shape(RUST.get_many(keys)) == shape(REF.get_many(keys))


# Semantics, one by one ----------------------------------------------------------------------


def test_shared_sub_objects_and_cycles_keep_their_identity():
    c = make()
    a = [1]
    c.set("shared", {"x": a, "y": a})
    got = c.get("shared")
    assert got["x"] is got["y"] and got["x"] is not a
    cyc: list[Any] = [1]
    cyc.append(cyc)
    c.set("cycle", cyc)
    got = c.get("cycle")
    assert got[1] is got and got is not cyc
    inner = ([1],)
    c.set("tuple-twice", [inner, inner])
    got = c.get("tuple-twice")
    assert got[0] is got[1] and got[0][0] is got[1][0]


def test_subclasses_come_back_as_themselves_with_their_attributes():
    c = make()
    ls = ListSub([1, 2])
    ls.note = "kept"  # type: ignore[attr-defined]
    value = {"d": DictSub(a=1), "l": ls, "s": StrSub("x"), "i": IntSub(3), "t": TupleSub((1,))}
    c.set("k", value)
    got = c.get("k")
    assert {k: type(v) for k, v in got.items()} == {k: type(v) for k, v in value.items()}
    assert got["l"].note == "kept" and got == value
    c.set("top", StrSub("s"))
    assert type(c.get("top")) is StrSub


def test_key_order_types_and_special_floats_are_kept():
    c = make()
    value = {"z": 1, "a": True, 3: 1.0, None: -0.0, (1, "t"): float("inf"), b"b": b"", 2**70: "big"}
    c.set("k", value)
    got = c.get("k")
    assert list(got) == list(value)
    assert [type(v) for v in got.values()] == [type(v) for v in value.values()]
    assert math.copysign(1, got[None]) == -1
    c.set("nan", [float("nan")])
    assert math.isnan(c.get("nan")[0])


def test_every_get_returns_fresh_containers():
    c = make()
    value = {"rows": [{"id": 1, "tags": ["a"]}, {"id": 2, "tags": []}], "flat": {"a": 1}}
    c.set("k", value)
    one, two = c.get("k"), c.get("k")
    assert one == two == value
    assert one is not two and one["rows"] is not two["rows"]
    assert one["rows"][0] is not two["rows"][0] and one["flat"] is not two["flat"]
    one["rows"][0]["tags"].append("b")
    one["flat"]["new"] = 1
    value["rows"].clear()
    assert c.get("k") == two


def test_tuples_of_atoms_are_returned_as_is_and_others_rebuilt():
    c = make()
    atoms_only = (1, "a", (2.0, None))
    c.set("t", atoms_only)
    assert c.get("t") is atoms_only
    holding = (1, [2])
    c.set("h", holding)
    got = c.get("h")
    assert got == holding and got is not holding and got[1] is not holding[1]


def test_depth_and_size_bounds_fall_back_to_pickle():
    """Past the walk's bounds the value is pickled: still correct, no longer the same object."""
    c = make()
    shallow: Any = 1
    for _ in range(10):
        shallow = (shallow,)
    deep: Any = 1
    for _ in range(100):
        deep = (deep,)
    c.set("shallow", shallow)
    c.set("deep", deep)
    assert c.get("shallow") is shallow
    got = c.get("deep")
    assert got == deep and got is not deep
    big = tuple(range(200_000))
    c.set("big", big)
    got = c.get("big")
    assert got == big and got is not big
    nested_list: list[Any] = []
    for _ in range(100):
        nested_list = [nested_list]
    c.set("deep-list", nested_list)
    assert c.get("deep-list") == nested_list


def test_unpicklable_values_nested_in_plain_ones_raise_and_store_nothing():
    c = make()
    ref = locmem()
    for cache in (c, ref):
        cache.set("k", {"old": [1]})
    for bad in ({"f": lambda: 1}, [1, {"lock": threading.Lock()}], ({"g": (x for x in ())},)):
        errors = []
        for cache in (c, ref):
            with pytest.raises(Exception) as info:
                cache.set("k", bad)
            errors.append(type(info.value))
            assert cache.get("k") == {"old": [1]}
        assert errors[0] is errors[1]
        with pytest.raises(errors[1]):
            c.set_many({"k": bad})
        assert c.get("k") == {"old": [1]}


def test_incr_on_plain_values_behaves_as_locmem():
    c = make()
    ref = locmem()
    for value in ({"a": 1}, [1], (1, 2), [], {}):
        for cache in (c, ref):
            cache.set("k", value)
        with pytest.raises(TypeError) as ours:
            c.incr("k")
        with pytest.raises(TypeError) as theirs:
            ref.incr("k")
        assert str(ours.value) == str(theirs.value)
        assert c.get("k") == value
    c.set("n", 5)
    assert c.incr("n", 2) == 7


def test_aget_aset_return_copies():
    c = make()
    value = {"a": [1, {"b": (1, 2)}]}

    async def scenario() -> tuple[Any, Any]:
        await c.aset("k", value)
        return await c.aget("k"), await c.aget("missing", "dflt")

    got, missing = asyncio.run(scenario())
    assert got == value and got is not value and got["a"] is not value["a"]
    assert missing == "dflt"


def test_concurrent_set_and_get_of_plain_values_never_mix_them():
    c = make()
    errors: list[str] = []

    def work(n: int) -> None:
        for i in range(2000):
            value = {"n": n, "i": i, "rows": [{"n": n, "i": i}, (n, i)], "flat": {"n": n}}
            c.set(f"k{i % 7}", value)
            got = c.get(f"k{(i + n) % 7}")
            if got is not None:
                m, j = got["n"], got["i"]
                if got != {"n": m, "i": j, "rows": [{"n": m, "i": j}, (m, j)], "flat": {"n": m}}:
                    errors.append(repr(got))
                got["rows"].append("mine")

    ids = iter(range(4))
    results = run_threads(4, lambda: work(next(ids)))
    assert all(status == "ok" for status, _ in results), results
    assert errors == []


# Garbage collector and memory ---------------------------------------------------------------


def nested(i: int) -> dict[str, Any]:
    """A typical cached value: a row with a list, a nested dict, a tuple and a list of dicts."""
    return {
        "id": i,
        "name": f"item {i}",
        "tags": ["a", f"t{i}"],
        "dims": (i, i + 0.5),
        "meta": {"owner": f"u{i}", "scores": [i, i * 2]},
        "rows": [{"k": i}, {"k": i + 1}],
    }


def tracked_objects() -> int:
    gc.collect()
    return len(gc.get_objects())


def test_stored_plain_values_add_no_gc_tracked_objects():
    count = 5000
    c = make()
    before = tracked_objects()
    for i in range(count):
        c.set(f"k{i}", nested(i))
    ours = tracked_objects() - before
    assert c.stats()["entries"] == count
    # The same values held as Python objects: several tracked containers each.
    held = [nested(i) for i in range(count)]
    as_objects = tracked_objects() - before - ours
    assert as_objects >= 5 * count
    assert ours < count // 50, (ours, as_objects)
    # Reading them back does not leave anything tracked behind in the store either.
    for i in range(count):
        assert c.get(f"k{i}") == held[i]
    del held
    assert tracked_objects() - before < count // 50


class Marker:
    """A weakly referenceable object to tell whether a cycle holding it was collected."""


def test_returned_dicts_are_tracked_once_they_can_hold_a_cycle():
    """A copy handed out untracked must still be collected if the caller makes a cycle with it."""
    c = make()
    c.set("flat", {"a": 1, "b": "x"})
    c.set("nested", {"rows": [{"a": 1}], "m": {"b": 2}})
    for key, inner in (("flat", lambda v: v), ("nested", lambda v: v["m"])):
        got = c.get(key)
        marker = Marker()
        inner(got)["self"] = got
        inner(got)["marker"] = marker
        assert gc.is_tracked(inner(got))
        ref = weakref.ref(marker)
        del got, marker
        gc.collect()
        assert ref() is None, key


def deep_sizeof(v: Any) -> int:
    """``sys.getsizeof`` over every object reachable from ``v`` (counted each time it is met)."""
    size = sys.getsizeof(v)
    if isinstance(v, dict):
        size += sum(deep_sizeof(k) + deep_sizeof(x) for k, x in v.items())
    elif isinstance(v, (list, tuple)):
        size += sum(deep_sizeof(x) for x in v)
    return size


STRUCTURAL = {
    "small-dict": {"id": 42, "name": "apple", "price": 1.2},
    "nested": nested(7),
    "rows": [{"id": i, "name": f"row {i}", "ok": True} for i in range(50)],
    "non-ascii": {f"k{i}": "é" * i for i in range(30)},
    "tuple": (1, "two", (3.0, b"four")),
    "int-list": list(range(1000)),
}
# Dicts and lists whose compact form (see `python/value/compact.rs`) fits in 512 bytes.
COMPACT = ["small-dict", "nested"]
OBJECTS = [i for i in STRUCTURAL if i not in COMPACT]


@pytest.mark.parametrize(
    "value",
    [STRUCTURAL[i] for i in OBJECTS],
    ids=OBJECTS,
)
def test_structural_values_are_weighed_at_least_as_python_holds_them(value: Any):
    """What a plain value is charged is close to CPython's own size of what the store holds."""
    c = make(MAX_BYTES=10**9)
    c.set("k", None)
    base = c.stats()["bytes"]
    c.set("k", value)
    charged = c.stats()["bytes"] - base
    python_size = deep_sizeof(value)
    # The store holds the atoms and dicts of atoms as Python objects and the rest as Rust nodes
    # smaller than Python's lists: never less than half of Python's size, never wildly more.
    assert python_size // 2 <= charged <= 3 * python_size, (charged, python_size)


@pytest.mark.parametrize("value", [STRUCTURAL[i] for i in COMPACT], ids=COMPACT)
def test_small_plain_values_are_held_as_compact_bytes(value: Any):
    """A small dict or list is kept as bytes in the entry's block: the whole entry costs less than
    half of the Python objects it stands for, and every byte of its content is charged. (Under
    "lru": W-TinyLFU's sketch, charged to the store too, is no part of the entry.)"""
    c = make(MAX_BYTES=10**9, EVICTION_POLICY="lru")
    c.set("k", value)
    total = c.stats()["bytes"]
    assert len(pickle.dumps(value)) // 2 <= total <= deep_sizeof(value) // 2, total
    c.set("k", [value, "e" * 200])  # 200 more bytes of content
    assert c.stats()["bytes"] - total >= 200
    got = c.get("k")
    assert shape(got) == shape(pickle.loads(pickle.dumps([value, "e" * 200])))


# Small dicts and lists kept as compact bytes (``python/value/compact.rs``) -------------------

I64 = 2**63
COMPACT_EDGES = [
    # A 127-byte str's tag is 0xFF, the form's first byte; 128 bytes take the long form.
    {"s127": "x" * 127, "s128": "y" * 128, "é": "é" * 40, "": ""},
    [-I64, I64 - 1, -1, 0, 1, 255, 256, -257, True, False, None],
    {"f": [-0.0, 0.0, float("inf"), float("-inf"), 5e-324, 1.7976931348623157e308]},
    {"b": b"\xff" * 10, "empty": b"", None: 1, 2.5: 2, b"k": 3, 7: 4, False: 5},
    [(1, [2, (3,)]), (), {"t": (None, "x")}],
    {"k" * 22: 1, "k" * 23: 2, "ü" * 11: 3},  # keys at the key cache's bound and past it
    # Refused by the compact form (stored as before), still exact:
    [I64, -I64 - 1],
    ["\ud800", {"a": "x\udfffy"}],
    [IntSub(1), {"d": DictSub(a=1)}, StrSub("s")],
    {(1, 2): "tuple key"},
    [[1], [1]] * 1,
    [b"x" * 600],
]


def nested_lists(depth: int) -> Any:
    v: Any = []
    for _ in range(depth):
        v = [v]
    return v


@pytest.mark.parametrize("value", [*COMPACT_EDGES, nested_lists(31), nested_lists(40)])
def test_small_values_come_back_exactly_as_pickle_gives_them(value: Any):
    c = make()
    c.set("k", value)
    got = c.get("k")
    want = pickle.loads(pickle.dumps(value))
    assert shape(got) == shape(want)
    assert got is not value and c.get("k") is not got


def test_values_met_twice_are_not_flattened_by_the_compact_form():
    c = make()
    inner = [1]
    c.set("k", [inner, inner, {"a": inner}])
    got = c.get("k")
    assert got[0] is got[1] is got[2]["a"]
    empty = ()
    c.set("t", [empty, empty])  # the empty tuple is a singleton: met twice
    assert shape(c.get("t")) == shape(pickle.loads(pickle.dumps([empty, empty])))


def test_the_key_cache_never_hands_out_a_wrong_key():
    """Many distinct dict keys (more than the cache's slots, colliding in them), read in turn."""
    c = make()
    values = {
        f"v{i}": {f"key-{i}": i, f"key-{i % 7}": str(i), "ö" * (i % 12): b"x"} for i in range(2000)
    }
    c.set_many(values)
    for _ in range(2):
        for k, v in values.items():
            got = c.get(k)
            assert got == v and list(got) == list(v), k


def test_compact_values_from_many_threads():
    c = make()
    values = {
        f"t{i}": {f"field{i % 300}": i, "name": f"row {i}", "ok": i % 2 == 0} for i in range(600)
    }
    c.set_many(values)

    def work() -> int:
        for _ in range(3):
            for k, v in values.items():
                assert c.get(k) == v
        return len(values)

    assert run_threads(4, work) == [("ok", 600)] * 4


def test_max_bytes_bounds_a_store_of_structural_values():
    limit = 100_000
    # At most 65,536 MAX_ENTRIES: one shard, whose LRU order is the store's (with more, MAX_BYTES
    # evicts from the inserting shard's least recently used end: see README).
    c = make(MAX_BYTES=limit, MAX_ENTRIES=10_000)
    for i in range(3000):
        c.set(f"k{i}", nested(i))
        assert c.stats()["bytes"] <= limit
    kept = [i for i in range(3000) if c.has_key(f"k{i}")]
    assert 0 < len(kept) < 3000
    assert kept == list(range(3000 - len(kept), 3000))  # the least recently used went first
    # 3000 entries would need far more: each is charged at least its content (compact bytes).
    assert len(kept) * len(pickle.dumps(nested(0))) // 2 <= limit
    too_big = {"rows": [nested(i) for i in range(200)]}
    assert c.set_many({"big": too_big}) == ["big"]
    assert not c.has_key("big")


def test_pickle_path_is_still_used_for_other_values():
    c = make()
    value = {"when": __import__("datetime").date(2024, 1, 2), "set": {1, 2}}
    c.set("k", value)
    got = c.get("k")
    assert got == value and got["set"] is not value["set"]
    assert pickle.loads(pickle.dumps(value)) == got
