"""Differential property tests: ``RustCache`` must behave exactly like Django's ``LocMemCache``.

Hypothesis drives random sequences of cache operations against both backends side by side and
requires, step by step:

* identical results (compared through a type-exact canonical form that also records which parts
  of a returned value are shared, so ``[x, x]`` and ``[x, copy(x)]`` differ and ``True != 1``);
* identical warnings (category and text; see ``RUSTCACHE_DIFF_STRICT_WARNINGS`` below);
* identical exception types, and identical messages unless the message holds a memory address;
* identity of the ``default`` object on a miss (``get(key, sentinel) is sentinel``);
* isolation: mutating a value after ``set`` or mutating what ``get`` returned never leaks into
  the store.

The reference is LocMemCache as it behaves (``set`` on a full cache culls even when the key
exists, keys may be any ``str``, lone surrogates too), with the differences RustCache documents
in its README, applied by ``ReferenceLocMemCache``: an entry whose deadline has already passed
when it is stored (timeout <= 0) is not kept (LocMemCache keeps an unreadable entry, which its
``delete`` then reports as deleted and which counts towards MAX_ENTRIES), ``delete`` of an
expired entry returns False, and a cull first drops expired entries. LocMemCache inherits
BaseCache's generic ``aincr``, which re-sets the value with the default timeout; the reference
for ``aincr``/``adecr`` is the sync ``incr`` with the async fallback's "not found" message (see
``_aincr_reference``).

``test_differential`` runs a stateful machine over the whole API (sync and ``a*`` async twins,
positional and keyword calls, two instances per LOCATION with independently drawn KEY_PREFIX,
VERSION, TIMEOUT and KEY_FUNCTION, warnings recorded or turned into errors) with MAX_ENTRIES
high enough that nothing is culled. ``test_cull_matches_locmem`` uses tiny MAX_ENTRIES /
CULL_FREQUENCY values and compares set/get/has_key (and, in the wider variants, every other
operation) so that the LRU order and Django's cull rule must match too.

Environment variables:

``RUSTCACHE_DIFF_BACKEND``
    dotted path of the backend under test (default ``django_rustcache.RustCache``). Set it to
    ``django.core.cache.backends.locmem.LocMemCache`` to check the test itself. When the default
    package is not installed the module is skipped; an explicitly named backend must import.
``RUSTCACHE_DIFF_EXAMPLES`` / ``RUSTCACHE_DIFF_CULL_EXAMPLES``
    hypothesis ``max_examples`` (default 200 each).
``RUSTCACHE_DIFF_STRICT_WARNINGS``
    ``1`` compares the full list of warnings an operation emits. By default repeated identical
    warnings within one operation are collapsed (LocMemCache's inherited ``get_or_set`` validates
    the same key three times; Python's default filters only ever show one of them).
"""

from __future__ import annotations

import asyncio
import copy
import os
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest
from django.core.cache.backends.base import DEFAULT_TIMEOUT, BaseCache
from django.core.cache.backends.locmem import LocMemCache
from django.utils.module_loading import import_string
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    rule,
    run_state_machine_as_test,
)

# Hypothesis warns when it builds the (exponential) repr of the recursive value strategy.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

# --------------------------------------------------------------------------------------------
# Backend under test
# --------------------------------------------------------------------------------------------

BACKEND_PATH = os.environ.get("RUSTCACHE_DIFF_BACKEND", "django_rustcache.RustCache")


def _load_backend() -> type[BaseCache]:
    try:
        return import_string(BACKEND_PATH)
    except ModuleNotFoundError as exc:
        top = BACKEND_PATH.split(".", 1)[0]
        if "RUSTCACHE_DIFF_BACKEND" in os.environ or exc.name != top:
            raise
        pytest.skip(f"{BACKEND_PATH} is not installed: {exc}", allow_module_level=True)


Backend = _load_backend()
BACKEND_NAME = Backend.__name__ if Backend is not LocMemCache else "LocMemCache(under test)"

MAX_EXAMPLES = int(os.environ.get("RUSTCACHE_DIFF_EXAMPLES", "200"))
CULL_EXAMPLES = int(os.environ.get("RUSTCACHE_DIFF_CULL_EXAMPLES", "200"))
STRICT_WARNINGS = os.environ.get("RUSTCACHE_DIFF_STRICT_WARNINGS", "") not in ("", "0")
NO_CULL_OPTIONS = {"MAX_ENTRIES": 100_000, "CULL_FREQUENCY": 3}


