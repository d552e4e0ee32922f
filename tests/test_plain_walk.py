"""The walk that stores a plain value (``src/python/value/plain.rs``) on its cheaper paths: a
container held by one place is not remembered (so sharing must still be found through tuples
held twice), and a value past the node bound is counted early and pickled. Whatever path a value
takes, it must come back as a pickle round trip gives it, isolated from the caller."""

from __future__ import annotations

import pickle
import sys
import uuid
from typing import Any

import pytest

from django_rustcache import RustCache
from tests.describe import shape
from tests.threads import run_threads

# `MAX_NODES` in plain.rs: values holding more objects (a container's items, a dict's keys and
# values, counted for each place they are met) are pickled. The early count starts at 1/8 of it.
MAX_NODES = 100_000
COUNT_AT = MAX_NODES // 8


def make() -> RustCache:
    return RustCache(f"walk-{uuid.uuid4().hex}", {"TIMEOUT": None, "OPTIONS": {}})


class Row:
    """A plain class: its instances are stored structurally too."""


def row(i: int) -> Row:
    r = Row()
    r.id = i  # type: ignore[attr-defined]
    r.tags = ["a", "b"]  # type: ignore[attr-defined]
    return r


def nodes(v: Any) -> int:
    """The objects the walk counts in ``v`` below its root (see ``Walk::reserve``)."""
    t = type(v)
    if t is tuple or t is list:
        return len(v) + sum(nodes(x) for x in v)
    if t is dict:
        return 2 * len(v) + sum(nodes(k) + nodes(x) for k, x in v.items())
    if t is Row:
        return 2 * len(vars(v)) + sum(nodes(x) for x in vars(v).values())
    return 0


MARKER = (1, "marker")  # a tuple of atoms: kept and returned as is only by the structural form


def padded(items: list[Any], total: int) -> list[Any]:
    """``items`` and ``MARKER`` in a list, padded with ints so that the walk counts ``total``."""
    value = [*items, MARKER]
    missing = total - (1 + nodes(value))
    assert missing >= 0, missing
    value[-1:-1] = [0] * missing
    assert 1 + nodes(value) == total
    return value


def deep_wide(total: int) -> list[Any]:
    """A wide list 30 levels down (the walk refuses containers 32 levels down)."""
    bottom: list[Any] = []
    v: list[Any] = [bottom]
    for _ in range(28):
        v = [v]
    value = [v, MARKER]
    bottom.extend([0] * (total - 1 - nodes(value)))
    assert 1 + nodes(value) == total
    return value


SHAPES = {
    "ints": lambda total: padded([], total),
    "rows with tuple keys": lambda total: padded(
        [{(i, "k"): i, "name": f"row {i}", "vals": [i, i + 1]} for i in range(8000)], total
    ),
    "instances": lambda total: padded([row(i) for i in range(9000)], total),
    "one tuple of atoms met many times": lambda total: padded([tuple(range(40))] * 2000, total),
    "flat dicts": lambda total: padded([{"a": i, "b": str(i)} for i in range(15_000)], total),
    "deep and wide": deep_wide,
}


@pytest.mark.parametrize("name", SHAPES)
def test_values_at_the_node_bound_stay_structural_and_past_it_are_pickled(name: str):
    """The early count never refuses a value the walk takes (it counts no more than the walk),
    and both refuse the value one object past the bound."""
    c = make()
    at = SHAPES[name](MAX_NODES)
    c.set("at", at)
    got = c.get("at")
    assert got[-1] is MARKER, "a value at the bound must be stored structurally"
    assert shape(got) == shape(pickle.loads(pickle.dumps(at)))
    past = SHAPES[name](MAX_NODES + 1)
    c.set("past", past)
    got = c.get("past")
    assert got[-1] is not MARKER and got[-1] == MARKER, "a value past the bound is pickled"
    assert shape(got) == shape(pickle.loads(pickle.dumps(past)))


def test_a_value_far_past_the_bound_is_pickled_whole():
    c = make()
    value = [{"i": i, "l": [i]} for i in range(60_000)] + [MARKER]
    c.set("k", value)
    got = c.get("k")
    assert got == value and got[-1] is not MARKER


# Sharing and cycles, with containers held by one place (not remembered by the walk) ----------


def check_like_pickle(value: Any) -> Any:
    """Stores ``value`` and checks that it comes back as pickle gives it, and isolated."""
    c = make()
    c.set("k", value)
    got = c.get("k")
    want = pickle.loads(pickle.dumps(value))
    assert shape(got) == shape(want)
    assert shape(c.get("k")) == shape(want)
    return got


def test_lists_held_once_inside_a_tuple_held_twice_keep_their_identity():
    inner = ([1], {"d": [2]})
    got = check_like_pickle([inner, inner])
    assert got[0][0] is got[1][0] and got[0][1]["d"] is got[1][1]["d"]
    # The tuple held twice is itself inside tuples held once each.
    got = check_like_pickle([(inner,), (inner,)])
    assert got[0][0][0] is got[1][0][0]
    # Inside one tuple (held once) twice.
    got = check_like_pickle(((inner, inner),))
    assert got[0][0][0] is got[0][1][0]
    # A tuple held twice under another tuple held twice, a list at the bottom.
    deep = (([3],),)
    outer = (deep, deep)
    got = check_like_pickle({"a": outer, "b": [outer]})
    assert got["a"][0][0][0] is got["b"][0][1][0][0]


def test_a_tuple_held_elsewhere_too_but_met_once_is_copied_as_usual():
    kept_elsewhere = ([1, 2], "x")
    got = check_like_pickle([kept_elsewhere, ([1, 2], "x")])
    assert got[0][0] is not kept_elsewhere[0] and got[0] == got[1]


