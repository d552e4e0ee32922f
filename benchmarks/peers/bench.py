"""RustCache against its peers and the floor, side by side in one process.

Run it through ``run.sh`` (which builds the benchmark venv), or directly in a venv that has Django
5.2, django-rustcache, theine, diskcache and redis installed::

    python benchmarks/peers/bench.py [--quick] [--out benchmarks/RESULTS.md]

Columns (see README.md beside this file):

* ``RustCache``, ``LocMemCache``, ``theine`` (``theine.adapters.django.Cache``), ``diskcache``
  (``diskcache.DjangoCache`` in a temporary directory) and ``RedisCache`` (Django's, against a
  ``redis-server`` this script starts on 127.0.0.1 and always stops) are real Django cache
  backends built from ``settings.CACHES``.
* ``floor`` is the physical limit of a by-value cache called from Python: one method call that
  formats the key as Django's default key function does (``"%s:%s:%s" % (prefix, version, key)``),
  does one plain dict operation and, for values that must be copied (everything except ``str``),
  ``pickle.loads``/``pickle.dumps`` of the same bytes.

Timing: each cell runs a ``time.perf_counter_ns`` loop of N operations (N calibrated so one loop
takes about ``--target-ms``), repeats it ``--repeats`` times and reports the *median of the
per-operation means* of the repeats. Times include the Python ``for`` loop and the method call,
which are the same for every column; the garbage collector stays enabled as in an application.
"""

# The floor formats keys exactly as Django's default_key_func does, with the % operator.
# ruff: noqa: UP031

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import importlib.metadata
import itertools
import os
import pickle
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "benchmarks" / "RESULTS.md"

#: Django's defaults for KEY_PREFIX and VERSION, used by the floor's key formatting.
_PREFIX = ""
_VERSION = 1
_MISSING = object()
_DUMPS_PROTOCOL = pickle.HIGHEST_PROTOCOL
#: Every backend gets the same timeout, long enough for the whole run.
TIMEOUT = 3600
#: Distinct keys read and overwritten by the per-value cells.
POOL = 1000
#: Upper bound on the fresh keys an ``add``/``delete`` loop needs (each must be set up untimed).
FRESH_CAP = 5000
BIG_MAX_ENTRIES = 20_000_000
#: 1, 5 and 15 minute load averages when the run started (the report shows them).
_LOAD_AT_START = os.getloadavg()


# Values --------------------------------------------------------------------------------------


class Product:
    """A small user class with three attributes: values of this kind must be pickled."""

    def __init__(self, id: int, name: str, price: float) -> None:
        self.id = id
        self.name = name
        self.price = price

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Product) and vars(self) == vars(other)

    __hash__ = None  # type: ignore[assignment]


def html_page(size: int = 20 * 1024) -> str:
    """A deterministic HTML-like string of exactly ``size`` characters."""
    parts = ['<!doctype html><html><head><title>Products</title></head><body><ul class="list">']
    i = 0
    while sum(map(len, parts)) < size:
        parts.append(
            f'<li class="item" data-id="{i}"><a href="/products/{i}/">Product {i}</a>'
            f' <span class="price">{i * 1.25:.2f}</span></li>\n'
        )
        i += 1
    return "".join(parts)[: size - len("</ul></body></html>")] + "</ul></body></html>"


def cached_response(body: str) -> Any:
    """An ``HttpResponse`` as ``cache_page`` stores it: headers patched, then the object itself."""
    from django.http import HttpResponse
    from django.utils.cache import patch_response_headers

    response = HttpResponse(body, content_type="text/html; charset=utf-8")
    patch_response_headers(response, TIMEOUT)
    return response


@dataclass(frozen=True)
class ValueKind:
    """One value the tables are built for."""

    name: str
    make: Callable[[], Any]
    #: Whether the floor must copy it through pickle (an immutable ``str`` need not be copied).
    pickled: bool


def value_kinds() -> list[ValueKind]:
    """The values of issue 4's benchmark suite."""
    page = html_page()
    return [
        ValueKind("short string", lambda: "hello, world", pickled=False),
        ValueKind("small dict", lambda: {"id": 42, "name": "apple", "price": 1.2}, pickled=True),
        ValueKind("20 KB HTML string", lambda: page, pickled=False),
        ValueKind("user-class instance", lambda: Product(42, "apple", 1.2), pickled=True),
        ValueKind("HttpResponse (cache_page)", lambda: cached_response(page), pickled=True),
    ]


def same_value(a: Any, b: Any) -> bool:
    """Equality that also understands ``HttpResponse`` (which has no ``__eq__``)."""
    if hasattr(a, "content") and hasattr(b, "content"):
        return a.content == b.content and dict(a.items()) == dict(b.items())
    return type(a) is type(b) and a == b


# The floor -----------------------------------------------------------------------------------