class ReferenceLocMemCache(LocMemCache):
    """LocMemCache with RustCache's documented differences on already-expired entries.

    LocMemCache stores an entry whose deadline has passed (timeout <= 0, or ``touch`` with one) and
    keeps it until something reads it; RustCache never keeps one. Everything else is LocMemCache's.
    """

    def _set(self, key: str, value: Any, timeout: Any = DEFAULT_TIMEOUT) -> None:
        super()._set(key, value, timeout)
        if self._has_expired(key):
            del self._cache[key]
            del self._expire_info[key]

    def _delete(self, key: str) -> bool:
        if key in self._cache and self._has_expired(key):
            del self._cache[key]
            del self._expire_info[key]
            return False
        return super()._delete(key)

    def _cull(self) -> None:
        now = time.time()
        for key in [k for k, exp in self._expire_info.items() if exp is not None and exp <= now]:
            del self._cache[key]
            del self._expire_info[key]
        if len(self._cache) >= self._max_entries:
            super()._cull()


# --------------------------------------------------------------------------------------------
# Values: classes defined here, so both backends pickle them by reference to this module
# --------------------------------------------------------------------------------------------


class _Omit:
    """Marker for "leave this argument out of the call"."""

    def __repr__(self) -> str:
        return "OMIT"

    def __deepcopy__(self, memo: dict[int, Any]) -> _Omit:
        return self


OMIT: Any = _Omit()


class MyDict(dict):
    """A dict subclass (pickle must keep the class)."""


class MyList(list):
    """A list subclass."""


class MyStr(str):
    """A str subclass."""


class MyInt(int):
    """An int subclass: ``MyInt(5) + 1`` is a plain ``int``."""


class Point:
    """A small user class with instance attributes."""

    def __init__(self, x: Any, y: Any) -> None:
        self.x = x
        self.y = y

    def __repr__(self) -> str:
        return f"Point({self.x!r}, {self.y!r})"


class PointSub(Point):
    """A subclass of a plain class: copied structurally, like ``Point``."""


@dataclass
class Pair:
    """A dataclass (no slots): a plain class too."""

    a: Any
    b: Any


class RestoredPoint(Point):
    """Has ``__setstate__``: pickled, and ``pickle.loads`` calls it."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.restored = True


class SlottedPoint:
    """Has ``__slots__`` (and so no ``__dict__``): pickled."""

    __slots__ = ("x", "y")

    def __init__(self, x: Any, y: Any) -> None:
        self.x = x
        self.y = y

    def __getstate__(self) -> Any:
        return (None, {"x": self.x, "y": self.y})

    def __eq__(self, other: object) -> bool:
        return type(other) is SlottedPoint and (self.x, self.y) == (other.x, other.y)

    __hash__ = None  # type: ignore[assignment]


class Unpicklable:
    """Pickling it raises ``pickle.PicklingError`` with a fixed message."""

    def __reduce__(self) -> Any:
        import pickle

        raise pickle.PicklingError("Unpicklable refuses to be pickled")

    def __deepcopy__(self, memo: dict[int, Any]) -> Unpicklable:
        return Unpicklable()

    def __repr__(self) -> str:
        return "Unpicklable()"


class Sentinel:
    """Marker in generated arguments: each side gets its own fresh ``object()``."""

    def __repr__(self) -> str:
        return "SENTINEL"


SENTINEL = Sentinel()


@dataclass(frozen=True)
class CallableDefault:
    """Marker for a callable ``get_or_set`` default returning a fresh copy of ``value``."""

    value: Any


def custom_key_func(key: Any, key_prefix: str, version: Any) -> str:
    """A KEY_FUNCTION different from Django's default one."""
    return f"custom|{key_prefix}|{version}|{key}"


# Numbers (and non-numbers) that make incr/decr interesting.
INCR_VALUES: list[Any] = [
    0,
    1,
    -1,
    41,
    2**31 - 1,
    2**53 + 1,
    2**63 - 2,
    2**63 - 1,
    2**63,
    -(2**63),
    -(2**63) + 1,
    -(2**63) - 1,
    2**64 - 1,
    2**64,
    2**64 + 1,
    -(2**64),
    10**30,
    True,
    False,
    1.5,
    -0.5,
    2.0**63,
    float("inf"),
    float("nan"),
    Decimal("1.25"),
    1 + 2j,
    MyInt(7),
    "a",
    "12",
    MyStr("s"),
    b"1",
    None,
    [1],
    (1,),
    {"a": 1},
    Point(1, 2),
]
DELTAS: list[Any] = [
    OMIT,
    1,
    -1,
    0,
    2,
    10,
    2**31,
    2**63 - 1,
    2**63,
    -(2**63),
    2**64,
    -(2**64),
    10**20,
]
BIG_VALUES: list[Any] = ["s" * 20_000, "日" * 5_000, b"\x00\xff" * 35_000, list(range(2_000))]


def _big_value(index: int) -> Any:
    return BIG_VALUES[index]


big_values_st = st.integers(0, len(BIG_VALUES) - 1).map(_big_value)

