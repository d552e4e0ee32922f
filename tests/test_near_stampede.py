# ruff: noqa: F811  (the fixtures imported from tests.test_near are used as parameters)
"""NearCache ``STAMPEDE_LOCK``: ``get_or_set``'s single-flight across processes (issue 11 item 4).

Several processes missing one key at once compute it once: the first takes a lock in Redis
(``SET NX PX``), the others wait for its release and read the value. A holder that dies frees the
lock by expiry; nobody waits forever. Against real servers (tests/servers.py), with and without
the Rust listener (whose invalidation of the lock wakes the waiters; without it they poll).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import queue
import signal
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import redis
from django.conf import settings
from django.core.cache import caches
from django.core.exceptions import ImproperlyConfigured
from django.template import Context, Template
from django.test import override_settings

from django_rustcache import NearCache
from django_rustcache import near as near_mod
from django_rustcache.decorators import cached
from tests.test_near import (  # noqa: F401 (fixtures)
    cache,
    listener,
    make,
)

PROCESSES = 8
#: Generous bounds on waiting for child processes: a hang fails the test instead of stalling it.
READY_WITHIN = 60.0
DONE_WITHIN = 60.0


def _ctx() -> Any:
    # fork, with the test process's listener threads running (as gunicorn --preload does): each
    # child builds its own NearCache, so its own listener and connections.
    warnings.filterwarnings("ignore", "This process .* is multi-threaded", DeprecationWarning)
    return multiprocessing.get_context("fork")


def _lock_key(cache: NearCache, key: str) -> str:
    return f"{cache.key_prefix}:#l:{cache.make_key(key)}"


def _wait_for(what: Callable[[], Any], within: float = 30.0) -> Any:
    """Poll ``what()`` until it is truthy (a bound, not a timed assertion: failing means hung)."""
    deadline = time.monotonic() + within
    while True:
        got = what()
        if got:
            return got
        assert time.monotonic() < deadline, "condition never came true"
        time.sleep(0.005)


#: What a worker's ``default`` does in this process (set by ``_worker``): the module-level
#: ``@cached`` functions and the template below call it, as ``get_or_set``'s ``default`` would be.
_compute: Callable[[], Any] = lambda: pytest.fail("no worker")  # noqa: E731

#: The alias the fill paths below use: a NearCache configured by ``_worker`` in each process.
ALIAS = "stampede"


@cached(60, cache=ALIAS)
def cached_fn(key: str) -> Any:
    return _compute()


@cached(60, tags="t:{key}", cache=ALIAS)
def cached_tagged(key: str) -> Any:
    return _compute()


class Report:
    """A class with cached methods (``self`` is part of the key, by its repr)."""

    def __repr__(self) -> str:
        return "Report()"

    @cached(60, cache=ALIAS)
    def build(self, key: str) -> Any:
        return _compute()

    @cached(60, tags=lambda self, key: [f"t:{key}"], cache=ALIAS)
    def build_tagged(self, key: str) -> Any:
        return _compute()


FRAGMENT = (
    "{% load rustcache %}{% cache_tagged 60 fragment key using='stampede' %}{{ compute }}"
    "{% endcache_tagged %}"
)
FRAGMENT_TAGGED = (
    "{% load rustcache %}{% cache_tagged 60 fragment key tags='a,b' using='stampede' %}"
    "{{ compute }}{% endcache_tagged %}"
)


def _fill_paths(cache: NearCache, key: str) -> dict[str, Callable[[], Any]]:
    """Every way the package fills a missed key, by name: each computes through ``_compute``."""
    default = lambda: _compute()  # noqa: E731
    context = {"key": key, "compute": default}
    return {
        "get_or_set": lambda: cache.get_or_set(key, default, 60),
        "aget_or_set": lambda: asyncio.run(cache.aget_or_set(key, default, 60)),
        "get_or_set_tags": lambda: cache.get_or_set(key, default, 60, tags=["t"]),
        "aget_or_set_tags": lambda: asyncio.run(cache.aget_or_set(key, default, 60, tags=["t"])),
        "cached": lambda: cached_fn(key),
        "cached_tags": lambda: cached_tagged(key),
        "cached_method": lambda: Report().build(key),
        "cached_method_tags": lambda: Report().build_tagged(key),
        "template": lambda: Template(FRAGMENT).render(Context(context)),
        "template_tags": lambda: Template(FRAGMENT_TAGGED).render(Context(context)),
    }


def _worker(
    url: str,
    params: dict[str, Any],
    key: str,
    counter: str,
    mode: str,
    how: str,
    threads: int,
    ready: Any,
    go: Any,
    out: Any,
) -> None:
    """One process: fill ``key`` by ``how`` (a ``_fill_paths`` name) once ``go`` is set (from
    ``threads`` threads), whose computation INCRs ``counter`` and then, by ``mode``: ``sleep``
    200 ms; ``sleep3`` three times the lock's expiry; ``overlap`` waits until a second
    computation has started (at most 10 s); ``hang`` never returns."""
    global _compute
    # The @cached functions and the template tag find this process's NearCache by alias.
    override_settings(
        CACHES={
            **settings.CACHES,
            ALIAS: {"BACKEND": "django_rustcache.NearCache", "LOCATION": url, **params},
        }
    ).enable()
    cache = caches[ALIAS]
    r = redis.Redis.from_url(url)

    def compute() -> dict[str, int]:
        r.incr(counter)
        if mode == "sleep":
            time.sleep(0.2)
        elif mode == "sleep3":
            time.sleep(3 * cache._options.stampede_lock)
        elif mode == "overlap":
            deadline = time.monotonic() + 10
            while int(r.get(counter) or 0) < 2 and time.monotonic() < deadline:
                time.sleep(0.005)
        elif mode == "hang":
            time.sleep(3600)
        return {"by": os.getpid()}

    _compute = compute
    call = _fill_paths(cache, key)[how]
    ready.put(os.getpid())
    go.wait(READY_WITHIN)
    results: list[Any] = []
    pool = [threading.Thread(target=lambda: results.append(call())) for _ in range(threads - 1)]
    for t in pool:
        t.start()
    results.append(call())
    for t in pool:
        t.join()
    out.put((os.getpid(), results))


class _Procs:
    """Worker processes started together; every one is killed at the end, whatever happens."""

    def __init__(self) -> None:
        self.ctx = _ctx()
        self.ready, self.go, self.out = self.ctx.Queue(), self.ctx.Event(), self.ctx.Queue()
        self.procs: list[Any] = []

    def start(self, n: int, *args: Any) -> list[Any]:
        started = []
        for _ in range(n):
            p = self.ctx.Process(target=_worker, args=(*args, self.ready, self.go, self.out))
            p.start()
            started.append(p)
        self.procs += started
        for _ in started:
            self.ready.get(timeout=READY_WITHIN)
        return started

    def results(self, n: int) -> dict[int, list[Any]]:
        """``{pid: [what each of its calls returned]}`` of ``n`` workers (bounded)."""
        got = {}
        deadline = time.monotonic() + DONE_WITHIN
        for _ in range(n):
            left = deadline - time.monotonic()
            try:
                pid, results = self.out.get(timeout=max(left, 0.01))
            except queue.Empty:
                pytest.fail(f"only {len(got)} of {n} processes returned within {DONE_WITHIN} s")
            got[pid] = results
        return got

    def close(self) -> None:
        self.go.set()
        for p in self.procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
            p.join(10)


@pytest.fixture
def procs():
    p = _Procs()
    yield p
    p.close()


def _params(cache: NearCache, **options: Any) -> dict[str, Any]:
    return {"KEY_PREFIX": cache.key_prefix, "OPTIONS": options}


def _stampede(
    procs: _Procs,
    url: str,
    cache: NearCache,
    raw: Any,
    options: dict[str, Any],
    *,
    mode: str = "sleep",
    how: str = "get_or_set",
    threads: int = 1,
) -> tuple[int, dict[int, list[Any]]]:
    """``PROCESSES`` processes miss one key at once: how many computed it, and what each got."""
    key, counter = f"hot-{uuid.uuid4().hex}", f"calls:{uuid.uuid4().hex}"
    procs.start(PROCESSES, url, _params(cache, **options), key, counter, mode, how, threads)
    procs.go.set()
    results = procs.results(PROCESSES)
    assert raw.keys(f"{cache.key_prefix}:#l:*") == []  # every lock was released
    return int(raw.get(counter) or 0), results


def _one_value(results: dict[int, list[Any]]) -> Any:
    values = [v for vs in results.values() for v in vs]
    assert all(v == values[0] for v in values), values
    return values[0]


# Across processes ---------------------------------------------------------------------------


@pytest.mark.parametrize("invalidation", ["tracking", "pubsub"])
def test_eight_processes_missing_one_key_compute_it_once(
    procs, near_server, cache, raw, invalidation
):
    options = {"STAMPEDE_LOCK": True, "INVALIDATION": invalidation}
    calls, results = _stampede(procs, near_server.url, cache, raw, options)
    assert calls == 1
    assert _one_value(results)["by"] in results  # the holder's value, everywhere


def test_without_the_lock_the_same_stampede_computes_it_in_several_processes(
    procs, near_server, cache, raw
):
    """What the lock prevents: in-process single-flight leaves one computation per process
    (``overlap``: a computation waits, at most 10 s, for a second one to start, so that they
    surely overlap; with the lock the holder would wait out the 10 s alone)."""
    calls, results = _stampede(procs, near_server.url, cache, raw, {}, mode="overlap")
    assert calls >= 2
    _one_value(results)  # Redis's SET NX still makes them all return the first stored value


@pytest.mark.parametrize("how", list(_fill_paths(None, "")))  # type: ignore[arg-type]
def test_every_fill_path_computes_once_across_processes(procs, near_server, cache, raw, how):
    """``get_or_set``, ``aget_or_set``, ``@cached`` functions and methods and
    ``{% cache_tagged %}``, with and without tags: 8 processes missing one key at once, one
    computation (the template tag rendered in every process before it filled by get_or_set)."""
    calls, results = _stampede(procs, near_server.url, cache, raw, {"STAMPEDE_LOCK": 30}, how=how)
    assert calls == 1
    _one_value(results)


def test_threads_and_processes_together_compute_it_once(procs, near_server, cache, raw):
    calls, results = _stampede(procs, near_server.url, cache, raw, {"STAMPEDE_LOCK": 30}, threads=4)
    assert calls == 1
    assert sum(len(v) for v in results.values()) == PROCESSES * 4
    _one_value(results)


def test_aget_or_set_in_eight_processes_computes_it_once(procs, near_server, cache, raw):
    calls, results = _stampede(
        procs, near_server.url, cache, raw, {"STAMPEDE_LOCK": True}, how="aget_or_set"
    )
    assert calls == 1
    _one_value(results)


@pytest.mark.parametrize("how", ["get_or_set", "aget_or_set"])
def test_a_holder_computing_for_three_lock_expiries_is_not_joined(
    procs, near_server, cache, raw, how
):
    """The holder's ``default()`` takes three times ``STAMPEDE_LOCK``: its renewer extends the
    lock meanwhile, so the 7 processes that missed the key after it took the lock wait for its
    value instead of computing it a second time once the first expiry has passed."""
    key, counter = f"hot-{uuid.uuid4().hex}", f"calls:{uuid.uuid4().hex}"
    params = _params(cache, STAMPEDE_LOCK=1.5)
    procs.start(1, near_server.url, params, key, counter, "sleep3", how, 1)
    procs.go.set()
    _wait_for(lambda: raw.get(counter) == b"1")  # the holder is computing, lock taken
    procs.go.clear()
    procs.start(PROCESSES - 1, near_server.url, params, key, counter, "sleep3", how, 1)
    procs.go.set()
    results = procs.results(PROCESSES)
    assert int(raw.get(counter)) == 1
    assert _one_value(results)["by"] in results
    assert not raw.exists(_lock_key(cache, key))


def test_a_holder_killed_mid_computation_costs_one_lock_expiry_and_nobody_hangs(
    procs, near_server, cache, raw
):
    expiry = 3.0
    key, counter = f"hot-{uuid.uuid4().hex}", f"calls:{uuid.uuid4().hex}"
    params = _params(cache, STAMPEDE_LOCK=expiry)
    (holder,) = procs.start(1, near_server.url, params, key, counter, "hang", "get_or_set", 1)
    procs.go.set()
    _wait_for(lambda: raw.get(counter) == b"1")  # the holder is computing, lock taken
    assert raw.exists(_lock_key(cache, key))
    procs.go.clear()
    procs.start(PROCESSES - 1, near_server.url, params, key, counter, "sleep", "get_or_set", 1)
    procs.go.set()
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(10)
    results = procs.results(PROCESSES - 1)
    # One successor computed, after the dead holder's lock expired; the rest waited for it.
    assert int(raw.get(counter)) == 2
    assert _one_value(results)["by"] in results
    assert not raw.exists(_lock_key(cache, key))


def test_a_lock_taken_before_fork_is_not_held_by_the_child(procs, near_server, make, raw):
    """The parent computes (holding the lock) while a forked child misses the same key: the
    child waits for the parent's value instead of computing or freeing the parent's lock."""
    cache = make(OPTIONS={"STAMPEDE_LOCK": 30})
    key, counter = f"hot-{uuid.uuid4().hex}", f"calls:{uuid.uuid4().hex}"
    inside, release = threading.Event(), threading.Event()

    def parent_default() -> dict[str, int]:
        inside.set()
        release.wait(30)
        return {"by": os.getpid()}

    parent = threading.Thread(target=lambda: cache.get_or_set(key, parent_default, 60))
    parent.start()
    try:
        assert inside.wait(30)
        # The child forks now, with this process holding the lock and its flight.
        procs.start(1, near_server.url, _params(cache, STAMPEDE_LOCK=30), key, counter, "sleep",
                    "get_or_set", 1)  # fmt: skip
        procs.go.set()
        assert raw.exists(_lock_key(cache, key))
        time.sleep(0.3)  # most likely the child is waiting for the lock now (either way it must
        # not compute: it waits for the lock or, if it comes later, hits the value)
    finally:
        release.set()
        parent.join(30)
    (got,) = procs.results(1).values()
    assert got == [{"by": os.getpid()}]
    assert raw.get(counter) is None  # the child never computed


# One process: the protocol's edges ---------------------------------------------------------


def _in_thread(fn: Callable[[], Any], within: float = 30.0) -> Any:
    """``fn()`` in a thread, failing the test if it has not returned ``within`` s (a hang);
    what it raised is raised here."""
    box: list[Any] = []

    def run() -> None:
        try:
            box.append((fn(), None))
        except BaseException as e:  # handed to the test's thread
            box.append((None, e))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(within)
    assert not t.is_alive(), f"still waiting after {within} s"
    value, error = box[0]
    if error is not None:
        raise error
    return value


def _get_or_set(cache: NearCache, default: Callable[[], Any], use_async: bool) -> Any:
    """``get_or_set("k", default)``, or ``aget_or_set`` on a loop of its own, in ``_in_thread``."""
    if use_async:
        return _in_thread(lambda: asyncio.run(cache.aget_or_set("k", default)))
    return _in_thread(lambda: cache.get_or_set("k", default))


def test_the_lock_lives_under_the_prefix_while_computing_and_is_gone_after(make, raw):
    cache = make(OPTIONS={"STAMPEDE_LOCK": 7})
    lock = _lock_key(cache, "k")
    seen = {}

    def default() -> str:
        seen["token"] = raw.get(lock)
        seen["pttl"] = raw.pttl(lock)
        seen["keys"] = cache.keys("*")
        return "v"

    assert cache.get_or_set("k", default) == "v"
    assert seen["token"] and len(seen["token"]) == 32
    assert 0 < seen["pttl"] <= 7000
    assert lock.startswith(f"{cache.key_prefix}:")  # inside the tracked prefix
    assert seen["keys"] == []  # keys() never lists a lock
    assert not raw.exists(lock)
    assert cache.get("k") == "v"


def _count_renewals(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """What each ``_Renewal.renew`` returned, in order (the renewer thread's tries)."""
    seen: list[bool] = []
    real = near_mod._Renewal.renew

    def renew(self: Any) -> bool:
        go_on = real(self)
        seen.append(go_on)
        return go_on

    monkeypatch.setattr(near_mod._Renewal, "renew", renew)
    return seen


def test_a_holder_whose_lock_was_lost_neither_extends_nor_frees_its_successors(
    make, raw, monkeypatch
):
    """The lock expired under a stalled holder and another process took it: the holder's
    renewer tries again (compare-and-extend by token: not its lock, so untouched, and it
    stops), and its release leaves it alone too."""
    renewals = _count_renewals(monkeypatch)
    cache = make(OPTIONS={"STAMPEDE_LOCK": 0.3})
    lock = _lock_key(cache, "k")

    def slow() -> str:
        raw.delete(lock)  # as if it had expired while this holder stalled
        raw.set(lock, b"successor", px=30_000)  # and another process took it
        _wait_for(lambda: False in renewals)  # the renewer tried, found it lost, stopped
        return "v"

    assert cache.get_or_set("k", slow) == "v"
    assert raw.get(lock) == b"successor"
    assert raw.pttl(lock) > 20_000  # not shortened to this holder's 0.3 s
    assert renewals[-1] is False and renewals.count(False) == 1


@pytest.mark.parametrize("use_async", [False, True])
def test_the_holder_extends_its_lock_while_it_computes(make, raw, monkeypatch, use_async):
    """A ``default()`` running for three lock expiries still holds its lock (the same token)
    at the end: the renewer extended it, also while an async holder blocks the loop."""
    renewals = _count_renewals(monkeypatch)
    cache = make(OPTIONS={"STAMPEDE_LOCK": 1.0})
    lock = _lock_key(cache, "k")
    seen = {}

    def slow() -> str:
        seen["token"] = raw.get(lock)
        time.sleep(3.0)  # three expiries, blocking this thread (and the loop, when async)
        seen["then"] = raw.get(lock)
        return "v"

    assert _get_or_set(cache, slow, use_async) == "v"
    assert seen["token"] and seen["then"] == seen["token"]
    # Extended (a last try may find it already released: it then stops, changing nothing).
    assert True in renewals
    assert not raw.exists(lock)


def test_the_holder_stops_extending_its_lock_after_the_cap(make, raw, monkeypatch):
    """A ``default()`` that never ends loses its lock after ``_LOCK_LIFE`` expiries (here 2 of
    1 s): the renewal is bounded, so a holder stuck forever does not block the key forever."""
    monkeypatch.setattr(near_mod, "_LOCK_LIFE", 2)
    renewals = _count_renewals(monkeypatch)
    cache = make(OPTIONS={"STAMPEDE_LOCK": 1.0})
    lock = _lock_key(cache, "k")

    def stuck() -> str:
        _wait_for(lambda: renewals)  # the renewer has been at it
        _wait_for(lambda: not raw.exists(lock))  # and then left it to expire
        return "v"

    assert _in_thread(lambda: cache.get_or_set("k", stuck), within=60) == "v"
    _wait_for(lambda: False in renewals)  # the renewer gave it up itself (at the cap)
    assert True in renewals  # it did extend it before (a third of an expiry late at most)
    assert renewals.count(False) == 1 and renewals[-1] is False


def test_the_renewer_thread_runs_only_while_a_lock_is_held(make, raw):
    cache = make(OPTIONS={"STAMPEDE_LOCK": 0.3})
    seen = []

    def default() -> str:
        seen.append(near_mod._RENEWER.thread)
        return "v"

    cache.get_or_set("k", default)
    assert seen[0] is not None and seen[0].name == "django-rustcache-lock-renewer"
    seen[0].join(30)
    assert not seen[0].is_alive()
    assert near_mod._RENEWER.thread is None and near_mod._RENEWER.held == []


def test_a_renewer_thread_that_could_not_start_is_not_taken_for_running(make, raw, monkeypatch):
    """Starting the renewer's thread fails (no threads left): that call raises, holding
    nothing, and the next one starts a thread instead of counting on the one that never ran."""
    cache = make(OPTIONS={"STAMPEDE_LOCK": 30})
    _wait_for(lambda: near_mod._RENEWER.thread is None)  # an earlier test's has exited
    real_start = threading.Thread.start

    def start(self: threading.Thread) -> None:
        if self.name == "django-rustcache-lock-renewer":
            raise RuntimeError("can't start new thread")
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        cache.get_or_set("k", lambda: "v")
    assert not raw.exists(_lock_key(cache, "k"))
    assert near_mod._HELD_LOCKS.get() == frozenset()
    monkeypatch.setattr(threading.Thread, "start", real_start)
    running = []

    def default() -> str:
        thread = near_mod._RENEWER.thread
        running.append(thread is not None and thread.is_alive())
        return "v"

    assert cache.get_or_set("k", default) == "v"
    assert running == [True]


def _forked_holder(url: str, params: dict[str, Any], key: str, out: Any) -> None:
    """A fork() child computing ``key`` for three lock expiries: whether it kept its lock."""
    cache = NearCache(url, params)
    r = redis.Redis.from_url(url)
    lock = _lock_key(cache, key)

    def slow() -> bool:
        token = r.get(lock)
        time.sleep(3 * cache._options.stampede_lock)
        return token is not None and r.get(lock) == token

    out.put(cache.get_or_set(key, slow, 60))


def test_a_child_forked_while_the_parent_extends_a_lock_extends_its_own(make, raw, near_server):
    """The parent's renewer thread is running (it holds a lock) when the child forks: the
    child must not take it for alive (it does not exist there), but start its own."""
    cache = make(OPTIONS={"STAMPEDE_LOCK": 1.0})
    inside, release = threading.Event(), threading.Event()

    def parent_default() -> str:
        inside.set()
        release.wait(60)
        return "parent's"

    parent = threading.Thread(target=lambda: cache.get_or_set("p", parent_default, 60))
    parent.start()
    ctx = _ctx()
    out = ctx.Queue()
    child = None
    try:
        assert inside.wait(30)
        assert near_mod._RENEWER.thread is not None  # extending the parent's lock now
        child = ctx.Process(
            target=_forked_holder,
            args=(near_server.url, _params(cache, STAMPEDE_LOCK=1.0), "c", out),
        )
        child.start()
        assert out.get(timeout=DONE_WITHIN) is True  # the child kept its lock for 3 s
    finally:
        release.set()
        parent.join(30)
        if child is not None:
            child.join(10)
            if child.is_alive():
                os.kill(child.pid, signal.SIGKILL)


def test_a_waiter_computes_itself_once_the_lock_is_free_without_a_value(make, raw):
    cache = make(OPTIONS={"STAMPEDE_LOCK": 30})
    lock = _lock_key(cache, "k")
    raw.set(lock, b"someone", px=30_000)
    calls = []

    def default() -> str:
        calls.append(1)
        return "mine"

    def free_it() -> None:
        _wait_for(lambda: raw.pttl(lock) > 0)
        time.sleep(0.05)
        raw.delete(lock)  # its holder failed: released without storing anything

    threading.Thread(target=free_it, daemon=True).start()
    assert _in_thread(lambda: cache.get_or_set("k", default)) == "mine"
    assert calls == [1]


def test_the_wait_is_bounded_even_if_the_lock_never_frees(make, raw):
    """Holders that keep coming (the lock re-taken before anyone sees it free): after twice
    STAMPEDE_LOCK the caller computes without it."""
    cache = make(OPTIONS={"STAMPEDE_LOCK": 0.3})
    lock = _lock_key(cache, "k")
    stop = threading.Event()

    def hog() -> None:
        while not stop.is_set():
            raw.set(lock, uuid.uuid4().hex, px=300)
            time.sleep(0.02)

    raw.set(lock, b"first", px=300)
    threading.Thread(target=hog, daemon=True).start()
    try:
        assert _in_thread(lambda: cache.get_or_set("k", lambda: "computed anyway")) == (
            "computed anyway"
        )
    finally:
        stop.set()


def test_a_waiter_gets_the_holders_value_when_it_arrives(make, raw):
    cache = make(OPTIONS={"STAMPEDE_LOCK": 30})
    other = make(KEY_PREFIX=cache.key_prefix)  # another process's instance, as far as Redis knows
    lock = _lock_key(cache, "k")
    raw.set(lock, b"holder", px=30_000)

    def holder() -> None:
        _wait_for(lambda: raw.pttl(lock) > 0)
        time.sleep(0.05)
        other.set("k", {"from": "holder"})
        raw.delete(lock)

    threading.Thread(target=holder, daemon=True).start()
    got = _in_thread(lambda: cache.get_or_set("k", lambda: pytest.fail("computed")))
    assert got == {"from": "holder"}


@pytest.mark.parametrize("use_async", [False, True])
def test_a_value_stored_between_the_miss_and_the_lock_is_returned_not_computed(
    make, raw, monkeypatch, use_async
):
    """Another process computed, stored and released the lock after this caller missed but
    before its SET NX: the lock is free, and taking it must not mean computing the value again
    (the race a forked stampede hit now and then: 2 computations of 8). The value is read once
    more under the lock, and the lock released at once."""
    cache = make(OPTIONS={"STAMPEDE_LOCK": 30})
    other = make(KEY_PREFIX=cache.key_prefix)  # the other process, as far as Redis knows
    lock = _lock_key(cache, "k")
    sync_set, async_set = redis.Redis.set, redis.asyncio.Redis.set

    def holder_was_quicker(name: Any) -> None:
        if ":#l:" in str(name) and not raw.exists(f"{cache.key_prefix}:1:k"):
            other.set("k", "holder's")  # stored, and its lock (never seen here) released

    def set_sync(self: Any, name: Any, *args: Any, **kwargs: Any) -> Any:
        holder_was_quicker(name)
        return sync_set(self, name, *args, **kwargs)

    async def set_async(self: Any, name: Any, *args: Any, **kwargs: Any) -> Any:
        holder_was_quicker(name)
        return await async_set(self, name, *args, **kwargs)

    monkeypatch.setattr(redis.Redis, "set", set_sync)
    monkeypatch.setattr(redis.asyncio.Redis, "set", set_async)
    calls = []

    def default() -> str:
        calls.append(1)
        return "computed again"

    assert _get_or_set(cache, default, use_async) == "holder's"
    assert calls == []
    assert not raw.exists(lock)


def test_timeout_zero_stores_nothing_so_it_takes_no_lock_and_never_waits(make, raw):
    cache = make(OPTIONS={"STAMPEDE_LOCK": 30})
    raw.set(_lock_key(cache, "k"), b"someone", px=60_000)
    assert _in_thread(lambda: cache.get_or_set("k", lambda: "v", timeout=0), within=10) == "v"
    assert cache.get("k") is None


def test_tags_are_stored_by_the_holder_and_invalidation_recomputes(make, raw):
    cache = make(OPTIONS={"STAMPEDE_LOCK": True})
    assert cache.get_or_set("k", lambda: "v1", tags=["t"]) == "v1"
    assert cache.get_or_set("k", lambda: "v2", tags=["t"]) == "v1"
    cache.invalidate_tags(["t"])
    assert cache.get_or_set("k", lambda: "v3", tags=["t"]) == "v3"
    assert not raw.exists(_lock_key(cache, "k"))


def test_a_raising_default_frees_the_lock(make, raw):
    cache = make(OPTIONS={"STAMPEDE_LOCK": 30})
    with pytest.raises(ZeroDivisionError):
        cache.get_or_set("k", lambda: 1 / 0)
    assert not raw.exists(_lock_key(cache, "k"))
    assert _in_thread(lambda: cache.get_or_set("k", lambda: "ok")) == "ok"


@pytest.mark.parametrize("use_async", [False, True])
def test_a_default_asking_for_its_own_key_does_not_wait_for_its_own_lock(make, use_async):
    cache = make(OPTIONS={"STAMPEDE_LOCK": 30})  # a wait would last 60 s

    def outer() -> Any:
        return cache.get_or_set("k", lambda: "inner") + "+outer"

    if use_async:
        got = _in_thread(lambda: asyncio.run(cache.aget_or_set("k", outer)), within=20)
    else:
        got = _in_thread(lambda: cache.get_or_set("k", outer), within=20)
    assert got == "inner"  # the inner call stored first; the outer add found it


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"  # nothing listens there


def test_redis_down_with_ignore_exceptions_just_computes(make):
    cache = make(_dead_url(), OPTIONS={"STAMPEDE_LOCK": True, "IGNORE_EXCEPTIONS": True})
    calls = []
    assert cache.get_or_set("k", lambda: calls.append(1) or "v") == "v"
    assert asyncio.run(cache.aget_or_set("k", lambda: calls.append(1) or "w")) == "w"
    assert calls == [1, 1]
    strict = make(_dead_url(), OPTIONS={"STAMPEDE_LOCK": True})
    with pytest.raises(redis.ConnectionError):
        strict.get_or_set("k", lambda: "v")


def test_the_lock_error_alone_is_ignored_with_ignore_exceptions(make, raw, monkeypatch):
    """Redis answers the reads but the lock's SET fails: with IGNORE_EXCEPTIONS, compute."""
    cache = make(OPTIONS={"STAMPEDE_LOCK": True, "IGNORE_EXCEPTIONS": True})
    real = redis.Redis.set

    def failing_set(self: Any, name: Any, *args: Any, **kwargs: Any) -> Any:
        if ":#l:" in str(name):
            raise redis.ConnectionError("lock SET failed")
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(redis.Redis, "set", failing_set)
    assert cache.get_or_set("k", lambda: "v") == "v"
    assert cache.get("k") == "v"
    strict = make(OPTIONS={"STAMPEDE_LOCK": True})
    with pytest.raises(redis.ConnectionError, match="lock SET failed"):
        strict.get_or_set("k2", lambda: "v")


def test_aget_or_set_waits_without_blocking_the_loop(make, raw, monkeypatch):
    """The holder here is a task on the same loop: if the waiter blocked the loop, it could not
    run, and the waiter would compute after its bound (60 s) instead of getting its value. And
    the waiter never sleeps in ``time.sleep`` on the loop's thread."""
    blocking = []
    real_sleep = time.sleep

    def sleep(seconds: float) -> None:
        with contextlib.suppress(RuntimeError):
            blocking.append(asyncio.get_running_loop())
        real_sleep(seconds)

    monkeypatch.setattr(time, "sleep", sleep)
    cache = make(OPTIONS={"STAMPEDE_LOCK": 30})
    other = make(KEY_PREFIX=cache.key_prefix)
    lock = _lock_key(cache, "k")
    raw.set(lock, b"holder", px=30_000)

    async def holder() -> None:
        await asyncio.sleep(0.05)
        await other.aset("k", "holder's")
        raw.delete(lock)

    async def main() -> Any:
        task = asyncio.create_task(holder())
        got = await cache.aget_or_set("k", lambda: pytest.fail("computed"))
        await task
        return got

    assert _in_thread(lambda: asyncio.run(main())) == "holder's"
    assert blocking == []


def test_cancelling_a_waiting_aget_or_set_leaves_nothing_behind(make, raw, monkeypatch):
    """Cancelled while it sleeps between two polls of the holder's lock. (Not at a fixed
    time: one landing as a poll's PTTL is sent is lost on Python 3.10 and 3.11, CPython
    gh-86296, and the waiter would wait out the lock's 30 s.)"""
    cache = make(OPTIONS={"STAMPEDE_LOCK": 30})
    lock = _lock_key(cache, "k")
    raw.set(lock, b"holder", px=30_000)
    real_pause = NearCache._apause
    pausing: dict[str, asyncio.Event] = {}

    async def apause(self: NearCache, *args: Any) -> None:
        pausing["now"].set()
        await real_pause(self, *args)

    monkeypatch.setattr(NearCache, "_apause", apause)

    async def main() -> None:
        pausing["now"] = asyncio.Event()
        task = asyncio.create_task(cache.aget_or_set("k", lambda: "v"))
        await asyncio.wait_for(pausing["now"].wait(), 20)  # it polled, and sleeps now
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    _in_thread(lambda: asyncio.run(main()))
    assert raw.get(lock) == b"holder"  # not ours, untouched
    raw.delete(lock)
    assert _in_thread(lambda: asyncio.run(cache.aget_or_set("k", lambda: "v"))) == "v"
    assert not raw.exists(lock)


def test_cancelled_while_taking_the_lock_frees_it(make, raw, monkeypatch):
    """The SET NX reached Redis but its reply never came back to the cancelled task: the lock
    it may hold is freed at once, not left to expire (30 s)."""
    cache = make(OPTIONS={"STAMPEDE_LOCK": 30})
    lock = _lock_key(cache, "k")
    real = redis.asyncio.Redis.set
    stalled: dict[str, asyncio.Event] = {}

    async def set_then_stall(self: Any, name: Any, *args: Any, **kwargs: Any) -> Any:
        result = await real(self, name, *args, **kwargs)
        if ":#l:" in str(name):
            stalled["set"].set()
            await asyncio.sleep(3600)
        return result

    monkeypatch.setattr(redis.asyncio.Redis, "set", set_then_stall)

    async def main() -> None:
        stalled["set"] = asyncio.Event()
        task = asyncio.create_task(cache.aget_or_set("k", lambda: "v"))
        # Cancelled once redis-py has the reply (not while it reads it: on Python 3.10 redis-py
        # may then retry the command instead of raising the cancellation, and the stall below
        # would never be cancelled).
        await asyncio.wait_for(stalled["set"].wait(), 20)
        assert raw.exists(lock)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    _in_thread(lambda: asyncio.run(main()))
    assert not raw.exists(lock)


def test_cancelling_aget_or_set_at_any_point_leaves_no_lock_behind(make, raw):
    """Cancel an ``aget_or_set`` (lock on) after 0, 1, 2, ... turns of the loop, so at every
    point of its round trips. Delivered, the cancellation frees the lock (also when it came
    while the SET NX's reply was on its way); on Python 3.10 and 3.11 it may instead be lost
    (redis-py sends under ``asyncio.wait_for``, which then returns the send's result instead of
    raising: CPython gh-86296) and the call completes, releasing the lock as usual. Either way
    no lock stays behind for its 30 s."""
    cache = make(OPTIONS={"STAMPEDE_LOCK": 30})

    async def main() -> tuple[set[str], list[int]]:
        outcomes, left = set(), []
        for turns in range(60):
            key = f"k{turns}"
            task = asyncio.create_task(cache.aget_or_set(key, lambda: "v"))
            for _ in range(turns):
                await asyncio.sleep(0)
            task.cancel()
            try:
                outcomes.add(await task)
            except asyncio.CancelledError:
                outcomes.add("cancelled")
            if raw.exists(_lock_key(cache, key)):
                left.append(turns)
        return outcomes, left

    outcomes, left = _in_thread(lambda: asyncio.run(main()), within=60)
    assert left == []  # the turns after which a lock was left behind
    assert "cancelled" in outcomes


# Settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expiry"),
    [(True, 10.0), (False, 0.0), (None, 0.0), (0, 0.0), (2.5, 2.5), (3, 3.0), (1e30, 31536000.0)],
)
def test_stampede_lock_values(make, value, expiry):
    assert make(OPTIONS={"STAMPEDE_LOCK": value})._options.stampede_lock == expiry


@pytest.mark.parametrize("bad", [-1, -0.5, float("nan"), float("inf"), "5", [], {"s": 1}])
def test_bad_stampede_lock_values_are_refused_naming_the_setting(make, bad):
    with pytest.raises(ImproperlyConfigured, match=r"OPTIONS\['STAMPEDE_LOCK'\]"):
        make(OPTIONS={"STAMPEDE_LOCK": bad})


def test_the_lock_is_off_by_default(make, raw):
    cache = make()
    seen = []
    assert cache.get_or_set("k", lambda: seen.append(raw.exists(_lock_key(cache, "k"))) or 1)
    assert seen == [0]