class FloorCache:
    """The least a by-value cache can do per call: key formatting, one dict operation, a copy.

    Each method is written out in full (no helper calls) so that it costs one Python call plus
    exactly the work named. With ``pickled=False`` values are stored as they are (immutable
    ``str``); otherwise as ``pickle.dumps`` bytes and returned through ``pickle.loads``.
    """

    def __init__(self, pickled: bool) -> None:
        self._store: dict[str, Any] = {}
        self.pickled = pickled
        if pickled:
            self.get = self._get_pickled  # type: ignore[method-assign]
            self.set = self._set_pickled  # type: ignore[method-assign]
            self.add = self._add_pickled  # type: ignore[method-assign]
            self.get_many = self._get_many_pickled  # type: ignore[method-assign]
            self.set_many = self._set_many_pickled  # type: ignore[method-assign]
            self.get_or_set = self._get_or_set_pickled  # type: ignore[method-assign]
            self.aget = self._aget_pickled  # type: ignore[method-assign]
            self.aset = self._aset_pickled  # type: ignore[method-assign]

    # str values: no copy needed
    def get(self, key: str, default: Any = None) -> Any:
        """Key format + one dict lookup."""
        value = self._store.get("%s:%s:%s" % (_PREFIX, _VERSION, key), _MISSING)
        return default if value is _MISSING else value

    def set(self, key: str, value: Any, timeout: Any = None) -> None:
        """Key format + one dict store."""
        self._store["%s:%s:%s" % (_PREFIX, _VERSION, key)] = value

    def add(self, key: str, value: Any, timeout: Any = None) -> bool:
        """Key format + ``setdefault``."""
        return self._store.setdefault("%s:%s:%s" % (_PREFIX, _VERSION, key), value) is value

    def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        """Key format + one lookup per key into a new dict."""
        store = self._store
        out = {}
        for key in keys:
            value = store.get("%s:%s:%s" % (_PREFIX, _VERSION, key), _MISSING)
            if value is not _MISSING:
                out[key] = value
        return out

    def set_many(self, data: dict[str, Any], timeout: Any = None) -> list[str]:
        """Key format + one store per key."""
        store = self._store
        for key, value in data.items():
            store["%s:%s:%s" % (_PREFIX, _VERSION, key)] = value
        return []

    def get_or_set(self, key: str, default: Any, timeout: Any = None) -> Any:
        """A ``get`` that stores ``default`` on a miss."""
        made = "%s:%s:%s" % (_PREFIX, _VERSION, key)
        value = self._store.get(made, _MISSING)
        if value is _MISSING:
            self._store[made] = value = default
        return value

    async def aget(self, key: str, default: Any = None) -> Any:
        """``get`` as a coroutine."""
        value = self._store.get("%s:%s:%s" % (_PREFIX, _VERSION, key), _MISSING)
        return default if value is _MISSING else value

    async def aset(self, key: str, value: Any, timeout: Any = None) -> None:
        """``set`` as a coroutine."""
        self._store["%s:%s:%s" % (_PREFIX, _VERSION, key)] = value

    # pickled values: pickle.loads/dumps of the same bytes
    def _get_pickled(self, key: str, default: Any = None) -> Any:
        data = self._store.get("%s:%s:%s" % (_PREFIX, _VERSION, key))
        return default if data is None else pickle.loads(data)

    def _set_pickled(self, key: str, value: Any, timeout: Any = None) -> None:
        self._store["%s:%s:%s" % (_PREFIX, _VERSION, key)] = pickle.dumps(value, _DUMPS_PROTOCOL)

    def _add_pickled(self, key: str, value: Any, timeout: Any = None) -> bool:
        made = "%s:%s:%s" % (_PREFIX, _VERSION, key)
        if made in self._store:
            return False
        self._store[made] = pickle.dumps(value, _DUMPS_PROTOCOL)
        return True

    def _get_many_pickled(self, keys: Sequence[str]) -> dict[str, Any]:
        store = self._store
        out = {}
        for key in keys:
            data = store.get("%s:%s:%s" % (_PREFIX, _VERSION, key))
            if data is not None:
                out[key] = pickle.loads(data)
        return out

    def _set_many_pickled(self, data: dict[str, Any], timeout: Any = None) -> list[str]:
        store = self._store
        for key, value in data.items():
            store["%s:%s:%s" % (_PREFIX, _VERSION, key)] = pickle.dumps(value, _DUMPS_PROTOCOL)
        return []

    def _get_or_set_pickled(self, key: str, default: Any, timeout: Any = None) -> Any:
        made = "%s:%s:%s" % (_PREFIX, _VERSION, key)
        data = self._store.get(made)
        if data is None:
            self._store[made] = pickle.dumps(default, _DUMPS_PROTOCOL)
            return default
        return pickle.loads(data)

    async def _aget_pickled(self, key: str, default: Any = None) -> Any:
        data = self._store.get("%s:%s:%s" % (_PREFIX, _VERSION, key))
        return default if data is None else pickle.loads(data)

    async def _aset_pickled(self, key: str, value: Any, timeout: Any = None) -> None:
        self._store["%s:%s:%s" % (_PREFIX, _VERSION, key)] = pickle.dumps(value, _DUMPS_PROTOCOL)

    # ints are immutable: no copy, whatever the table's value
    def incr(self, key: str, delta: int = 1) -> int:
        """Key format + lookup + add + store."""
        made = "%s:%s:%s" % (_PREFIX, _VERSION, key)
        value = self._store[made] + delta
        self._store[made] = value
        return value

    def delete(self, key: str) -> bool:
        """Key format + one ``dict.pop``."""
        return self._store.pop("%s:%s:%s" % (_PREFIX, _VERSION, key), _MISSING) is not _MISSING

    def delete_many(self, keys: Sequence[str]) -> None:
        """Untimed helper."""
        for key in keys:
            self._store.pop("%s:%s:%s" % (_PREFIX, _VERSION, key), None)

    def put_raw(self, data: dict[str, Any]) -> None:
        """Untimed helper: store values as they are (the counters that ``incr`` adds to)."""
        for key, value in data.items():
            self._store["%s:%s:%s" % (_PREFIX, _VERSION, key)] = value

    def clear(self) -> None:
        """Untimed helper."""
        self._store.clear()


# redis-server --------------------------------------------------------------------------------


