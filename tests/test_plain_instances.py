"""Instances of plain classes are copied structurally: ``get`` makes the instance as
``pickle.loads`` would (``cls.__new__(cls)``, then its ``__dict__`` filled with a fresh copy of
the state, ``str`` keys interned) without pickling. Every other instance is pickled. Either way
the result must be exactly what a pickle round trip gives: same class, ``__dict__`` contents,
types and key order, nothing shared with the stored value or an earlier copy."""

from __future__ import annotations

import copyreg
import dataclasses
import enum
import gc
import importlib
import pickle
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
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
    return RustCache(f"inst-{uuid.uuid4().hex}", {"TIMEOUT": None, "OPTIONS": options})


def locmem() -> LocMemCache:
    return LocMemCache(f"inst-ref-{uuid.uuid4().hex}", {"TIMEOUT": None})


def round_trip(v: Any) -> Any:
    return pickle.loads(pickle.dumps(v, pickle.HIGHEST_PROTOCOL))


# Qualifying classes ------------------------------------------------------------------------


class Product:
    """The benchmark's kind of value: a small class with three attributes and methods."""

    kind = "product"

    def __init__(self, id: Any, name: Any, price: Any) -> None:
        self.id = id
        self.name = name
        self.price = price

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(self) == vars(other)

    __hash__ = None  # type: ignore[assignment]

    @property
    def label(self) -> str:
        return f"{self.name}"


class Special(Product):
    """A subclass of a plain class (its MRO: Special, Product, object)."""


class Mixin:
    def hello(self) -> str:
        return "hi"


class Both(Mixin, Product):
    """Multiple inheritance of plain classes."""


class Outer:
    class Inner:
        """A nested class: pickle finds it as ``Outer.Inner``."""


@dataclasses.dataclass
class Row:
    """A dataclass (no slots): a plain class for pickle."""

    id: Any = 0
    tags: Any = None


class Empty:
    """Instances without attributes: pickle writes no state."""


@dataclasses.dataclass(frozen=True)
class Frozen:
    """A frozen dataclass: pickle's BUILD fills ``__dict__`` directly, as we do."""

    a: Any
    b: Any


class Explicit:
    """Says object's defaults explicitly: still object's own hooks."""

    __reduce_ex__ = object.__reduce_ex__
    __reduce__ = object.__reduce__


QUALIFYING: list[Callable[..., Any]] = [
    lambda a, b: Product(a, b, 1.5),
    lambda a, b: Special(a, b, None),
    lambda a, b: Both(a, "x", b),
    lambda a, b: _with(Outer.Inner(), a=a, b=b),
    lambda a, b: Row(a, b),
    lambda a, b: Empty(),
    lambda a, b: _with(Explicit(), first=a, second=b),
    lambda a, b: _with(Empty(), **{"with space": a, "ünï": b}),
    lambda a, b: _int_keyed(a, b),
    lambda a, b: Frozen(a, b),
]


def _with(obj: Any, **attrs: Any) -> Any:
    obj.__dict__.update(attrs)
    return obj


def _int_keyed(a: Any, b: Any) -> Any:
    """An instance whose ``__dict__`` has a non-str key (allowed; pickle keeps it)."""
    obj = Empty()
    obj.__dict__[1] = a
    obj.__dict__["b"] = b
    return obj


# Non-qualifying classes: each breaks one rule, so pickle (whatever it does) decides -------


class Slotted:
    __slots__ = ("a", "b")

    def __init__(self, a: Any, b: Any) -> None:
        self.a, self.b = a, b


class SlotsDeleted:
    __slots__ = ("a", "__dict__")

    def __init__(self, a: Any, b: Any) -> None:
        self.a, self.b = a, b


del SlotsDeleted.__slots__


class GetState(Product):
    def __getstate__(self) -> Any:
        return {"id": "from getstate"}


class SetState(Product):
    def __setstate__(self, state: Any) -> None:
        self.__dict__.update(state, restored=True)


class Reduce(Product):
    def __reduce__(self) -> Any:
        return (Product, ("reduced", self.name, 0))


