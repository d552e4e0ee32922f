"""The references a stored plain value holds (``plain::Flat``: one buffer of words, each atom's
word owning a reference): one per place an atom is met while the value is stored, none once it
is replaced or deleted, and none left behind by a walk that gave up half way (the value is then
pickled, and a pickle holds no object). A word released twice would free a live object; one
never released leaks it."""

from __future__ import annotations

import gc
import random
import sys
import uuid
from typing import Any

from django_rustcache import RustCache
from tests.threads import run_threads


def make() -> RustCache:
    return RustCache(f"refs-{uuid.uuid4().hex}", {"TIMEOUT": None, "OPTIONS": {}})


def fresh(tag: str) -> str:
    """A str made at run time (not interned, not cached): only this test holds it."""
    return "x" * 80 + tag + uuid.uuid4().hex


class Item:
    """A plain class: its instances are stored structurally, their state after their word."""


def counts(*objs: Any) -> list[int]:
    return [sys.getrefcount(o) for o in objs]


def test_each_place_an_atom_is_met_holds_one_reference_until_the_value_goes() -> None:
    c = make()
    a, inner = fresh("a"), fresh("inner")
    f = 1.5 + random.random()
    big = 10**40 + random.randrange(1000)
    t = (inner, 3)  # a tuple of atoms: kept as is, its items' words dropped (they hold nothing)
    item = Item()
    item.name = a  # type: ignore[attr-defined]
    item.parts = [f, t]  # type: ignore[attr-defined]
    value = {
        "list": [a, a, f, t, big],
        "tuple": (a, [f]),  # a tuple holding a container: rebuilt, its items held
        "flat": {"k": a, "f": f},  # a dict of scalars: the store's own copy holds a and f
        "nested": [[a], {"x": t, "y": [big]}],
        "item": item,
    }
    before = counts(a, inner, f, big, t)
    c.set("k", value)
    # a: list 2, tuple 1, flat copy 1, nested 1, item 1; f: list 1, tuple 1, flat copy 1, item 1;
    # big: 2; t: list 1, nested 1, item 1; inner: none (only its tuple holds it).
    want = [b + n for b, n in zip(before, [6, 0, 4, 2, 3], strict=True)]
    assert counts(a, inner, f, big, t) == want
    c.set("k", value)  # overwritten: the old copy's references go
    assert counts(a, inner, f, big, t) == want
    got = c.get("k")
    assert got == {**value, "item": got["item"]} and vars(got["item"]) == vars(item)
    assert got["list"][3] is t and got["nested"][0] is not value["nested"][0]
    del got
    gc.collect()
    assert counts(a, inner, f, big, t) == want
    c.delete("k")
    assert counts(a, inner, f, big, t) == before


def test_a_walk_that_gives_up_half_way_keeps_no_reference() -> None:
    a, inner = fresh("a"), fresh("inner")
    t = (inner, 1)
    bad_state = Item()
    bad_state.ok = [a, t]  # type: ignore[attr-defined]
    vars(bad_state)["__dunder__"] = a  # a dunder attribute: the instance is pickled
    refused = [
        [a, t, {"k": [a, t]}, object()],  # an object that is not plain, last
        {"x": [a], "y": {"z": (a, [t])}, frozenset([1]): a},  # a key that is not an atom
        [a, t, bad_state],
        {"deep": [[[a]]], "later": bytearray(b"x")},
    ]
    c = make()
    before = counts(a, inner, t, Item)
    for i, value in enumerate(refused):
        c.set(f"k{i}", value)
        got = c.get(f"k{i}")
        assert got is not value and type(got) is type(value)
        del got
    gc.collect()
    # Pickled (a pickle holds no object): the walk's words were all released.
    assert counts(a, inner, t, Item) == before


def test_values_replaced_and_deleted_from_many_threads_release_every_reference() -> None:
    c = make()
    a = fresh("a")
    inner = fresh("inner")
    t = (inner, 2)
    before = counts(a, t, inner)

    def work() -> int:
        for i in range(200):
            key = f"k{i % 7}"
            c.set(key, {"rows": [{"a": a, "t": t, "l": [a]} for _ in range(5)], "i": i})
            got = c.get(key)
            if got is not None:
                assert got["rows"][0]["a"] is a and got["rows"][0]["t"] is t
            if i % 3 == 0:
                c.delete(key)
        return 0

    assert run_threads(4, work) == [("ok", 0)] * 4
    c.clear()
    gc.collect()
    assert counts(a, t, inner) == before