def _free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """In the child: ask Linux to SIGTERM us if the benchmark dies without cleaning up."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def redis_server(workdir: str) -> Iterator[tuple[str | None, str]]:
    """Start a throwaway ``redis-server`` on loopback; yield ``(url or None, message)``.

    The server binds 127.0.0.1 on a free port with persistence off, and is stopped on exit
    (terminate, then kill after 5 s), whatever happens in the body.
    """
    exe = shutil.which("redis-server")
    if exe is None:
        yield None, "redis-server not found: the RedisCache column is skipped"
        return
    port = _free_port()
    args = [
        exe,
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--save", "",
        "--appendonly", "no",
        "--protected-mode", "yes",
        "--daemonize", "no",
        "--dir", workdir,
        "--loglevel", "warning",
    ]  # fmt: skip
    proc = subprocess.Popen(
        args,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=_die_with_parent,
    )
    try:
        deadline = time.monotonic() + 10
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", port), timeout=0.5) as s,
            ):
                s.sendall(b"PING\r\n")
                ready = s.recv(16).startswith(b"+PONG")
            if ready:
                break
            time.sleep(0.05)
        if not ready:
            err = proc.stderr.read().decode(errors="replace") if proc.poll() is not None else ""
            yield None, f"redis-server did not answer on 127.0.0.1:{port}: skipped. {err}".strip()
        else:
            yield f"redis://127.0.0.1:{port}/0", f"redis-server on 127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


# Timing --------------------------------------------------------------------------------------

#: An operation under test: ``op(cache, ctx, n) -> (elapsed ns, operations done)``, timing only
#: the ``n`` (approximately) operations and doing any setup or cleanup outside the timed region.
Op = Callable[[Any, "Ctx", int], tuple[int, int]]


@dataclass
class Ctx:
    """What one (backend, value) pair's cells share: the value and the keys prepared for it."""

    value: Any
    loop: asyncio.AbstractEventLoop
    hit_keys: list[str] = field(default_factory=lambda: [f"hit:{i}" for i in range(POOL)])
    counters: list[str] = field(default_factory=lambda: [f"ctr:{i}" for i in range(100)])
    fresh: Iterator[int] = field(default_factory=itertools.count)

    def cycle(self, keys: Sequence[str], n: int) -> list[str]:
        """``n`` keys taken round-robin from ``keys``."""
        reps, rest = divmod(n, len(keys))
        return list(keys) * reps + list(keys[:rest])

    def fresh_keys(self, n: int) -> list[str]:
        """``n`` keys never used before in this context."""
        return [f"new:{next(self.fresh)}" for _ in range(n)]

    def batches(self, n: int) -> list[list[str]]:
        """About ``n / 100`` batches of 100 pool keys, for ``get_many``/``set_many``."""
        count = max(1, n // 100)
        width = len(self.hit_keys) // 100
        return [self.hit_keys[(i % width) * 100 : (i % width) * 100 + 100] for i in range(count)]


def op_get_hit(cache: Any, ctx: Ctx, n: int) -> tuple[int, int]:
    keys = ctx.cycle(ctx.hit_keys, n)
    get = cache.get
    t0 = time.perf_counter_ns()
    for key in keys:
        get(key)
    return time.perf_counter_ns() - t0, len(keys)


def op_get_miss(cache: Any, ctx: Ctx, n: int) -> tuple[int, int]:
    keys = ctx.cycle([f"miss:{i}" for i in range(POOL)], n)
    get = cache.get
    t0 = time.perf_counter_ns()
    for key in keys:
        get(key)
    return time.perf_counter_ns() - t0, len(keys)


def op_set(cache: Any, ctx: Ctx, n: int) -> tuple[int, int]:
    keys = ctx.cycle(ctx.hit_keys, n)
    set_ = cache.set
    value = ctx.value
    t0 = time.perf_counter_ns()
    for key in keys:
        set_(key, value)
    return time.perf_counter_ns() - t0, len(keys)


def op_add(cache: Any, ctx: Ctx, n: int) -> tuple[int, int]:
    keys = ctx.fresh_keys(min(n, FRESH_CAP))
    add = cache.add
    value = ctx.value
    t0 = time.perf_counter_ns()
    for key in keys:
        add(key, value)
    elapsed = time.perf_counter_ns() - t0
    cache.delete_many(keys)
    return elapsed, len(keys)


def op_incr(cache: Any, ctx: Ctx, n: int) -> tuple[int, int]:
    keys = ctx.cycle(ctx.counters, n)
    incr = cache.incr
    t0 = time.perf_counter_ns()
    for key in keys:
        incr(key)
    return time.perf_counter_ns() - t0, len(keys)


def op_get_many(cache: Any, ctx: Ctx, n: int) -> tuple[int, int]:
    batches = ctx.batches(n)
    get_many = cache.get_many
    t0 = time.perf_counter_ns()
    for batch in batches:
        get_many(batch)
    return time.perf_counter_ns() - t0, 100 * len(batches)


def op_set_many(cache: Any, ctx: Ctx, n: int) -> tuple[int, int]:
    value = ctx.value
    batches = [dict.fromkeys(batch, value) for batch in ctx.batches(n)]
    set_many = cache.set_many
    t0 = time.perf_counter_ns()
    for batch in batches:
        set_many(batch)
    return time.perf_counter_ns() - t0, 100 * len(batches)


def op_delete(cache: Any, ctx: Ctx, n: int) -> tuple[int, int]:
    keys = ctx.fresh_keys(min(n, FRESH_CAP))
    for i in range(0, len(keys), 500):
        cache.set_many(dict.fromkeys(keys[i : i + 500], ctx.value))
    delete = cache.delete
    t0 = time.perf_counter_ns()
    for key in keys:
        delete(key)
    return time.perf_counter_ns() - t0, len(keys)


def op_get_or_set(cache: Any, ctx: Ctx, n: int) -> tuple[int, int]:
    keys = ctx.cycle(ctx.hit_keys, n)
    get_or_set = cache.get_or_set
    value = ctx.value
    t0 = time.perf_counter_ns()
    for key in keys:
        get_or_set(key, value)
    return time.perf_counter_ns() - t0, len(keys)


def op_aget(cache: Any, ctx: Ctx, n: int) -> tuple[int, int]:
    keys = ctx.cycle(ctx.hit_keys, n)
    aget = cache.aget

    async def body() -> int:
        t0 = time.perf_counter_ns()
        for key in keys:
            await aget(key)
        return time.perf_counter_ns() - t0

    return ctx.loop.run_until_complete(body()), len(keys)


def op_aset(cache: Any, ctx: Ctx, n: int) -> tuple[int, int]:
    keys = ctx.cycle(ctx.hit_keys, n)
    aset = cache.aset
    value = ctx.value

    async def body() -> int:
        t0 = time.perf_counter_ns()
        for key in keys:
            await aset(key, value)
        return time.perf_counter_ns() - t0

    return ctx.loop.run_until_complete(body()), len(keys)


#: The rows of each value's table, in order.
OPS: list[tuple[str, Op]] = [
    ("get (hit)", op_get_hit),
    ("get (miss)", op_get_miss),
    ("set", op_set),
    ("add (new key)", op_add),
    ("incr", op_incr),
    ("get_many (100 keys), per key", op_get_many),
    ("set_many (100 keys), per key", op_set_many),
    ("delete", op_delete),
    ("get_or_set (hit)", op_get_or_set),
    ("aget (hit)", op_aget),
    ("aset", op_aset),
]


@dataclass(frozen=True)
class Timing:
    """How long each cell runs."""

    repeats: int
    target_ns: int
    max_ops: int = 300_000


def calibrate(op: Op, cache: Any, ctx: Ctx, timing: Timing) -> int:
    """Loop size for one cell: about ``timing.target_ns`` per loop.

    Grows from 16 operations until a loop takes at least 1 ms, then scales to the target.
    """
    n = 16
    while True:
        elapsed, done = op(cache, ctx, n)
        if elapsed >= 1_000_000 or n >= timing.max_ops:
            break
        n *= 8
    per_op = max(elapsed / done, 1.0)
    return int(min(max(timing.target_ns / per_op, 16), timing.max_ops))


def measure_row(
    op: Op, cells: dict[str, tuple[Any, Ctx]], timing: Timing, errors: dict[str, str]
) -> dict[str, float | None]:
    """One operation for every column: the median over repeats of the mean ns per operation.

    The repeats are interleaved, in a new random order each round (B, A, C, then C, B, A...), so
    that a burst of noise from the shared machine, or the after-effects of one column (redis-server
    or SQLite work that goes on after a loop), land on every column rather than on one. A column
    whose operation raises is recorded in ``errors`` and left out of the row.
    """
    sizes: dict[str, int] = {}
    for col, (cache, ctx) in cells.items():
        try:
            sizes[col] = calibrate(op, cache, ctx, timing)
        except Exception as exc:  # a peer lacking an operation must not stop the run
            errors[col] = f"{type(exc).__name__}: {exc}"
    samples: dict[str, list[float]] = {col: [] for col in sizes}
    order = list(sizes)
    shuffle = random.Random(len(order) * timing.repeats).shuffle
    for _ in range(timing.repeats):
        shuffle(order)  # no column always runs right after the one that loads the machine most
        for col in order:
            n = sizes[col]
            if col in errors:
                continue
            cache, ctx = cells[col]
            try:
                elapsed, done = op(cache, ctx, n)
            except Exception as exc:
                errors[col] = f"{type(exc).__name__}: {exc}"
                continue
            samples[col].append(elapsed / done)
    return {
        col: (statistics.median(samples[col]) if col in samples and col not in errors else None)
        for col in cells
    }


def loop_overhead(timing: Timing) -> tuple[float, float]:
    """ns per iteration of a bare ``for`` loop and of a loop calling a no-op method."""

    class Noop:
        def get(self, key: str) -> None:
            return None

    keys = [f"k{i}" for i in range(100_000)]
    get = Noop().get
    bare, call = [], []
    for _ in range(timing.repeats):
        t0 = time.perf_counter_ns()
        for _key in keys:
            pass
        bare.append((time.perf_counter_ns() - t0) / len(keys))
        t0 = time.perf_counter_ns()
        for key in keys:
            get(key)
        call.append((time.perf_counter_ns() - t0) / len(keys))
    return statistics.median(bare), statistics.median(call)


# Django setup --------------------------------------------------------------------------------

#: Column order of the per-value tables (the floor is added per value).
BACKENDS = ["RustCache", "LocMemCache", "theine", "diskcache", "RedisCache"]


def configure_django(diskdir: str, redis_url: str | None) -> None:
    """Configure Django with one cache alias per backend (MAX_ENTRIES large: no culling)."""
    import django
    from django.conf import settings

    big = {"MAX_ENTRIES": BIG_MAX_ENTRIES}
    caches: dict[str, dict[str, Any]] = {
        "default": {"BACKEND": "django.core.cache.backends.dummy.DummyCache"},
        "RustCache": {
            "BACKEND": "django_rustcache.RustCache",
            "LOCATION": "bench-peers",
            "TIMEOUT": TIMEOUT,
            "OPTIONS": big,
        },
        "LocMemCache": {
            "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
            "LOCATION": "bench-peers",
            "TIMEOUT": TIMEOUT,
            "OPTIONS": big,
        },
        "theine": {
            "BACKEND": "theine.adapters.django.Cache",
            "TIMEOUT": TIMEOUT,
            "OPTIONS": {"MAX_ENTRIES": 1_000_000},
        },
        "diskcache": {
            "BACKEND": "diskcache.DjangoCache",
            "LOCATION": diskdir,
            "TIMEOUT": TIMEOUT,
        },
        "scale-RustCache": {
            "BACKEND": "django_rustcache.RustCache",
            "LOCATION": "bench-scale",
            "TIMEOUT": TIMEOUT,
            "OPTIONS": big,
        },
        "scale-LocMemCache": {
            "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
            "LOCATION": "bench-scale",
            "TIMEOUT": TIMEOUT,
            "OPTIONS": big,
        },
    }
    if redis_url is not None:
        caches["RedisCache"] = {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": redis_url,
            "TIMEOUT": TIMEOUT,
        }
    settings.configure(
        DEBUG=False,
        SECRET_KEY="benchmark-only",
        USE_TZ=True,
        CACHES=caches,
        INSTALLED_APPS=[],
        ALLOWED_HOSTS=["127.0.0.1", "localhost"],
    )
    django.setup()


def version_of(dist: str) -> str:
    """Installed version of a distribution, or 'not installed'."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> list[str]:
    """Markdown bullet lines: CPU, cores, OS, Python, Django, the peers and redis-server."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    redis_v = "not found"
    exe = shutil.which("redis-server")
    if exe:
        with contextlib.suppress(Exception):
            out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10)
            redis_v = out.stdout.strip()
    load = ", ".join(f"{x:.2f}" for x in _LOAD_AT_START)
    return [
        f"- CPU: {cpu}; {os.cpu_count()} logical cores; load average at start {load}",
        f"- OS: {platform.platform()}",
        f"- Python {platform.python_version()} ({platform.python_implementation()})",
        f"- Django {version_of('Django')}, django-rustcache {version_of('django-rustcache')}",
        f"- theine {version_of('theine')} (theine-core {version_of('theine-core')}), "
        f"diskcache {version_of('diskcache')}, redis-py {version_of('redis')}, "
        f"hiredis {version_of('hiredis')}",
        f"- redis-server: {redis_v}",
    ]