KEY_POOL: list[Any] = [
    "a",
    "b",
    "key",
    "a:b",
    "",
    "1",
    1,
    2,
    0,
    -1,
    2**70,
    True,
    "True",
    "with space",
    "tab\tkey",
    "nl\nkey",
    "\x00nul",
    "del\x7f",
    "ünïcødé",
    "日本語",
    "emoji😀",
    "lone\udcffsurrogate",
    # The old store text of the key above (U+FFFF + its surrogatepass bytes), and the new one.
    "lone\uffffed\uffffb3\uffffbfsurrogate",
    "lone\uffffdcffsurrogate",
    "x" * 246,
    "x" * 247,
    "x" * 248,
    "é" * 248,
    "日" * 247,
    "😀" * 247,
    "😀" * 248,
    "y" * 300 + " z",
]
VERSIONS: list[Any] = [None, None, None, None, 1, 2, 3, 0]
STATE_VERSIONS: list[Any] = [None, -1, 0, 1, 2, 3, 4, 5]
TIMEOUTS: list[Any] = [
    OMIT,
    DEFAULT_TIMEOUT,
    None,
    3600,
    86_400.5,
    31_536_000,
    10**10,
    sys.maxsize,
    0,
    0.0,
    -1,
    -0.5,
    -(10**10),
]


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------

HOT_KEYS: list[Any] = ["a", 1, "日本語", "x" * 248]


pool_keys_st = st.sampled_from(KEY_POOL)
hot_keys_st = st.sampled_from(HOT_KEYS)
keys_st: st.SearchStrategy[Any] = st.one_of(
    hot_keys_st,
    hot_keys_st,
    pool_keys_st,
    st.text(max_size=6),
    st.integers(min_value=-3, max_value=300),
)
versions_st = st.sampled_from(VERSIONS)
timeouts_st = st.sampled_from(TIMEOUTS)

_scalars: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from(INCR_VALUES),
    st.floats(),
    st.text(max_size=12),
    st.binary(max_size=12),
    st.builds(MyStr, st.text(max_size=6)),
    st.builds(MyInt, st.integers(min_value=-(2**70), max_value=2**70)),
    st.builds(bytearray, st.binary(max_size=6)),
    st.frozensets(st.integers(-5, 5), max_size=4),
    st.sets(st.integers(-5, 5), max_size=4),
)


def _shared(child: Any) -> list[Any]:
    return [child, child, {"again": child}]


_dict_keys = st.one_of(st.text(max_size=5), st.integers(-3, 3))
_nested: st.SearchStrategy[Any] = st.recursive(
    _scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.tuples(children, children),
        st.dictionaries(_dict_keys, children, max_size=4),
        st.builds(MyList, st.lists(children, max_size=3)),
        st.builds(MyDict, st.dictionaries(_dict_keys, children, max_size=3)),
        st.builds(Point, children, children),
        st.builds(PointSub, children, children),
        st.builds(Pair, children, children),
        st.builds(RestoredPoint, children, children),
        st.builds(SlottedPoint, children, children),
        st.builds(_shared, children),
    ),
    max_leaves=10,
)
values_st: st.SearchStrategy[Any] = st.one_of(
    _nested,
    _nested,
    st.sampled_from(INCR_VALUES),
    big_values_st,
    st.builds(Unpicklable),
)
get_defaults_st = st.one_of(
    st.just(SENTINEL),
    st.just(SENTINEL),
    st.just(OMIT),
    st.sampled_from([None, 0, "dflt", MyStr("d")]),
    st.builds(list),
    st.builds(lambda: {"d": [1]}),
    st.builds(Point, st.just(0), st.just(0)),
)
get_or_set_defaults_st = st.one_of(values_st, st.builds(CallableDefault, values_st))


@dataclass(frozen=True)
class How:
    """How to issue a call: sync or the ``a*`` twin, argument style, which instance."""

    api: str  # "sync" | "async"
    style: str  # "pos" | "kw" | "allkw"
    instance: int  # 0 | 1 (two instances share one LOCATION)


hows_st = st.builds(
    How,
    api=st.sampled_from(["sync", "sync", "async"]),
    style=st.sampled_from(["pos", "kw", "allkw"]),
    instance=st.sampled_from([0, 0, 1]),
)


def _instance_params(draw_from: dict[str, Any]) -> dict[str, Any]:
    params = {k: v for k, v in draw_from.items() if v is not OMIT}
    params["OPTIONS"] = dict(NO_CULL_OPTIONS)
    return params


instance_params_st = st.fixed_dictionaries(
    {
        "TIMEOUT": st.sampled_from([OMIT, 300, None, 3600, 0, -1, "60", 7.9]),
        "KEY_PREFIX": st.sampled_from([OMIT, "", "pfx", "sp ace"]),
        "VERSION": st.sampled_from([OMIT, 1, 2]),
        "KEY_FUNCTION": st.sampled_from([OMIT, None, custom_key_func]),
    }
).map(_instance_params)


# --------------------------------------------------------------------------------------------
# Canonical form, mutation, capture
# --------------------------------------------------------------------------------------------

_ATOMS = (type(None), bool, int, str, bytes)


