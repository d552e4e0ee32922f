"""fork() with busy threads: the child starts with no in-flight record and no held lock, whatever
the parent's other threads were doing (``src/fork.rs``).

Every child is bounded: the parent polls ``waitpid`` and kills a child that outlives its limit, so
a hang fails the test instead of hanging the suite, and no child is left behind.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
import traceback
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from django_rustcache import RustCache

# Python 3.12+ warns that fork() in a multi-threaded process may deadlock: that is the situation
# under test.
pytestmark = pytest.mark.filterwarnings("ignore:.*fork\\(\\):DeprecationWarning")

#: Far longer than any child may take: a child that inherits a flight waits this long.
STAMPEDE_WAIT = 60.0
#: What a child may take, well under STAMPEDE_WAIT and generous for a loaded machine.
CHILD_LIMIT = 15.0


def make(**options: Any) -> RustCache:
    return RustCache(f"fork-{uuid.uuid4().hex}", {"OPTIONS": options})


def fork_and_wait(child: Callable[[], bool], limit: float = CHILD_LIMIT) -> str:
    """Fork; the child runs ``child`` and exits 0 if it returns True. The parent waits at most
    ``limit`` seconds, killing a child still running then. Returns "ok", "failed" or "hung"."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            code = 0 if child() else 1
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    deadline = time.monotonic() + limit
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return "ok" if os.waitstatus_to_exitcode(status) == 0 else "failed"
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "hung"
        time.sleep(0.01)


@contextmanager
def leading(cache: RustCache, key: str, value: Any = "parent") -> Iterator[None]:
    """A thread is inside ``get_or_set(key)``'s ``default()`` for the duration of the block."""
    inside, release = threading.Event(), threading.Event()

    def compute() -> Any:
        inside.set()
        release.wait(STAMPEDE_WAIT)
        return value

    thread = threading.Thread(target=cache.get_or_set, args=(key, compute))
    thread.start()
    try:
        assert inside.wait(10), "the leader never started"
        yield
    finally:
        release.set()
        thread.join(10)
    assert not thread.is_alive()


def test_a_fill_in_flight_in_another_thread_does_not_hold_up_the_forked_child():
    c = make(STAMPEDE_WAIT=STAMPEDE_WAIT)

    def child() -> bool:
        started = time.monotonic()
        value = c.get_or_set("k", lambda: "child")
        took = time.monotonic() - started
        c.set("other", [1, 2])
        return (
            value == "child"
            and took < CHILD_LIMIT / 2
            and c.get("k") == "child"
            and c.get("other") == [1, 2]
            and not c._h.locked()
        )

    with leading(c, "k"):
        assert fork_and_wait(child) == "ok"
    # The parent's own flight ran its course.
    assert c.get("k") == "parent"


def test_the_forked_child_counts_one_more_fork_generation():
    from django_rustcache._core import fork_generation

    before = fork_generation()
    assert fork_and_wait(lambda: fork_generation() == before + 1) == "ok"
    assert fork_generation() == before


def test_forking_while_threads_hammer_the_store_leaves_every_child_whole_and_prompt():
    c = make(STAMPEDE_WAIT=STAMPEDE_WAIT, MAX_ENTRIES=500)
    stop = threading.Event()
    keys = [f"k{i}" for i in range(4)]

    def fill(i: int) -> Callable[[], Any]:
        def compute() -> Any:
            time.sleep(0.002)  # releases the GIL: a fork lands inside this often
            return {"thread": i}

        return compute

    def hammer(i: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            key = keys[i % len(keys)]
            c.set(f"h{i}-{n % 50}", list(range(n % 7)), timeout=None, tags=[f"t{n % 5}"])
            c.get(f"h{i}-{(n * 7) % 50}")
            if n % 10 == 0:
                c.invalidate_tags([f"t{n % 5}"])
            c.delete(key)
            c.get_or_set(key, fill(i), timeout=None)

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()

    def child() -> bool:
        started = time.monotonic()
        # Every key some thread may have been filling at the fork is the child's to fill now.
        got = [c.get_or_set(key, lambda: "child", timeout=None) for key in keys]
        prompt = time.monotonic() - started < CHILD_LIMIT / 2
        # The store is whole: what it lists is what it holds, and every operation works.
        listed = c.keys()
        whole = len(listed) == len(c._h) and all(c.has_key(k) for k in listed)
        c.set("after", "fork", tags=["t0"])
        works = c.get("after") == "fork" and c.invalidate_tags(["t0"]) >= 1
        c.clear()
        return (
            prompt
            and all(g == "child" or isinstance(g, dict) for g in got)
            and whole
            and works
            and len(c._h) == 0
            and not c._h.locked()
        )

    try:
        time.sleep(0.05)
        outcomes = [fork_and_wait(child) for _ in range(20)]
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert outcomes == ["ok"] * 20


def _report(cache: RustCache, conn: Any) -> None:
    """A multiprocessing child: ``get_or_set`` of the key a parent thread is filling."""
    started = time.monotonic()
    value = cache.get_or_set("k", lambda: "child")
    conn.send((value, time.monotonic() - started))
    conn.close()


def test_a_multiprocessing_fork_child_fills_a_key_its_parent_was_filling():
    c = make(STAMPEDE_WAIT=STAMPEDE_WAIT)
    ctx = multiprocessing.get_context("fork")
    ours, theirs = ctx.Pipe(duplex=False)
    with leading(c, "k"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            proc = ctx.Process(target=_report, args=(c, theirs))
            proc.start()
        theirs.close()
        try:
            assert ours.poll(CHILD_LIMIT), "the child did not answer: it waits for a dead leader"
            value, took = ours.recv()
        finally:
            proc.join(CHILD_LIMIT)
            if proc.is_alive():
                proc.kill()
                proc.join()
    assert (value, proc.exitcode) == ("child", 0)
    assert took < CHILD_LIMIT / 2