class ReduceEx(Product):
    def __reduce_ex__(self, protocol: Any) -> Any:
        return (Product, ("reduced_ex", self.name, protocol))


class NewArgs(Product):
    def __new__(cls, *args: Any) -> Any:
        obj = super().__new__(cls)
        obj.made_by_new = len(args)
        return obj

    def __getnewargs__(self) -> Any:
        return (1, 2)


class CustomNew(Product):
    def __new__(cls, *args: Any) -> Any:
        obj = super().__new__(cls)
        obj.made_by_new = True
        return obj


class GetAttr(Product):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return f"dynamic {name}"


class GetAttribute(Product):
    def __getattribute__(self, name: str) -> Any:
        return object.__getattribute__(self, name)


class ClassProperty(Product):
    @property  # type: ignore[misc]
    def __class__(self) -> Any:
        return ClassProperty


class Meta(type):
    pass


class WithMeta(metaclass=Meta):
    def __init__(self, a: Any, b: Any) -> None:
        self.a, self.b = a, b


class Error(Exception):
    pass


class DictSub(dict):
    pass


class Color(enum.Enum):
    RED = 1


class Registered(Product):
    """Pickled through ``copyreg.pickle``'s reducer."""


copyreg.pickle(Registered, lambda obj: (Product, ("registered", obj.name, 0)))


class Renamed(Product):
    """Its ``__qualname__`` names another class: pickle refuses it."""


Renamed.__qualname__ = "Product"


@dataclasses.dataclass(slots=True)
class SlotsRow:
    a: Any
    b: Any


def local_instance(a: Any, b: Any) -> Any:
    class Local:
        pass

    return _with(Local(), a=a, b=b)


NON_QUALIFYING: list[Callable[..., Any]] = [
    Slotted,
    lambda a, b: GetState(a, b, 0),
    lambda a, b: SetState(a, b, 0),
    lambda a, b: Reduce(a, b, 0),
    lambda a, b: ReduceEx(a, b, 0),
    lambda a, b: NewArgs(a, b, 0),
    lambda a, b: CustomNew(a, b, 0),
    lambda a, b: GetAttr(a, b, 0),
    lambda a, b: GetAttribute(a, b, 0),
    lambda a, b: ClassProperty(a, b, 0),
    WithMeta,
    lambda a, b: _with(Error("boom"), a=a, b=b),
    lambda a, b: DictSub(a=a, b=b),
    lambda a, b: Color.RED,
    lambda a, b: Registered(a, b, 0),
    SlotsRow,
    lambda a, b: _with(Empty(), __getstate__=fixed_state, b=b),
    lambda a, b: _with(Empty(), __reduce_ex__=fixed_reduce, b=b),
    lambda a, b: _with(Empty(), __dunder__=a, b=b),
]
# Classes pickle refuses: set raises pickle's error.
REFUSED: list[Callable[..., Any]] = [
    SlotsDeleted,
    lambda a, b: Renamed(a, b, 0),
    local_instance,
]


def fixed_state() -> Any:
    """An instance attribute ``__getstate__``: pickle calls it (unbound) for the state."""
    return {"from": "getstate"}


def fixed_reduce(protocol: Any) -> Any:
    """An instance attribute ``__reduce_ex__``: pickle calls it instead of object's."""
    return (Product, ("from reduce_ex", protocol, 0))


# Describing values exactly -------------------------------------------------------------------


def mutate(v: Any, seen: set[int] | None = None) -> None:
    """Change every mutable part reachable from ``v`` in place (instance attributes too)."""
    seen = set() if seen is None else seen
    if id(v) in seen:
        return
    seen.add(id(v))
    if isinstance(v, dict):
        for k in list(v):
            mutate(v[k], seen)
        v["__mutated__"] = True
    elif isinstance(v, list):
        for x in list(v):
            mutate(x, seen)
        v.append("mutated")
    elif isinstance(v, tuple):
        for x in v:
            mutate(x, seen)
    attrs = getattr(v, "__dict__", None)
    if isinstance(attrs, dict) and not isinstance(v, (type, enum.Enum)):
        for x in list(attrs.values()):
            mutate(x, seen)
        attrs["mutated_attr"] = True