def _type_name(t: type) -> str:
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def canon(obj: Any, memo: dict[int, int] | None = None) -> Any:
    """A type-exact, comparable description of ``obj`` that records sharing of mutable parts."""
    if memo is None:
        memo = {}
    t = type(obj)
    if t in _ATOMS:
        return (t.__name__, obj)
    if t is float:
        return ("float", obj.hex())
    if t is complex:
        return ("complex", obj.real.hex(), obj.imag.hex())
    if t is Decimal:
        return ("Decimal", str(obj))
    if t is tuple:
        return ("tuple", tuple(canon(x, memo) for x in obj))
    if t is frozenset:
        return ("frozenset", tuple(sorted(repr(canon(x, {})) for x in obj)))
    # Anything else can be mutated (or carries a __dict__): track identity.
    if id(obj) in memo:
        return ("ref", memo[id(obj)])
    memo[id(obj)] = len(memo)
    parts: list[Any] = [_type_name(t), memo[id(obj)]]
    if isinstance(obj, dict):
        parts.append(tuple((canon(k, memo), canon(v, memo)) for k, v in obj.items()))
    elif isinstance(obj, (list, tuple)):
        parts.append(tuple(canon(x, memo) for x in obj))
    elif isinstance(obj, (set, frozenset)):
        parts.append(tuple(sorted(repr(canon(x, {})) for x in obj)))
    elif isinstance(obj, (bytes, bytearray)):
        parts.append(bytes(obj))
    elif isinstance(obj, str):
        parts.append(str(obj))
    elif isinstance(obj, int):
        parts.append(int(obj))
    elif isinstance(obj, float):
        parts.append(float(obj).hex())
    attrs = getattr(obj, "__dict__", None)
    if isinstance(attrs, dict):
        parts.append(tuple((k, canon(v, memo)) for k, v in attrs.items()))
    slots = t.__dict__.get("__slots__", ())
    if slots and not isinstance(slots, str):
        parts.append(tuple((n, canon(getattr(obj, n, None), memo)) for n in slots))
    return tuple(parts)


def has_mutable(obj: Any) -> bool:
    """Whether ``obj`` has a part whose identity matters (a mutable or attribute-bearing part)."""
    t = type(obj)
    if t in _ATOMS or t in (float, complex, Decimal):
        return False
    if t in (tuple, frozenset):
        return any(has_mutable(x) for x in obj)
    return True


def mutate(obj: Any, seen: set[int] | None = None) -> None:
    """Mutate every mutable part of ``obj`` in place."""
    if seen is None:
        seen = set()
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        for v in list(obj.values()):
            mutate(v, seen)
        obj["__mutated__"] = True
    elif isinstance(obj, list):
        for v in list(obj):
            mutate(v, seen)
        obj.append("__mutated__")
    elif isinstance(obj, (tuple, frozenset)):
        for v in obj:
            mutate(v, seen)
    elif isinstance(obj, set):
        obj.add("__mutated__")
    elif isinstance(obj, bytearray):
        obj.extend(b"!")
    attrs = getattr(obj, "__dict__", None)
    if isinstance(attrs, dict) and not isinstance(obj, type):
        for v in list(attrs.values()):
            mutate(v, seen)
        attrs["__mutated__"] = True


def _exc_description(exc: BaseException) -> tuple[str, str]:
    message = str(exc)
    if "0x" in message:  # memory addresses: not deterministic
        message = "<message with an address>"
    return (_type_name(type(exc)), message)


def capture(fn: Callable[[], Any], warn_mode: str = "always") -> tuple[Any, ...]:
    """Run ``fn`` (which returns a canonical result); describe its result, exception, warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter(warn_mode)
        try:
            outcome: tuple[Any, ...] = ("ok", fn())
        except (KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except BaseException as exc:  # noqa: B036 - PyO3's PanicException is a BaseException
            outcome = ("raise", *_exc_description(exc))
    seen: list[tuple[str, str]] = []
    for w in caught:
        item = (_type_name(w.category), str(w.message))
        if STRICT_WARNINGS or item not in seen:
            seen.append(item)
    return (*outcome, ("warnings", tuple(seen)))


def _format_mismatch(label: str, outcomes: list[tuple[Any, ...]]) -> str:
    return (
        f"{label} differs between backends\n"
        f"  LocMemCache: {outcomes[0]!r}\n"
        f"  {BACKEND_NAME}: {outcomes[1]!r}"
    )


SIGNATURES: dict[str, tuple[str, ...]] = {
    "add": ("key", "value", "timeout", "version"),
    "get": ("key", "default", "version"),
    "set": ("key", "value", "timeout", "version"),
    "touch": ("key", "timeout", "version"),
    "delete": ("key", "version"),
    "get_many": ("keys", "version"),
    "set_many": ("data", "timeout", "version"),
    "delete_many": ("keys", "version"),
    "get_or_set": ("key", "default", "timeout", "version"),
    "has_key": ("key", "version"),
    "incr": ("key", "delta", "version"),
    "decr": ("key", "delta", "version"),
    "incr_version": ("key", "delta", "version"),
    "decr_version": ("key", "delta", "version"),
    "clear": (),
    "close": (),
}


def invoke(
    cache: BaseCache,
    method: str,
    args: dict[str, Any],
    how: How,
    loop: asyncio.AbstractEventLoop,
) -> Any:
    """Call ``cache.<method>`` (or its ``a*`` twin) with ``args`` in the style ``how`` asks for."""
    positional: list[Any] = []
    keywords: dict[str, Any] = {}
    can_be_positional = True
    for index, name in enumerate(SIGNATURES[method]):
        value = args.get(name, OMIT)
        if value is OMIT:
            can_be_positional = False
            continue
        if can_be_positional and (how.style == "pos" or (how.style == "kw" and index == 0)):
            positional.append(value)
        else:
            can_be_positional = False
            keywords[name] = value
    if how.api == "async" and uses_generic_aincr(cache, method):
        return _aincr_reference(cache, method, args, positional, keywords)
    if how.api == "async":
        return loop.run_until_complete(getattr(cache, "a" + method)(*positional, **keywords))
    return getattr(cache, method)(*positional, **keywords)


def uses_generic_aincr(cache: BaseCache, method: str) -> bool:
    """Whether ``a<method>`` is BaseCache's generic aincr/adecr (as on LocMemCache)."""
    if method not in ("incr", "decr"):
        return False
    return type(cache).aincr is BaseCache.aincr and type(cache).adecr is BaseCache.adecr