def test_sharing_and_cycles_past_the_early_count_are_kept():
    shared = {"s": [1]}
    rows: list[Any] = [{"i": i} for i in range(COUNT_AT)]
    got = check_like_pickle([shared, *rows, shared])
    assert got[0] is got[-1]
    cyclic: list[Any] = [{"i": i} for i in range(COUNT_AT)]
    cyclic.append(cyclic)
    c = make()
    c.set("k", cyclic)
    got = c.get("k")
    assert got[-1] is got and got is not cyclic and got[0] == {"i": 0}
    # The same list under a tuple held twice, far into a large value.
    inner = ([5],)
    got = check_like_pickle([*rows, inner, {"x": inner}])
    assert got[-2][0] is got[-1]["x"][0]


def test_large_structural_values_are_isolated_copies():
    c = make()
    value = {"rows": [{"id": i, "tags": [str(i)], "dims": {"w": i}} for i in range(20_000)]}
    c.set("k", value)
    one = c.get("k")
    assert one == value and one["rows"][0] is not value["rows"][0]
    value["rows"][0]["tags"].append("mutated")
    value["rows"].pop()
    one["rows"][1]["dims"]["w"] = -1
    one["rows"].clear()
    two = c.get("k")
    assert len(two["rows"]) == 20_000
    assert two["rows"][0]["tags"] == ["0"] and two["rows"][1]["dims"] == {"w": 1}


# Bad input ---------------------------------------------------------------------------------------


class Hostile:
    """Raises if anything hashes or compares it: storing it must do neither."""

    def __hash__(self) -> int:
        raise RuntimeError("hashed")

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("compared")


def test_objects_whose_hash_and_eq_raise_are_copied_without_being_called():
    c = make()
    for value in (
        [Hostile()],
        [*({"i": i} for i in range(COUNT_AT + 10)), Hostile()],
        [*({"i": i} for i in range(MAX_NODES)), Hostile()],  # past the bound: pickled
        {"a": [[1], Hostile()]},
    ):
        c.set("k", value)
        got = c.get("k")
        last, original = (got, value) if isinstance(got, list) else (got["a"], value["a"])
        assert type(last[-1]) is Hostile and last[-1] is not original[-1]
        assert len(last) == len(original)


def test_huge_ints_and_depth_bounds_in_large_values():
    big = 7**20_000
    value = [*range(COUNT_AT + 5), big, -big, {"k": [big]}]
    got = check_like_pickle(value)
    assert got[-3] == big and got[-1]["k"][0] == big
    # Nested past the depth bound (32 levels) at the end of a large value: pickled, still exact.
    deep: Any = [1]
    for _ in range(40):
        deep = [deep]
    check_like_pickle([*({"i": i} for i in range(COUNT_AT)), deep])


def test_threads_storing_large_values_each_get_their_own_back():
    c = make()

    def work() -> int:
        n = 0
        for j in range(4):
            key = f"{uuid.uuid4().hex}"
            value = [{"i": i, "j": j, "l": [i]} for i in range(COUNT_AT + 100)]
            c.set(key, value)
            got = c.get(key)
            assert got == value and got[0] is not value[0]
            n += 1
        return n

    assert run_threads(4, work) == [("ok", 4)] * 4


# Weight ------------------------------------------------------------------------------------------


def charged(value: Any) -> int:
    c = RustCache(f"walk-{uuid.uuid4().hex}", {"TIMEOUT": None, "OPTIONS": {"MAX_BYTES": 10**9}})
    c.set("k", value)
    return c.stats()["bytes"]


def test_small_atoms_met_again_are_charged_again_large_ones_once():
    """An atom of at most 64 bytes is charged at each place holding it (no lookup); a larger
    one once per value. Either way the charge never falls below what the store holds."""
    n = 2000
    small = "s" * (n // 1000)  # a 2-character str: 64 bytes or less on every version
    others = [small + str(i) for i in range(n)]
    repeated = charged([small] * n + others)
    distinct = charged([small + "x" for _ in range(n)] + others)
    assert repeated == distinct
    big = "b" * n
    once = charged([big] * 50)
    fifty = charged([big + str(i) for i in range(50)])
    assert once < fifty // 10
    assert once >= len(big)


def str_charge(s: str) -> int:
    """CPython's block for ``s`` (pymalloc's 16-byte steps up to 512 bytes, then malloc's
    chunk), plus for a non-ASCII one the block of the UTF-8 copy that storing it caches."""

    def block(n: int) -> int:
        return -(-n // 16) * 16 if n <= 512 else max(32, (n + 8 + 15) // 16 * 16)

    fresh = (s + ".")[:-1]  # an equal str without a UTF-8 copy yet
    utf8 = 0 if s.isascii() else block(len(s.encode("utf-8")) + 1)
    return block(sys.getsizeof(fresh)) + utf8


@pytest.mark.parametrize("n", [0, 2, 7, 8, 9, 23, 24, 25, 40, 47, 100, 463, 464, 465, 3000])
@pytest.mark.parametrize("char", ["a", "é", "€", "😀"])
def test_strs_are_charged_their_cpython_size(n: int, char: str):
    """The walk reads a compact ASCII str's length from the object (``sizes::ascii_len``) and
    asks the C API for any other: either way a str costs its CPython block(s)."""
    count = 40
    strs = [f"{i:03d}" + char * n for i in range(count)]
    base = [f"{i:03d}" for i in range(count)]
    # Past the compact form's 512 bytes (the walk's path); not interned (its share would vary).
    pad = ["pad " * 200]
    extra = charged([*strs, *pad]) - charged([*base, *pad])
    assert extra == sum(str_charge(s) - str_charge(b) for s, b in zip(strs, base, strict=True))
