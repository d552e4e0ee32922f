"""The async twins never block the event loop: ``aget_or_set`` waiting for a value another thread
is computing lets every other coroutine run meanwhile."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from django_rustcache import RustCache

#: How long the leading thread computes: the loop must keep ticking far more often than this.
COMPUTE = 2.0


def make(**options: Any) -> RustCache:
    return RustCache(f"async-{uuid.uuid4().hex}", {"OPTIONS": options})


@contextmanager
def leading(
    cache: RustCache, key: str, value: Any = "leader", fail: bool = False
) -> Iterator[threading.Event]:
    """A thread is inside ``get_or_set(key)``'s ``default()`` until the yielded event is set."""
    inside, release = threading.Event(), threading.Event()

    def compute() -> Any:
        inside.set()
        release.wait(60)
        if fail:
            raise RuntimeError("backend down")
        return value

    def lead() -> None:
        try:
            cache.get_or_set(key, compute)
        except RuntimeError:
            pass

    thread = threading.Thread(target=lead)
    thread.start()
    try:
        assert inside.wait(10), "the leader never started"
        yield release
    finally:
        release.set()
        thread.join(10)
    assert not thread.is_alive()


async def with_ticker(work: Any) -> tuple[Any, list[float]]:
    """Awaits ``work`` while a ticker coroutine sleeps 10 ms steps; returns its result and the
    gaps between ticks (a blocked loop shows as one long gap)."""
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.monotonic()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    try:
        result = await work
    finally:
        done.set()
        await task
    return result, gaps


def test_a_coroutine_waiting_for_another_threads_value_lets_the_loop_run():
    c = make(STAMPEDE_WAIT=30)
    with leading(c, "k") as release:
        timer = threading.Timer(COMPUTE, release.set)
        timer.start()
        started = time.monotonic()
        value, gaps = asyncio.run(with_ticker(c.aget_or_set("k", lambda: "follower")))
        took = time.monotonic() - started
        timer.cancel()
    # It waited for the leader and got its value (not its own), while the loop kept ticking.
    assert value == "leader"
    assert took >= COMPUTE * 0.9
    assert len(gaps) > 10
    assert max(gaps) < COMPUTE / 2


def test_a_coroutine_whose_leader_fails_computes_the_value_itself():
    c = make(STAMPEDE_WAIT=30)
    with leading(c, "k", fail=True) as release:
        threading.Timer(0.2, release.set).start()
        value, gaps = asyncio.run(with_ticker(c.aget_or_set("k", lambda: "follower")))
    assert value == "follower"
    assert c.get("k") == "follower"
    assert max(gaps) < COMPUTE / 2


def test_a_coroutine_waits_at_most_stampede_wait_then_computes_without_blocking():
    c = make(STAMPEDE_WAIT=0.3)
    with leading(c, "k"):
        started = time.monotonic()
        value, gaps = asyncio.run(with_ticker(c.aget_or_set("k", lambda: "impatient")))
        took = time.monotonic() - started
    assert value == "impatient"
    assert 0.3 <= took < COMPUTE
    assert len(gaps) > 3


def test_a_cancelled_waiting_coroutine_leaves_no_flight_behind():
    c = make(STAMPEDE_WAIT=30)

    async def cancel_while_waiting() -> None:
        task = asyncio.create_task(c.aget_or_set("k", lambda: "never"))
        await asyncio.sleep(0.1)
        assert not task.done()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    with leading(c, "k"):
        asyncio.run(cancel_while_waiting())
    assert c.get("k") == "leader"
    c.delete("k")
    # Nobody leads "k" now: another thread's get_or_set computes at once.
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(c.get_or_set("k", lambda: "fresh")))
    t.start()
    t.join(10)
    assert out == ["fresh"]


def test_a_coroutine_that_leads_serves_waiting_threads():
    c = make(STAMPEDE_WAIT=30)
    inside, release = threading.Event(), threading.Event()
    out: list[Any] = []

    def compute() -> str:
        inside.set()
        release.wait(10)
        return "from-coroutine"

    async def lead() -> Any:
        # `default` runs in the loop's thread, as Django's aget_or_set runs it; the follower
        # thread starts while it runs.
        return await c.aget_or_set("k", compute)

    follower = threading.Thread(
        target=lambda: (inside.wait(10), out.append(c.get_or_set("k", lambda: "thread")))
    )
    follower.start()
    threading.Timer(0.3, release.set).start()
    assert asyncio.run(lead()) == "from-coroutine"
    follower.join(10)
    assert out == ["from-coroutine"]