def _aincr_reference(
    cache: BaseCache,
    method: str,
    args: dict[str, Any],
    positional: list[Any],
    keywords: dict[str, Any],
) -> Any:
    """The reference behaviour of ``aincr``/``adecr`` for a backend using BaseCache's fallback.

    BaseCache.aincr is get + set: it re-sets the value with the *default* timeout, so the key
    loses its expiry (observable when TIMEOUT <= 0), unlike LocMemCache.incr. The reference is
    therefore LocMemCache's sync ``incr``, except for the "not found" message, where the async
    fallback names the caller's key (``Key 'a' not found``) rather than the made key.
    """
    try:
        return getattr(cache, method)(*positional, **keywords)
    except ValueError as exc:
        version = args.get("version")
        made = cache.make_key(args["key"], version=None if version is OMIT else version)
        if str(exc) == f"Key '{made}' not found":
            raise ValueError(f"Key '{args['key']}' not found") from None
        raise


def _iterable(keys: list[Any], kind: str) -> Iterable[Any]:
    if kind == "tuple":
        return tuple(keys)
    if kind == "iter":
        return iter(keys)
    if kind == "generator":
        return (k for k in keys)
    return list(keys)


iterable_kinds_st = st.sampled_from(["list", "tuple", "iter", "generator"])


# --------------------------------------------------------------------------------------------
# The stateful differential test
# --------------------------------------------------------------------------------------------


@dataclass
class Side:
    """One backend: two instances on one LOCATION."""

    name: str
    location: str
    caches: list[BaseCache]