# Tables --------------------------------------------------------------------------------------


def keep_hitratio_section(out: Path, report: str) -> str:
    """``report`` with the sections that other scripts wrote into ``out`` (between their markers)
    carried over, so that rewriting the file does not lose them: benchmarks/hitratio_optimum.py's
    hit ratios, benchmarks/near.py's NearCache figures, benchmarks/e2e.py's end-to-end ones and
    benchmarks/compress.py's compression figures."""
    old = out.read_text() if out.exists() else ""
    for owner in ("hitratio_optimum", "near_bench", "e2e_bench", "compress_bench"):
        begin, end = f"<!-- {owner}:begin -->", f"<!-- {owner}:end -->"
        if begin not in old or end not in old or begin in report:
            continue
        section = old[old.index(begin) : old.index(end) + len(end)]
        report = report.rstrip("\n") + "\n\n" + section + "\n"
    return report


def fmt_ns(ns: float | None) -> str:
    """ns with a sensible number of digits; '—' when not measured."""
    if ns is None:
        return "—"
    if ns >= 100_000:
        return f"{ns / 1000:,.0f} µs"
    if ns >= 10_000:
        return f"{ns / 1000:,.1f} µs"
    return f"{ns:,.0f}"


def fmt_ratio(a: float | None, b: float | None) -> str:
    """``a / b`` as ``1.23x``; '—' when either is missing."""
    if a is None or b is None or b <= 0:
        return "—"
    r = a / b
    return f"{r:,.0f}x" if r >= 100 else f"{r:.2f}x"