def outcome(fn: Callable[[], Any]) -> Any:
    try:
        return ("ok", fn())
    except Exception as e:  # noqa: BLE001 - the exception is the result compared
        return ("raised", type(e), str(e).split(" at 0x")[0])


# Strategies ----------------------------------------------------------------------------------

atoms = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.binary(max_size=6),
)


def instances(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Qualifying instances, and (less often) non-qualifying ones, over ``inner`` attributes."""
    qualifying = st.builds(lambda f, a, b: f(a, b), st.sampled_from(QUALIFYING), inner, inner)
    other = st.builds(
        lambda f, a, b: f(a, b), st.sampled_from(NON_QUALIFYING + REFUSED), inner, inner
    )
    return st.one_of(qualifying, qualifying, other)


def twice(x: Any) -> Any:
    """A value holding ``x`` twice: pickle keeps the identity."""
    return [x, {"again": x}]


def self_cycle(x: Any) -> Any:
    obj = Product(x, "cycle", 0)
    obj.me = obj
    return obj


values = st.recursive(
    atoms,
    lambda inner: st.one_of(
        instances(inner),
        instances(inner),
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(st.text(max_size=4), inner, max_size=4),
        inner.map(twice),
        inner.map(self_cycle),
    ),
    max_leaves=20,
)

CACHE = make()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values)
def test_get_is_exactly_a_pickle_round_trip_and_isolated(value: Any) -> None:
    expected = outcome(lambda: shape(round_trip(value)))
    stored = outcome(lambda: CACHE.set("k", value))
    if expected[0] == "raised":
        # Pickle refuses it (a local class): so does set, with pickle's error; nothing stored.
        assert stored[:2] == expected[:2], (stored, expected)
        assert CACHE.get("k", "nothing") == "nothing"
        CACHE.delete("k")
        return
    assert stored == ("ok", None)
    got = CACHE.get("k")
    assert shape(got) == expected[1]
    assert shape(CACHE.get_many(["k"])["k"]) == expected[1]
    # Isolation: mutating the original or a returned copy never reaches the store.
    mutate(value)
    mutate(got)
    again = CACHE.get("k")
    assert shape(again) == expected[1]
    if isinstance(got, (list, dict)) or (hasattr(got, "__dict__") and type(got) is not Color):
        assert again is not got
    CACHE.delete("k")


# What takes which path -------------------------------------------------------------------------

FIND_CLASS: list[tuple[str, str]] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "pickle.find_class":
        FIND_CLASS.append(args)


sys.addaudithook(_audit)


def unpickled(fn: Callable[[], Any]) -> list[tuple[str, str]]:
    """The classes ``pickle.loads`` looked up while ``fn`` ran."""
    FIND_CLASS.clear()
    fn()
    found = list(FIND_CLASS)
    FIND_CLASS.clear()
    return found


@pytest.mark.parametrize("index", range(len(QUALIFYING)))
def test_qualifying_instances_are_not_pickled(index: int) -> None:
    c = make()
    value = QUALIFYING[index]([1, {"a": (2, [3])}], "two")
    c.set("k", value)
    assert unpickled(lambda: c.get("k")) == []
    got = c.get("k")
    assert type(got) is type(value) and shape(got) == shape(round_trip(value))


@pytest.mark.parametrize("index", range(len(NON_QUALIFYING)))
def test_other_instances_are_pickled(index: int) -> None:
    """Each class breaking one rule goes through pickle (whose ``loads`` looks the class up)."""
    c = make()
    value = NON_QUALIFYING[index]([1], "two")
    c.set("k", value)
    assert unpickled(lambda: c.get("k")) != []
    assert shape(c.get("k")) == shape(round_trip(value))


@pytest.mark.parametrize("index", range(len(REFUSED)))
def test_classes_pickle_refuses_fail_as_pickle_fails_and_store_nothing(index: int) -> None:
    c, ref = make(), locmem()
    for cache in (c, ref):
        cache.set("k", "old")
    value = {"rows": [REFUSED[index](1, 2)]}
    errors = []
    for cache in (c, ref):
        with pytest.raises(Exception) as info:
            cache.set("k", value)
        errors.append((type(info.value), str(info.value).split(" at 0x")[0]))
        assert cache.get("k") == "old"
    assert errors[0] == errors[1]


def test_unpicklable_attribute_fails_as_pickle_fails() -> None:
    c, ref = make(), locmem()
    value = Product(1, lambda: 0, threading.Lock())
    errors = []
    for cache in (c, ref):
        with pytest.raises(Exception) as info:
            cache.set("k", value)
        errors.append(type(info.value))
        assert not cache.has_key("k")
    assert errors[0] is errors[1]


def test_shared_instances_and_cycles_keep_their_identity() -> None:
    c = make()
    p = Product(1, "a", 2.0)
    c.set("k", {"x": p, "y": [p]})
    got = c.get("k")
    assert got["x"] is got["y"][0] and got["x"] is not p and type(got["x"]) is Product
    # Pickle keeps the state dict met again as the state, not as the new instance's __dict__.
    for value in ([p, p.__dict__], [p.__dict__, p]):
        c.set("dict", value)
        got = c.get("dict")
        assert shape(got) == shape(round_trip(value))
    cyc = self_cycle(3)
    c.set("cycle", cyc)
    got = c.get("cycle")
    assert got.me is got and got is not cyc


def test_nested_instances_come_back_fresh_and_typed() -> None:
    c = make()
    value = Product(1, Special(2, [Row(3, {"t": (Outer.Inner(),)})], 0.5), Empty())
    c.set("k", value)
    one, two = c.get("k"), c.get("k")
    assert shape(one) == shape(two) == shape(round_trip(value))
    assert one is not two and one.name is not two.name
    assert one.name.name[0] is not two.name.name[0]
    one.name.name[0].tags["t"] = "changed"
    one.name.__dict__.clear()
    assert shape(c.get("k")) == shape(two)


def test_attribute_names_are_interned_as_pickle_interns_them() -> None:
    c = make()
    name = "".join(["not", "_interned"])
    obj = Empty()
    obj.__dict__[name] = 1
    c.set("k", obj)
    (key,) = vars(c.get("k"))
    assert key == name and sys.intern(key) is key
    (ref_key,) = vars(round_trip(obj))
    assert sys.intern(ref_key) is ref_key


def test_depth_beyond_the_walk_falls_back_to_pickle() -> None:
    c = make()
    value: Any = "leaf"
    for i in range(50):
        value = Product(i, value, 0)
    c.set("k", value)
    assert unpickled(lambda: c.get("k")) != []
    assert shape(c.get("k")) == shape(round_trip(value))


def test_abstract_flag_raises_as_pickle_does() -> None:
    """A class that cannot be instantiated fails on get as ``pickle.loads`` does."""

    c, ref = make(), locmem()

    class_ = type("Abstractish", (), {"__module__": __name__})
    globals()["Abstractish"] = class_
    try:
        obj = class_()
        obj.a = 1
        for cache in (c, ref):
            cache.set("k", obj)
        class_.__abstractmethods__ = frozenset({"run"})
        errors = []
        for cache in (c, ref):
            with pytest.raises(TypeError) as info:
                cache.get("k")
            errors.append(str(info.value))
        assert errors[0] == errors[1]
    finally:
        del globals()["Abstractish"]


# Classes changed after set -----------------------------------------------------------------


MODULE_V1 = """
class Thing:
    def __init__(self, a, b):
        self.a = a
        self.b = b

class Keep:
    pass
"""

MODULE_V2 = """
class Thing:
    version = 2

    def __setstate__(self, state):
        self.__dict__.update(state, restored_by="v2")

class Keep:
    pass
"""


@pytest.fixture
def reloadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A module of our own on sys.path, written as ``MODULE_V1``."""
    name = f"reloadable_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(MODULE_V1)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    module = importlib.import_module(name)
    module.path = tmp_path / f"{name}.py"  # type: ignore[attr-defined]
    yield module
    sys.modules.pop(name, None)


def both(value: Any) -> tuple[RustCache, LocMemCache]:
    c, ref = make(), locmem()
    for cache in (c, ref):
        cache.set("k", value)
    return c, ref


def test_reload_gives_an_instance_of_the_new_class_as_pickle_does(reloadable: Any) -> None:
    old_class = reloadable.Thing
    c, ref = both({"t": reloadable.Thing(1, [2]), "k": reloadable.Keep()})
    assert unpickled(lambda: c.get("k")) == []
    reloadable.path.write_text(MODULE_V2)
    importlib.reload(reloadable)
    assert reloadable.Thing is not old_class
    got, expected = c.get("k"), ref.get("k")
    assert type(got["t"]) is reloadable.Thing and type(got["k"]) is reloadable.Keep
    assert vars(got["t"]) == vars(expected["t"]) == {"a": 1, "b": [2], "restored_by": "v2"}
    assert shape(got) == shape(expected)


def test_rebinding_the_name_is_seen_on_get(reloadable: Any) -> None:
    c, ref = both(reloadable.Thing(1, 2))
    reloadable.Thing = reloadable.Keep
    assert shape(c.get("k")) == shape(ref.get("k"))
    assert type(c.get("k")) is reloadable.Keep


def test_class_gone_from_its_module_fails_as_pickle_fails(reloadable: Any) -> None:
    c, ref = both([reloadable.Thing(1, 2)])
    del reloadable.Thing
    assert outcome(lambda: c.get("k")) == outcome(lambda: ref.get("k"))
    assert outcome(lambda: c.get("k"))[0] == "raised"


def test_module_gone_from_sys_modules_is_imported_again(reloadable: Any) -> None:
    c, ref = both(reloadable.Thing(1, 2))
    del sys.modules[reloadable.__name__]
    got, expected = c.get("k"), ref.get("k")
    assert type(got) is type(expected) is sys.modules[reloadable.__name__].Thing
    assert shape(got) == shape(expected)


def test_hooks_added_after_set(reloadable: Any) -> None:
    """What only ``pickle.dumps`` consults (``__reduce__``) was decided at set, as a stored
    pickle was; what ``pickle.loads`` consults (``__setstate__``, ``__getattr__``) counts."""
    thing = reloadable.Thing
    c, ref = both(thing(1, 2))
    thing.__reduce__ = lambda self: (int, (7,))
    assert shape(c.get("k")) == shape(ref.get("k"))
    assert type(c.get("k")) is thing
    del thing.__reduce__
    thing.__setstate__ = lambda self, state: self.__dict__.update(state, hooked=True)
    assert vars(c.get("k")) == vars(ref.get("k")) == {"a": 1, "b": 2, "hooked": True}
    del thing.__setstate__
    thing.__getattr__ = lambda self, name: lambda state: self.__dict__.update(seen=name)
    assert vars(c.get("k")) == vars(ref.get("k")) == {"seen": "__setstate__"}
    del thing.__getattr__
    assert vars(c.get("k")) == {"a": 1, "b": 2}


# Garbage collector, memory, threads ----------------------------------------------------------


def tracked_objects() -> int:
    gc.collect()
    return len(gc.get_objects())


def test_stored_instances_add_no_gc_tracked_objects() -> None:
    count = 1000
    c = make()
    before = tracked_objects()
    for i in range(count):
        c.set(f"k{i}", Product(i, f"name {i}", Row(i, [i, {"n": i}])))
    ours = tracked_objects() - before
    assert c.stats()["entries"] == count
    assert ours < count // 50, ours
    got = [c.get(f"k{i}") for i in range(count)]
    assert all(g.price.tags[1] == {"n": i} for i, g in enumerate(got))
    del got
    assert tracked_objects() - before < count // 50


def test_instances_are_weighed_and_bounded_by_max_bytes() -> None:
    c = make(MAX_BYTES=10**9)
    c.set("k", None)
    base = c.stats()["bytes"]
    c.set("k", Product(1, "apple", 1.5))
    small = c.stats()["bytes"] - base
    c.set("k", Product(1, "apple" * 200, [Product(i, i, i) for i in range(100)]))
    big = c.stats()["bytes"] - base
    assert 64 <= small < 1000, small
    assert big > 100 * small // 4 and big > 5000, (small, big)
    limit = 50_000
    bounded = make(MAX_BYTES=limit)
    for i in range(2000):
        bounded.set(f"k{i}", Product(i, f"name {i}", [i, i + 1]))
        assert bounded.stats()["bytes"] <= limit
    kept = sum(bounded.has_key(f"k{i}") for i in range(2000))
    assert 0 < kept < 2000


def test_concurrent_set_and_get_of_instances_never_mix_them() -> None:
    c = make()
    errors: list[str] = []

    def work(n: int) -> None:
        for i in range(1500):
            c.set(f"k{i % 5}", Product(n, i, Row(n, [i])))
            got = c.get(f"k{(i + n) % 5}")
            if got is not None:
                if type(got) is not Product or got.price != Row(got.id, [got.name]):
                    errors.append(repr(vars(got)))
                got.price.tags.append("mine")

    ids = iter(range(4))
    results = run_threads(4, lambda: work(next(ids)))
    assert all(status == "ok" for status, _ in results), results
    assert errors == []


class Base:
    pass


class OtherBase:
    def __setstate__(self, state: Any) -> None:
        self.__dict__.update(state, via="OtherBase")


class Changing(Base):
    pass


def test_class_changes_between_sets_are_seen() -> None:
    """Instances of one class share what set decided about it only while the class is the
    same: a hook added, or new bases, count from the next set (and new bases on get too)."""
    c, ref = make(), locmem()
    first = _with(Changing(), a=1)
    for cache in (c, ref):
        cache.set("first", first)
    assert unpickled(lambda: c.get("first")) == []
    Changing.__getstate__ = lambda self: {"from": "getstate"}  # type: ignore[attr-defined]
    try:
        for cache in (c, ref):
            cache.set("hooked", _with(Changing(), a=2))
        assert unpickled(lambda: c.get("hooked")) != []
        assert vars(c.get("hooked")) == vars(ref.get("hooked")) == {"from": "getstate"}
    finally:
        del Changing.__getstate__  # type: ignore[attr-defined]
    for cache in (c, ref):
        cache.set("again", _with(Changing(), a=3))
    assert unpickled(lambda: c.get("again")) == []
    Changing.__bases__ = (OtherBase,)
    try:
        # Stored before: get now sees OtherBase.__setstate__, as pickle.loads does.
        for key in ("first", "again"):
            assert shape(c.get(key)) == shape(ref.get(key))
            assert c.get(key).via == "OtherBase"
        for cache in (c, ref):
            cache.set("rebased", _with(Changing(), a=4))
        assert shape(c.get("rebased")) == shape(ref.get("rebased"))
    finally:
        Changing.__bases__ = (Base,)
    assert vars(c.get("first")) == {"a": 1}


def test_classes_made_at_run_time_are_not_kept_alive_by_the_store() -> None:
    """Entries hold their class; once they are gone, so is every reference the store had."""
    import weakref

    c = make()
    cls = type("Temporary", (), {"__module__": __name__})
    globals()["Temporary"] = cls
    c.set("k", _with(cls(), a=1))
    assert unpickled(lambda: c.get("k")) == []
    ref = weakref.ref(cls)
    del globals()["Temporary"], cls
    c.delete("k")
    gc.collect()
    assert ref() is None


def test_a_standard_library_plain_class_is_copied_structurally() -> None:
    """``argparse.Namespace`` (the memory test's instance) qualifies."""
    import argparse

    c = make()
    value = argparse.Namespace(id=1, name="apple", price=1.25)
    c.set("k", value)
    assert unpickled(lambda: c.get("k")) == []
    assert c.get("k") == value and c.get("k") is not value