class CacheDiffMachine(RuleBasedStateMachine):
    """Apply every operation to LocMemCache and the backend under test; compare outcomes."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.sides: list[Side] = []
        self.warn_mode = "always"
        self.failed = False

    # ---- setup / teardown ---------------------------------------------------------------

    @initialize(params_a=instance_params_st, params_b=instance_params_st)
    def build(self, params_a: dict[str, Any], params_b: dict[str, Any]) -> None:
        suffix = uuid.uuid4().hex
        for name, cls in (("LocMemCache", ReferenceLocMemCache), (BACKEND_NAME, Backend)):
            location = f"rustcache-diff-{name}-{suffix}"
            caches = [cls(location, copy.deepcopy(p)) for p in (params_a, params_b)]
            caches[0].clear()
            self.sides.append(Side(name, location, caches))

    def teardown(self) -> None:
        try:
            if len(self.sides) == 2 and not self.failed:
                self._compare_state("final state")
        finally:
            for side in self.sides:
                side.caches[0].clear()
            self.loop.close()

    # ---- helpers ------------------------------------------------------------------------

    def _both(self, label: str, body: Callable[[Side], Any]) -> None:
        outcomes = [capture(lambda side=side: body(side), self.warn_mode) for side in self.sides]
        self.failed = outcomes[0] != outcomes[1]
        assert not self.failed, _format_mismatch(label, outcomes)

    def _call(self, side: Side, method: str, args: dict[str, Any], how: How) -> Any:
        return invoke(side.caches[how.instance], method, args, how, self.loop)

    def _compare_state(self, label: str) -> None:
        def snapshot(side: Side) -> Any:
            rows = []
            for instance, cache in enumerate(side.caches):
                for key in KEY_POOL:
                    for version in STATE_VERSIONS:
                        missing = object()
                        value = cache.get(key, missing, version=version)
                        if value is not missing:
                            rows.append((instance, repr(key), version, canon(value)))
            return tuple(rows)

        outcomes = [capture(lambda side=side: snapshot(side), "ignore") for side in self.sides]
        self.failed = outcomes[0] != outcomes[1]
        assert not self.failed, _format_mismatch(label, outcomes)

    @staticmethod
    def _describe(result: Any, default: Any) -> Any:
        if default is not OMIT and has_mutable(default) and result is default:
            return "<the default object itself>"
        return canon(result)

    # ---- rules --------------------------------------------------------------------------

    @rule(mode=st.sampled_from(["always", "always", "always", "error"]))
    def warnings_mode(self, mode: str) -> None:
        """Switch between recording warnings and raising them (``-W error`` projects)."""
        self.warn_mode = mode

    @rule(how=hows_st, key=keys_st, value=values_st, timeout=timeouts_st, version=versions_st)
    def set(self, how: How, key: Any, value: Any, timeout: Any, version: Any) -> None:
        def body(side: Side) -> Any:
            mine = copy.deepcopy(value)
            args = {"key": key, "value": mine, "timeout": timeout, "version": version}
            result = self._call(side, "set", args, how)
            mutate(mine)  # must not reach the stored value
            return canon(result)

        self._both("set", body)

    @rule(
        how=hows_st,
        key=hot_keys_st,
        value=st.sampled_from(INCR_VALUES),
        timeout=st.sampled_from([OMIT, None, 3600, 0]),
        version=versions_st,
    )
    def set_number(self, how: How, key: Any, value: Any, timeout: Any, version: Any) -> None:
        """Like ``set`` but with the values that make incr/decr interesting."""
        self.set(how, key, value, timeout, version)

    @rule(how=hows_st, key=keys_st, value=values_st, timeout=timeouts_st, version=versions_st)
    def add(self, how: How, key: Any, value: Any, timeout: Any, version: Any) -> None:
        def body(side: Side) -> Any:
            mine = copy.deepcopy(value)
            args = {"key": key, "value": mine, "timeout": timeout, "version": version}
            result = self._call(side, "add", args, how)
            mutate(mine)
            return canon(result)

        self._both("add", body)

    @rule(
        how=hows_st,
        key=keys_st,
        default=get_defaults_st,
        version=versions_st,
        check_isolation=st.booleans(),
    )
    def get(self, how: How, key: Any, default: Any, version: Any, check_isolation: bool) -> None:
        def body(side: Side) -> Any:
            mine = object() if default is SENTINEL else copy.deepcopy(default)
            args = {"key": key, "default": mine, "version": version}
            result = self._call(side, "get", args, how)
            description = self._describe(result, mine)
            if not (check_isolation and result is not mine and has_mutable(result)):
                return description
            mutate(result)
            missing = object()
            again = side.caches[how.instance].get(key, missing, version=version)
            return (description, "after mutating the result:", canon(again) == description)

        self._both("get", body)

    @rule(how=hows_st, key=keys_st, timeout=timeouts_st, version=versions_st)
    def touch(self, how: How, key: Any, timeout: Any, version: Any) -> None:
        args = {"key": key, "timeout": timeout, "version": version}
        self._both("touch", lambda side: canon(self._call(side, "touch", args, how)))

    @rule(how=hows_st, key=keys_st, version=versions_st)
    def delete(self, how: How, key: Any, version: Any) -> None:
        args = {"key": key, "version": version}
        self._both("delete", lambda side: canon(self._call(side, "delete", args, how)))

    @rule(
        how=hows_st,
        keys=st.lists(keys_st, max_size=6),
        version=versions_st,
        kind=iterable_kinds_st,
    )
    def get_many(self, how: How, keys: list[Any], version: Any, kind: str) -> None:
        def body(side: Side) -> Any:
            args = {"keys": _iterable(keys, kind), "version": version}
            result = self._call(side, "get_many", args, how)
            description = canon(result)
            mutate(result)  # later reads show whether this leaked into the store
            return description

        self._both("get_many", body)

    @rule(
        how=hows_st,
        data=st.dictionaries(keys_st, values_st, max_size=5),
        timeout=timeouts_st,
        version=versions_st,
    )
    def set_many(self, how: How, data: dict[Any, Any], timeout: Any, version: Any) -> None:
        def body(side: Side) -> Any:
            mine = copy.deepcopy(data)
            args = {"data": mine, "timeout": timeout, "version": version}
            result = self._call(side, "set_many", args, how)
            mutate(mine)
            return canon(result)

        self._both("set_many", body)

    @rule(
        how=hows_st,
        keys=st.lists(keys_st, max_size=6),
        version=versions_st,
        kind=iterable_kinds_st,
    )
    def delete_many(self, how: How, keys: list[Any], version: Any, kind: str) -> None:
        def body(side: Side) -> Any:
            args = {"keys": _iterable(keys, kind), "version": version}
            return canon(self._call(side, "delete_many", args, how))

        self._both("delete_many", body)

    @rule(
        how=hows_st,
        key=keys_st,
        default=get_or_set_defaults_st,
        timeout=timeouts_st,
        version=versions_st,
    )
    def get_or_set(self, how: How, key: Any, default: Any, timeout: Any, version: Any) -> None:
        def body(side: Side) -> Any:
            produced: list[Any] = []
            if isinstance(default, CallableDefault):

                def factory() -> Any:
                    produced.append(copy.deepcopy(default.value))
                    return produced[-1]

                mine: Any = factory
            else:
                mine = copy.deepcopy(default)
                produced.append(mine)
            args = {"key": key, "default": mine, "timeout": timeout, "version": version}
            result = self._call(side, "get_or_set", args, how)
            the_default = produced[-1] if produced else OMIT
            description = self._describe(result, the_default)
            calls = len(produced) if isinstance(default, CallableDefault) else "value"
            for item in produced:
                mutate(item)
            return (description, ("default produced", calls))

        self._both("get_or_set", body)

    @rule(how=hows_st, key=keys_st, version=versions_st)
    def has_key(self, how: How, key: Any, version: Any) -> None:
        args = {"key": key, "version": version}
        self._both("has_key", lambda side: canon(self._call(side, "has_key", args, how)))

    @rule(key=keys_st, instance=st.sampled_from([0, 1]))
    def contains(self, key: Any, instance: int) -> None:
        self._both("in", lambda side: canon(key in side.caches[instance]))

    @rule(
        how=hows_st,
        method=st.sampled_from(["incr", "decr"]),
        key=st.one_of(hot_keys_st, keys_st),
        delta=st.sampled_from(DELTAS),
        version=versions_st,
    )
    def incr_decr(self, how: How, method: str, key: Any, delta: Any, version: Any) -> None:
        args = {"key": key, "delta": delta, "version": version}
        self._both(method, lambda side: canon(self._call(side, method, args, how)))

    @rule(
        how=hows_st,
        key=hot_keys_st,
        value=st.sampled_from(INCR_VALUES),
        method=st.sampled_from(["incr", "decr"]),
        delta=st.sampled_from(DELTAS),
        version=versions_st,
    )
    def set_then_incr(
        self, how: How, key: Any, value: Any, method: str, delta: Any, version: Any
    ) -> None:
        """Store a (non-)number and incr/decr it at once, so every value meets every delta."""

        def body(side: Side) -> Any:
            stored = copy.deepcopy(value)
            side.caches[how.instance].set(key, stored, version=version)
            args = {"key": key, "delta": delta, "version": version}
            result = canon(self._call(side, method, args, how))
            missing = object()
            after = side.caches[how.instance].get(key, missing, version=version)
            return (result, "then get:", "<miss>" if after is missing else canon(after))

        self._both(f"set then {method}", body)

    @rule(
        how=hows_st,
        method=st.sampled_from(["incr_version", "decr_version"]),
        key=st.one_of(hot_keys_st, keys_st),
        delta=st.sampled_from([OMIT, 1, -1, 0, 2]),
        version=versions_st,
    )
    def incr_decr_version(self, how: How, method: str, key: Any, delta: Any, version: Any) -> None:
        args = {"key": key, "delta": delta, "version": version}
        self._both(method, lambda side: canon(self._call(side, method, args, how)))

    @rule(how=hows_st, method=st.sampled_from(["clear", "close", "close", "close"]))
    def clear_or_close(self, how: How, method: str) -> None:
        """``clear`` wipes everything; ``close`` (run after every request) must keep the data."""
        self._both(method, lambda side: canon(self._call(side, method, {}, how)))

    @rule()
    def compare_state(self) -> None:
        """Every pool key at every version must read back identically."""
        self._compare_state("state")


def test_differential() -> None:
    """Random operation sequences give identical results, warnings and exceptions."""
    run_state_machine_as_test(
        CacheDiffMachine,
        settings=settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            stateful_step_count=40,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        ),
    )


# --------------------------------------------------------------------------------------------
# Culling: tiny MAX_ENTRIES, LRU order and Django's cull rule must match
# --------------------------------------------------------------------------------------------

CULL_KEYS = [f"k{i}" for i in range(12)]
CULL_CONFIGS = [(5, 2), (5, 0), (9, 3), (3, 1), (1, 2)]
_cull_key = st.sampled_from(CULL_KEYS)
_cull_value = st.one_of(st.integers(-3, 100), st.sampled_from(["v", None, 2**64]))
_safe_timeouts = st.sampled_from([OMIT, None, 3600])
_all_timeouts = st.sampled_from([OMIT, None, 3600, 0, -1])
_instance = st.sampled_from([0, 0, 1])


def cull_ops(variant: str) -> st.SearchStrategy[list[tuple[Any, ...]]]:
    """Operation lists for one variant: "core", "all" or "expiring"."""
    timeouts = _all_timeouts if variant == "expiring" else _safe_timeouts
    core = [
        st.tuples(st.just("set"), _instance, _cull_key, _cull_value, timeouts),
        st.tuples(st.just("get"), _instance, _cull_key),
        st.tuples(st.just("has_key"), _instance, _cull_key),
    ]
    if variant == "core":
        return _op_lists(st.one_of(*core))
    more = [
        st.tuples(st.just("add"), _instance, _cull_key, _cull_value, timeouts),
        st.tuples(st.just("touch"), _instance, _cull_key, timeouts),
        st.tuples(st.just("delete"), _instance, _cull_key),
        st.tuples(st.just("incr"), _instance, _cull_key),
        st.tuples(st.just("get_or_set"), _instance, _cull_key, _cull_value, timeouts),
        st.tuples(st.just("get_many"), _instance, st.lists(_cull_key, max_size=5)),
        st.tuples(
            st.just("set_many"),
            _instance,
            st.dictionaries(_cull_key, _cull_value, max_size=5),
            timeouts,
        ),
        st.tuples(st.just("delete_many"), _instance, st.lists(_cull_key, max_size=4)),
        st.tuples(st.just("set_max_entries"), _instance, st.sampled_from([-1, 0, 2, 5, 100])),
    ]
    return _op_lists(st.one_of(*core, *core, *more))


def _op_lists(op: st.SearchStrategy[tuple[Any, ...]]) -> st.SearchStrategy[list[tuple[Any, ...]]]:
    # Drawing the length first gives long lists (culling needs more inserts than MAX_ENTRIES)
    # that still shrink to short ones.
    return st.integers(0, 100).flatmap(lambda n: st.lists(op, min_size=n, max_size=n))


def apply_cull_op(caches: list[BaseCache], op: tuple[Any, ...]) -> Any:
    """Run one operation from ``cull_ops`` and return a canonical result."""
    name, instance, *rest = op
    cache = caches[instance]
    if name == "set_max_entries":
        cache._max_entries = rest[0]  # Django's own suite does this on an instance
        return None
    if name in ("set", "add", "get_or_set"):
        key, value, timeout = rest
        kwargs = {} if timeout is OMIT else {"timeout": timeout}
        return canon(getattr(cache, name)(key, value, **kwargs))
    if name == "touch":
        key, timeout = rest
        return canon(cache.touch(key) if timeout is OMIT else cache.touch(key, timeout))
    if name == "set_many":
        data, timeout = rest
        return canon(cache.set_many(data) if timeout is OMIT else cache.set_many(data, timeout))
    if name == "get":
        missing = object()
        result = cache.get(rest[0], missing)
        return "<miss>" if result is missing else canon(result)
    return canon(getattr(cache, name)(rest[0]))


def _cull_params(max_entries: int, cull_frequency: int) -> dict[str, Any]:
    return {"OPTIONS": {"MAX_ENTRIES": max_entries, "CULL_FREQUENCY": cull_frequency}}


@pytest.mark.parametrize("variant", ["core", "all", "expiring"])
@pytest.mark.parametrize(("max_entries", "cull_frequency"), CULL_CONFIGS)
@settings(
    max_examples=CULL_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(data=st.data())
def test_cull_matches_locmem(
    max_entries: int, cull_frequency: int, variant: str, data: st.DataObject
) -> None:
    """With culling active, every result and the final survivors match LocMemCache.

    ``core`` uses set/get/has_key on one instance. ``all`` adds every other operation, a second
    instance on the same LOCATION with other limits, and ``cache._max_entries`` reassignment.
    ``expiring`` also stores entries with timeout 0/-1 (LocMemCache counts those towards
    MAX_ENTRIES until something reads them).
    """
    other = data.draw(st.sampled_from(CULL_CONFIGS), label="second instance limits")
    if variant == "core":
        other = (max_entries, cull_frequency)
    ops = data.draw(cull_ops(variant), label="ops")
    if variant == "core":
        ops = [(op[0], 0, *op[2:]) for op in ops]
    suffix = uuid.uuid4().hex
    sides: list[list[BaseCache]] = []
    for index, cls in enumerate((ReferenceLocMemCache, Backend)):
        location = f"rustcache-cull-{index}-{suffix}"
        sides.append(
            [
                cls(location, _cull_params(max_entries, cull_frequency)),
                cls(location, _cull_params(*other)),
            ]
        )
        sides[-1][0].clear()
    try:
        for step, op in enumerate(ops):
            outcomes = [capture(lambda c=caches, o=op: apply_cull_op(c, o)) for caches in sides]
            assert outcomes[0] == outcomes[1], _format_mismatch(f"step {step}: {op!r}", outcomes)

        def survivors(caches: list[BaseCache]) -> Any:
            return tuple(k for k in CULL_KEYS if caches[0].has_key(k))

        outcomes = [capture(lambda caches=caches: survivors(caches)) for caches in sides]
        assert outcomes[0] == outcomes[1], _format_mismatch("surviving keys", outcomes)
    finally:
        for caches in sides:
            caches[0].clear()