Results = dict[str, dict[str, dict[str, float | None]]]  # value -> op -> column -> ns


def value_table(value: str, rows: dict[str, dict[str, float | None]], peers: list[str]) -> str:
    """One value's Markdown table: ns per op, then RustCache/floor and peer/RustCache."""
    cols = ["RustCache", "floor", *peers]
    head = [
        "operation",
        *[f"{c} ns" for c in cols],
        "Rust/floor",
        *[f"{p}/Rust" for p in peers],
    ]
    lines = [f"### {value}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for op, cells in rows.items():
        rust = cells.get("RustCache")
        line = [op, *[fmt_ns(cells.get(c)) for c in cols], fmt_ratio(rust, cells.get("floor"))]
        line += [fmt_ratio(cells.get(p), rust) for p in peers]
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


# Scale ---------------------------------------------------------------------------------------


SCALE_COLUMNS = ["RustCache", "LocMemCache", "floor"]


def scale_section(sizes: list[int], timing: Timing, log: Callable[[str], None]) -> str:
    """Per-op ``get`` hit and ``set`` of the small dict at growing entry counts (random keys).

    RustCache, LocMemCache and the floor (a plain dict of pickled bytes) are filled to each size
    in turn and measured side by side (interleaved repeats), on 10,000 keys drawn at random from
    the whole store, so that the CPU-cache misses of a large store show in every column.
    """
    from django.core.cache import caches

    value = {"id": 42, "name": "apple", "price": 1.2}
    stores: dict[str, Any] = {
        "RustCache": caches["scale-RustCache"],
        "LocMemCache": caches["scale-LocMemCache"],
        "floor": FloorCache(pickled=True),
    }
    rng = random.Random(4)
    table: dict[int, dict[str, float | None]] = {}
    loop = asyncio.new_event_loop()
    filled = 0
    try:
        for cache in stores.values():
            cache.clear()
        for size in sizes:
            t0 = time.monotonic()
            for start in range(filled, size, 10_000):
                batch = {f"s:{i}": value for i in range(start, min(start + 10_000, size))}
                for cache in stores.values():
                    cache.set_many(batch)
            filled = size
            sample = [f"s:{rng.randrange(size)}" for _ in range(min(size, 10_000))]
            cells = {
                col: (cache, Ctx(value, loop, hit_keys=sample)) for col, cache in stores.items()
            }
            errors: dict[str, str] = {}
            gets = measure_row(op_get_hit, cells, timing, errors)
            sets = measure_row(op_set, cells, timing, errors)
            if errors:
                raise RuntimeError(f"scale at {size:,} entries: {errors}")
            table[size] = {f"{c} get": gets[c] for c in stores} | {
                f"{c} set": sets[c] for c in stores
            }
            log(
                f"[bench]   {size:>9,} entries (filled in {time.monotonic() - t0:.1f} s): "
                + ", ".join(f"{k} {fmt_ns(v)}" for k, v in table[size].items())
            )
    finally:
        loop.close()
        for cache in stores.values():
            cache.clear()
        gc.collect()
    cols = [f"{c} {op}" for op in ("get", "set") for c in SCALE_COLUMNS]
    head = ["entries", *[f"{c} ns" for c in cols], "LocMem/Rust get", "LocMem/Rust set"]
    head += ["Rust/floor get"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for size in sizes:
        row = table[size]
        cells_ = [f"{size:,}", *[fmt_ns(row[c]) for c in cols]]
        cells_ += [
            fmt_ratio(row["LocMemCache get"], row["RustCache get"]),
            fmt_ratio(row["LocMemCache set"], row["RustCache set"]),
            fmt_ratio(row["RustCache get"], row["floor get"]),
        ]
        lines.append("| " + " | ".join(cells_) + " |")
    first, last = table[sizes[0]], table[sizes[-1]]
    growth = [f"growth {sizes[0]:,} → {sizes[-1]:,}"]
    for c in cols:
        a_ns, b_ns = first[c], last[c]
        delta = "" if a_ns is None or b_ns is None else f" ({b_ns - a_ns:+,.0f} ns)"
        growth.append(fmt_ratio(b_ns, a_ns) + delta)
    lines.append("| " + " | ".join(growth + ["", "", ""]) + " |")
    return "\n".join(lines)


def eviction_scale_section(sizes: list[int], log: Callable[[str], None]) -> str:
    """Per-op cost of the request paths that evict or reclaim, at growing entry counts.

    For each size N, RustCache stores built directly (not through CACHES):
    * ``s3fifo`` full: ``EVICTION_POLICY="s3fifo"``, ``MAX_ENTRIES=N``, filled to N; ``set`` of new
      keys, each of which evicts one entry.
    * ``lru`` full: ``MAX_ENTRIES=N``, filled to N; ``N // 3 + 1000`` inserts of new keys. Up to
      65,536 entries (one shard) that is Django's rule: the mean includes one cull of a third of
      the store and the slowest single insert is that cull; above, each insert evicts one entry.
    * expired: N entries stored with a 1 s timeout, read after they expired; ``set`` of new keys
      (each reclaims expired entries from the expiry index) and ``get`` of expired keys.
    """
    from django_rustcache import RustCache

    value = {"id": 42, "name": "apple", "price": 1.2}
    rows: list[str] = []

    def fill(cache: Any, n: int, timeout: Any = None) -> None:
        for start in range(0, n, 10_000):
            cache.set_many({f"e:{i}": value for i in range(start, min(start + 10_000, n))}, timeout)

    def timed(fn: Callable[[int], Any], count: int) -> tuple[float, float]:
        worst = 0
        start_all = time.perf_counter_ns()
        for i in range(count):
            t = time.perf_counter_ns()
            fn(i)
            worst = max(worst, time.perf_counter_ns() - t)
        return (time.perf_counter_ns() - start_all) / count, worst

    for size in sizes:
        t0 = time.monotonic()
        cells: dict[str, tuple[float, float]] = {}
        c = RustCache(
            f"evict-s3-{size}",
            {"OPTIONS": {"MAX_ENTRIES": size, "EVICTION_POLICY": "s3fifo"}},
        )
        fill(c, size)
        cells["s3fifo set (full)"] = timed(lambda i, c=c: c.set(f"new:{i}", value), 20_000)
        c.clear()
        c = RustCache(
            f"evict-lru-{size}", {"OPTIONS": {"MAX_ENTRIES": size, "EVICTION_POLICY": "lru"}}
        )
        fill(c, size)
        cells["lru set (full)"] = timed(lambda i, c=c: c.set(f"new:{i}", value), size // 3 + 1000)
        c.clear()
        c = RustCache(f"evict-exp-{size}", {"OPTIONS": {"MAX_ENTRIES": 10 * size}})
        fill(c, size, 1)
        time.sleep(1.1)
        cells["set (store expired)"] = timed(lambda i, c=c: c.set(f"new:{i}", value), 20_000)
        cells["get expired"] = timed(lambda i, c=c, n=size: c.get(f"e:{(i * 7919) % n}"), 20_000)
        c.clear()
        gc.collect()
        rows.append(
            f"| {size:,} | "
            + " | ".join(f"{fmt_ns(mean)} / {fmt_ns(worst)}" for mean, worst in cells.values())
            + " |"
        )
        log(
            f"[bench]   eviction at {size:>9,} entries ({time.monotonic() - t0:.1f} s): "
            + ", ".join(f"{k} {fmt_ns(v[0])}/{fmt_ns(v[1])}" for k, v in cells.items())
        )
    head = "| entries | s3fifo set, full | lru set, full | set, store expired | get, expired |"
    return "\n".join([head, "|---|---|---|---|---|", *rows])


# Targets -------------------------------------------------------------------------------------


def check_targets(results: Results, peers: list[str]) -> list[str]:
    """PASS/FAIL lines for issue 4's targets that this suite measures."""

    def cell(value: str, op: str, col: str) -> float | None:
        return results.get(value, {}).get(op, {}).get(col)

    lines: list[str] = []

    def verdict(ok: bool | None, text: str) -> None:
        word = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
        lines.append(f"{word}  {text}")

    def floor_target(value: str, limit: float, what: str) -> None:
        rust, floor = cell(value, "get (hit)", "RustCache"), cell(value, "get (hit)", "floor")
        ok = None if rust is None or floor is None else rust <= limit * floor
        verdict(
            ok,
            f"get hit, {what}: RustCache {fmt_ns(rust)} ns = {fmt_ratio(rust, floor)} the floor "
            f"({fmt_ns(floor)} ns); target <= {limit}x",
        )

    def locmem_target(value: str, op: str, limit: float, what: str) -> None:
        rust, loc = cell(value, op, "RustCache"), cell(value, op, "LocMemCache")
        ok = None if rust is None or loc is None else loc >= limit * rust
        verdict(
            ok,
            f"{what}: LocMemCache/RustCache = {fmt_ratio(loc, rust)} "
            f"({fmt_ns(loc)} vs {fmt_ns(rust)} ns); target >= {limit:g}x",
        )

    floor_target("user-class instance", 1.3, "user-class instance")
    floor_target("small dict", 0.6, "small dict (below the floor)")
    locmem_target("small dict", "get (hit)", 6, "get hit, small dict")
    locmem_target("short string", "get (hit)", 12, "get hit, short string")
    floor_target("short string", 2.0, "short string")
    locmem_target("small dict", "set", 5, "set, small dict")
    locmem_target("small dict", "get_many (100 keys), per key", 5, "get_many 100 keys, small dict")
    locmem_target("small dict", "aget (hit)", 100, "aget hit, small dict")
    # "Faster than theine's adapter and diskcache on every operation above": the target cells.
    target_cells = [
        ("user-class instance", "get (hit)"),
        ("small dict", "get (hit)"),
        ("short string", "get (hit)"),
        ("small dict", "set"),
        ("small dict", "get_many (100 keys), per key"),
        ("small dict", "aget (hit)"),
    ]
    for peer in ("theine", "diskcache"):
        if peer not in peers:
            verdict(None, f"faster than {peer} on every operation: {peer} not measured")
            continue
        behind = [
            f"{op} / {value} ({fmt_ratio(cell(value, op, peer), cell(value, op, 'RustCache'))})"
            for value, op in target_cells
            if cell(value, op, peer) is not None
            and cell(value, op, "RustCache") is not None
            and cell(value, op, peer) <= cell(value, op, "RustCache")  # type: ignore[operator]
        ]
        verdict(
            not behind,
            f"faster than {peer} on every target operation above ({len(target_cells)} cells)"
            + (f"; not faster on: {'; '.join(behind)}" if behind else ""),
        )
    for peer in ("theine", "diskcache"):
        if peer not in peers:
            continue
        slower = [
            f"{op} / {value} ({fmt_ratio(cells.get(peer), cells.get('RustCache'))})"
            for value, rows in results.items()
            for op, cells in rows.items()
            if cells.get(peer) is not None
            and cells.get("RustCache") is not None
            and cells[peer] <= cells["RustCache"]  # type: ignore[operator]
        ]
        count = sum(len(rows) for rows in results.values())
        verdict(
            not slower,
            f"(wider) faster than {peer} on every operation and value ({count} cells)"
            + (f"; not faster on: {'; '.join(slower)}" if slower else ""),
        )
    return lines


# Main ----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="about a minute: fewer repeats, no 5M")
    p.add_argument("--repeats", type=int, help="loops per cell (default 15, or 11 with --quick)")
    p.add_argument("--target-ms", type=float, help="ms per loop (default 20, or 5 with --quick)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown file to write")
    p.add_argument("--no-redis", action="store_true", help="skip the RedisCache column")
    p.add_argument("--no-scale", action="store_true", help="skip the scale table")
    p.add_argument(
        "--scale-sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        help="comma-separated entry counts (default 1000,100000,1000000[,5000000])",
    )
    p.add_argument("--values", help="comma-separated subset of the value names to run")
    p.add_argument("--e2e", action="store_true", help="also run the end-to-end gunicorn+wrk test")
    p.add_argument("--e2e-seconds", type=int, default=10, help="wrk duration per backend")
    p.add_argument(
        "--memory",
        action="store_true",
        help="also run benchmarks/memory.py: resident memory vs LocMemCache, MAX_BYTES churn",
    )
    p.add_argument("--memory-entries", type=int, default=1_000_000, help="entries per process")
    p.add_argument("--churn-ops", type=int, default=1_000_000, help="operations of the churn")
    p.add_argument("--command", help="the command line to record (run.sh passes it)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every section and write the report."""
    args = parse_args(argv)
    timing = Timing(
        repeats=args.repeats or (11 if args.quick else 15),
        target_ns=int((args.target_ms or (5 if args.quick else 20)) * 1e6),
    )
    sizes = args.scale_sizes or (
        [1_000, 100_000, 1_000_000] if args.quick else [1_000, 100_000, 1_000_000, 5_000_000]
    )
    command = args.command or " ".join(["python", *sys.argv])
    started = time.monotonic()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    # SIGTERM/SIGHUP must unwind through the `finally` blocks that stop redis-server.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))

    with tempfile.TemporaryDirectory(prefix="rustcache-bench-") as tmp:
        redis_ctx: contextlib.AbstractContextManager[tuple[str | None, str]]
        if args.no_redis:
            redis_ctx = contextlib.nullcontext((None, "RedisCache skipped (--no-redis)"))
        else:
            os.makedirs(os.path.join(tmp, "redis"))
            redis_ctx = redis_server(os.path.join(tmp, "redis"))
        with redis_ctx as (redis_url, redis_msg):
            log(f"[bench] {redis_msg}")
            configure_django(os.path.join(tmp, "diskcache"), redis_url)
            report = run_all(args, timing, sizes, redis_url, redis_msg, command, log)
    elapsed = time.monotonic() - started
    report = report.replace("@ELAPSED@", f"{elapsed:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(keep_hitratio_section(args.out, report))
    print(report)
    log(f"[bench] wrote {args.out} in {elapsed:.0f} s")
    return 0


def run_all(
    args: argparse.Namespace,
    timing: Timing,
    sizes: list[int],
    redis_url: str | None,
    redis_msg: str,
    command: str,
    log: Callable[[str], None],
) -> str:
    """Measure every table and return the Markdown report (Django must be configured)."""
    from django.core.cache import caches

    peers = [b for b in BACKENDS[1:] if b != "RedisCache" or redis_url is not None]
    kinds = value_kinds()
    if args.values:
        wanted = {v.strip() for v in args.values.split(",")}
        kinds = [k for k in kinds if k.name in wanted]
    notes: list[str] = []
    bare, call = loop_overhead(timing)
    results: Results = {}
    loop = asyncio.new_event_loop()
    try:
        for kind in kinds:
            log(f"[bench] value: {kind.name}")
            cells: dict[str, tuple[Any, Ctx]] = {}
            for col in ["RustCache", "floor", *peers]:
                cache = FloorCache(kind.pickled) if col == "floor" else caches[col]
                ctx = Ctx(value=kind.make(), loop=loop)
                error = prepare(cache, ctx)
                if error:
                    notes.append(f"{col}, {kind.name}: {error}")
                    log(f"[bench]   {col}: {error}")
                cells[col] = (cache, ctx)
            rows: dict[str, dict[str, float | None]] = {}
            for op_name, op in OPS:
                errors: dict[str, str] = {}
                rows[op_name] = measure_row(op, cells, timing, errors)
                for col, error in errors.items():
                    notes.append(f"{col}, {kind.name}, {op_name}: {error}")
                row = ", ".join(f"{col} {fmt_ns(ns)}" for col, ns in rows[op_name].items())
                log(f"[bench]   {op_name:<30} {row}")
            for cache, _ctx in cells.values():
                with contextlib.suppress(Exception):
                    cache.clear()
            results[kind.name] = rows
    finally:
        loop.close()
    scale = ""
    if not args.no_scale:
        log("[bench] scale: RustCache, LocMemCache and the floor; small dict, random keys")
        scale = scale_section(sizes, timing, log)
        log("[bench] eviction and expiry at scale: RustCache")
        scale += (
            "\n\nEviction and expiry on the request path, RustCache, small dict: mean ns / slowest "
            "single operation. `s3fifo`/`lru` full: inserts of new keys into a store filled to "
            "`MAX_ENTRIES` (for `lru`, `N/3 + 1000` inserts: up to 65,536 entries the store has "
            "one shard and Django's cull, so the mean includes one cull of a third of the store "
            "and the slowest insert is that cull; above, every insert evicts one entry). "
            "Expired: N entries stored with a 1 s timeout, then inserts of new keys and reads of "
            "expired keys.\n\n" + eviction_scale_section(sizes, log)
        )
    e2e = ""
    if args.e2e:
        from e2e import run_e2e  # benchmarks/peers/e2e.py, next to this file

        e2e = run_e2e(redis_url, args.e2e_seconds, log)
    targets = check_targets(results, peers)
    memory = ""
    if args.memory:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from memory import memory_section  # benchmarks/memory.py

        memory, memory_targets = memory_section(args.memory_entries, args.churn_ops, log)
        targets += memory_targets
    return render(
        results,
        peers,
        scale,
        e2e,
        memory,
        targets,
        notes,
        command,
        timing,
        sizes,
        redis_msg,
        bare,
        call,
    )


def prepare(cache: Any, ctx: Ctx) -> str | None:
    """Empty the cache, store the value under every pool key and check one read back."""
    cache.clear()
    for i in range(0, len(ctx.hit_keys), 500):
        cache.set_many(dict.fromkeys(ctx.hit_keys[i : i + 500], ctx.value))
    if isinstance(cache, FloorCache):
        cache.put_raw(dict.fromkeys(ctx.counters, 0))  # ints need no copy on the floor
    else:
        cache.set_many(dict.fromkeys(ctx.counters, 0))
    got = cache.get(ctx.hit_keys[0], _MISSING)
    if got is _MISSING:
        return "read-back after set_many missed"
    if not same_value(got, ctx.value):
        return f"read-back differs: {type(got).__name__}"
    return None


def render(
    results: Results,
    peers: list[str],
    scale: str,
    e2e: str,
    memory: str,
    targets: list[str],
    notes: list[str],
    command: str,
    timing: Timing,
    sizes: list[int],
    redis_msg: str,
    bare: float,
    call: float,
) -> str:
    """The whole Markdown report."""
    out = [
        "# RustCache against its peers",
        "",
        "Generated by `benchmarks/peers/bench.py` (see `benchmarks/peers/README.md`). "
        "The machine is shared and noisy: read the ratios, which are measured side by side "
        "in one process, rather than the absolute numbers.",
        "",
        "## Command",
        "",
        f"    {command}",
        "",
        f"Wall time @ELAPSED@; {timing.repeats} repeats per cell of about "
        f"{timing.target_ns / 1e6:g} ms each; each figure is the median of the repeats' "
        "mean ns per operation.",
        "",
        "## Machine",
        "",
        *machine_info(),
        f"- {redis_msg}",
        "",
        "## Reading the tables",
        "",
        "- `X ns`: nanoseconds per operation (`get_many`/`set_many`: per key, calls of 100 keys).",
        "- `floor`: one Python method call that formats the key as Django's default key function "
        '(`"%s:%s:%s" % (prefix, version, key)`), does one plain dict operation and, for values '
        "that must be copied (all but `str`), `pickle.loads`/`pickle.dumps` of the same bytes. "
        "`incr` on the floor is lookup + add + store of an int.",
        "- `Rust/floor`: RustCache's time over the floor's (below 1 means faster than the floor).",
        "- `peer/Rust`: the peer's time over RustCache's (above 1 means RustCache is faster).",
        "- `theine` keeps references: its `get` returns the very object stored (no copy, no "
        "pickling), unlike every other column, which returns an isolated copy.",
        "- `diskcache` is `diskcache.DjangoCache` on SQLite files in a temporary directory; "
        "`RedisCache` is Django's, over redis-py to a redis-server on 127.0.0.1 (loopback TCP).",
        "- `aget`/`aset`: awaited one after another in an asyncio loop; Django's base "
        "implementation (LocMemCache, theine, diskcache, RedisCache) goes through "
        "`sync_to_async`.",
        "- `add (new key)` stores keys that were missing; `delete` removes keys that exist.",
        f"- Loop overhead included in every cell: bare `for` loop {bare:.0f} ns per iteration, "
        f"loop calling a no-op method {call:.0f} ns.",
        "",
        "## Per value",
        "",
    ]
    for value, rows in results.items():
        out += [value_table(value, rows, peers), ""]
    if scale:
        out += [
            "## Scale",
            "",
            "Per-op `get` hit and `set` (overwrite) of the small dict on 10,000 keys drawn at "
            "random from the whole store, at each entry count (MAX_ENTRIES 20 million: nothing "
            "is culled). `floor` is a plain dict of pickled bytes of the same size. A flat column "
            "means no step that grows with the number of entries; the rise that the floor shows "
            "too comes from CPU-cache and TLB misses that any store of that size pays, so compare "
            "a column's growth with the floor's.",
            "",
            scale,
            "",
        ]
    if e2e:
        out += ["## End to end", "", e2e, ""]
    if memory:
        out += [memory]
    out += ["## Targets (issue 4)", "", "```", *targets, "```", ""]
    if notes:
        out += ["## Notes and errors", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
