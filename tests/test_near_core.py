"""The Rust half of NearCache through its binding: ``_core.Near`` (listener and lease) and the
fill/invalidation methods of ``Handle``, against a real redis-server started here.

A missing ``redis-server`` fails these tests, unless ``RUSTCACHE_NO_REDIS=1`` (then they skip).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from django_rustcache import _core


class Server:
    """A redis-server of our own on a free loopback port and a unix socket."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, unix_path: str) -> None:
        self.proc = proc
        self.port = port
        self.unix_path = unix_path

    def cmd(self, *args: str) -> bytes:
        """Runs one command on a new plain connection; returns the first reply line."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            out = f"*{len(args)}\r\n".encode()
            for a in args:
                b = a.encode()
                out += b"$%d\r\n%s\r\n" % (len(b), b)
            s.sendall(out)
            buf = b""
            while b"\r\n" not in buf:
                chunk = s.recv(4096)
                assert chunk, "redis closed the connection"
                buf += chunk
            return buf.split(b"\r\n", 1)[0]


@pytest.fixture(scope="module")
def redis_server() -> Iterator[Server]:
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("RUSTCACHE_NO_REDIS") == "1":
            pytest.skip("redis-server is not on PATH and RUSTCACHE_NO_REDIS=1")
        pytest.fail("redis-server is not on PATH: install it, or set RUSTCACHE_NO_REDIS=1")
    from tests import servers

    # tests/servers.py: a free port that is surely this server's (another process may take the
    # port between choosing it and the server's bind), a unix socket, stopped by PID.
    ours = servers.start("redis", unix=True)
    try:
        yield Server(ours.proc, ours.port, str(ours.unix_path))  # type: ignore[arg-type]
    finally:
        ours.cleanup()


def wait_until(ok: Callable[[], bool], what: str, limit: float = 10.0) -> None:
    """Polls ``ok()`` until it is true; fails after ``limit`` s (a bound on a wait, generous for
    a loaded machine, not a timing: a passing run never waits longer for it)."""
    deadline = time.monotonic() + limit
    while not ok():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def _handle(location: str) -> Any:
    h = _core.Handle(location, object(), lambda key: None)
    h.configure("p", 1, 300.0, False)
    return h


def _near(server: Server, location: str, *, lease: float = 0.5, **kw: Any) -> Any:
    args: dict[str, Any] = dict(
        host="127.0.0.1",
        port=server.port,
        unix_path=None,
        username=None,
        password=None,
        prefix="p:",
        lease=lease,
        mode="bcast",
        channel="",
        connect_timeout=1.0,
    )
    args.update(kw)
    return _core.Near(location, **args)


@pytest.fixture
def pair(redis_server: Server) -> Iterator[tuple[Any, Any]]:
    """A fresh L1 store (Handle) and its started listener (Near), on an empty Redis."""
    redis_server.cmd("FLUSHALL")
    location = f"near-{uuid.uuid4().hex}"
    h = _handle(location)
    n = _near(redis_server, location)
    n.ensure_started()
    assert n.wait_fresh(5.0), n.stats()
    yield h, n
    n.close()


def test_a_set_by_another_client_removes_the_key_from_l1(
    redis_server: Server, pair: tuple[Any, Any]
) -> None:
    h, n = pair
    h.set("a", 1, None)
    h.set("other", 1, None)
    assert redis_server.cmd("SET", "p:1:a", "2") == b"+OK"
    wait_until(lambda: h.get("a") is None, "the invalidation")
    assert h.get("other") == 1
    stats = n.stats()
    assert stats["invalidations"] >= 1 and stats["connected"] and stats["lease_ok"]
    assert set(stats) == {
        "invalidations",
        "flushes",
        "reconnects",
        "connected",
        "lease_ok",
        "last_pong_rtt_ms",
        "last_error",
        "last_invalidation_age_ms",
        "last_invalidation_lag_ms",
        "invalidation_lags_measured",
        "master_switches",
        "sentinel_watched",
        "sentinel_watch_error",
    }
    # Not behind Sentinel: no watcher, no switch.
    assert (stats["master_switches"], stats["sentinel_watched"]) == (0, None)
    assert stats["sentinel_watch_error"] is None


def test_the_listener_records_when_it_applied_each_invalidation_on_clock_monotonic(
    redis_server: Server, pair: tuple[Any, Any]
) -> None:
    _h, n = pair
    assert n.applied_ns("p:1:a") is None
    s = n.stats()
    assert s["last_invalidation_age_ms"] is None and s["last_invalidation_lag_ms"] is None
    t0 = time.monotonic_ns()  # the same clock as the listener's, in any process on Linux
    assert redis_server.cmd("SET", "p:1:a", "1") == b"+OK"
    wait_until(lambda: n.applied_ns("p:1:a") is not None, "the invalidation of a")
    t1 = time.monotonic_ns()
    a = n.applied_ns("p:1:a")
    assert t0 < a <= t1
    redis_server.cmd("SET", "p:1:b", "1")
    wait_until(lambda: n.applied_ns("p:1:b") is not None, "the invalidation of b")
    b = n.applied_ns("p:1:b")
    assert a <= b <= time.monotonic_ns()
    assert n.applied_ns("p:1:a") == a and n.applied_ns("p:1:never") is None
    redis_server.cmd("SET", "p:1:a", "2")
    wait_until(lambda: n.applied_ns("p:1:a") != a, "the second invalidation of a")
    assert n.applied_ns("p:1:a") > b
    s = n.stats()
    age = s["last_invalidation_age_ms"]
    assert 0 <= age <= (time.monotonic_ns() - t0) / 1e6
    assert s["last_invalidation_lag_ms"] is None, "no write of this process was noted"
    assert s["invalidation_lags_measured"] == 0
    # A write noted as this process's: its invalidation, by another connection, gives the lag.
    before = time.monotonic_ns()
    n.note_writes(["p:1:c"])
    redis_server.cmd("SET", "p:1:c", "1")
    wait_until(lambda: n.applied_ns("p:1:c") is not None, "the invalidation of c")
    after = time.monotonic_ns()
    s = n.stats()
    assert s["invalidation_lags_measured"] == 1
    assert 0 < s["last_invalidation_lag_ms"] <= (after - before) / 1e6
    assert s["last_invalidation_lag_ms"] <= (n.applied_ns("p:1:c") - before) / 1e6
    # Not noted again: a later change of c by someone else is no lag of ours.
    c = n.applied_ns("p:1:c")
    redis_server.cmd("SET", "p:1:c", "2")
    wait_until(lambda: n.applied_ns("p:1:c") != c, "the second invalidation of c")
    assert n.stats()["invalidation_lags_measured"] == 1


def test_values_the_listener_removes_are_released_by_near_with_the_gil(
    redis_server: Server, pair: tuple[Any, Any]
) -> None:
    h, n = pair
    big = b"x" * 4096  # kept as the object itself (not inline): the store holds a reference
    before = sys.getrefcount(big)
    h.set("big", big, None)
    assert sys.getrefcount(big) == before + 1
    redis_server.cmd("SET", "p:1:big", "1")
    wait_until(lambda: not h.has_key("big"), "the invalidation")
    # The listener never drops a Python object: it hands it over, and Near drops it (with the
    # GIL) on its next call.
    assert sys.getrefcount(big) == before + 1
    n.fresh()
    assert sys.getrefcount(big) == before
    # A flush too.
    h.set("big", big, None)
    redis_server.cmd("FLUSHDB")
    wait_until(lambda: len(h) == 0, "the flush")
    assert sys.getrefcount(big) == before + 1
    n.stats()
    assert sys.getrefcount(big) == before


def test_a_fill_stores_unless_the_key_was_invalidated_written_or_flushed_meanwhile(
    redis_server: Server, pair: tuple[Any, Any]
) -> None:
    h, n = pair
    fill = h.fill("p:1:k")
    assert fill.put("k", "v", 60) is True
    assert h.get("k") == "v"
    # GET returned the old value, then the invalidation came, then the put: nothing stored.
    fill = h.fill("p:1:b")
    seen = n.stats()["invalidations"]
    redis_server.cmd("SET", "p:1:b", "new")
    wait_until(lambda: n.stats()["invalidations"] > seen, "the invalidation")
    assert fill.put("b", "old", 60) is False
    assert h.get("b") is None
    # A local write during the fill wins.
    fill = h.fill("p:1:c")
    h.set("c", "local", None)
    assert fill.put("c", "old", 60) is False
    assert h.get("c") == "local"
    # Two fills of one key: only the newest may store.
    first, second = h.fill("p:1:d"), h.fill("p:1:d")
    assert first.put("d", 1, 60) is False
    assert second.put("d", 2, 60) is True
    # invalidate_made drops entries and placeholders by made key.
    fill = h.fill("p:1:e")
    assert h.invalidate_made(["p:1:c", "p:1:d", "p:1:nothing"]) == 2
    assert h.invalidate_made(["p:1:e"]) == 0
    assert fill.put("e", 1, 60) is False
    assert h.get("c") is None and h.get("d") is None
    with pytest.raises(TypeError):
        h.invalidate_made([1])


def test_flushdb_empties_l1(redis_server: Server, pair: tuple[Any, Any]) -> None:
    h, n = pair
    h.set("a", 1, None)
    flushes = n.stats()["flushes"]
    redis_server.cmd("FLUSHDB")
    wait_until(lambda: len(h) == 0, "the flush")
    assert n.stats()["flushes"] == flushes + 1


def test_the_lease_ends_within_lease_of_sigstop_and_comes_back_after_sigcont(
    redis_server: Server,
) -> None:
    location = f"near-{uuid.uuid4().hex}"
    _handle(location)
    n = _near(redis_server, location, lease=0.3)
    n.ensure_started()
    assert n.wait_fresh(5.0)
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        time.sleep(0.3 + 0.02)
        assert time.monotonic() - stopped >= 0.3
        assert not n.fresh(), "L1 would serve after the server stopped for a lease"
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    assert n.wait_fresh(10.0), n.stats()
    n.close()
    assert not n.fresh()


def test_pubsub_mode_over_a_unix_socket(redis_server: Server) -> None:
    location = f"near-{uuid.uuid4().hex}"
    h = _handle(location)
    n = _near(
        redis_server,
        location,
        host=None,
        port=0,
        unix_path=redis_server.unix_path,
        mode="pubsub",
        channel="rustcache:inval",
    )
    n.ensure_started()
    assert n.wait_fresh(5.0), n.stats()
    h.set("a", 1, None)
    h.set("b", 1, None)
    redis_server.cmd("PUBLISH", "rustcache:inval", "p:1:a")
    wait_until(lambda: h.get("a") is None, "the message")
    assert h.get("b") == 1
    redis_server.cmd("PUBLISH", "rustcache:inval", "*")
    wait_until(lambda: len(h) == 0, "the flush")
    n.close()


def test_a_forked_child_has_no_lease_and_starts_its_own_listener_which_flushes(
    redis_server: Server, pair: tuple[Any, Any]
) -> None:
    h, n = pair
    h.set("warm", 1, None)
    # Something in the parent's record, to be left behind by the child.
    n.note_writes(["p:1:warm"])
    redis_server.cmd("SET", "p:1:warm", "0")
    wait_until(lambda: n.applied_ns("p:1:warm") is not None, "the parent's invalidation")
    assert n.stats()["invalidation_lags_measured"] == 1
    h.set("warm", 1, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with a thread (3.12+)
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            ok = not n.fresh() and not n.stats()["connected"]
            # The parent's record of applied invalidations is not the child's.
            s = n.stats()
            ok = ok and n.applied_ns("p:1:warm") is None and s["last_invalidation_age_ms"] is None
            ok = ok and s["last_invalidation_lag_ms"] is None
            ok = ok and s["invalidation_lags_measured"] == 0
            n.ensure_started()
            ok = ok and n.wait_fresh(5.0) and h.get("warm") is None
            ok = ok and n.applied_ns("p:1:warm") is None
            h.set("child", 1, None)
            redis_server.cmd("SET", "p:1:child", "x")
            wait_until(lambda: h.get("child") is None, "the child's invalidation")
            wait_until(lambda: n.applied_ns("p:1:child") is not None, "the child's record")
            ok = ok and n.stats()["last_invalidation_age_ms"] is not None
            n.close()
            code = 0 if ok else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent's listener, L1 and record are untouched.
    assert n.wait_fresh(5.0)
    assert h.get("warm") == 1
    assert n.applied_ns("p:1:warm") is not None
    wait_until(lambda: n.applied_ns("p:1:child") is not None, "the child's write, here")
    assert n.stats()["invalidation_lags_measured"] == 1


def test_near_returns_one_object_per_location_and_checks_its_arguments(
    redis_server: Server,
) -> None:
    kw: dict[str, Any] = dict(
        host="127.0.0.1",
        port=redis_server.port,
        unix_path=None,
        username=None,
        password=None,
        prefix="p:",
        lease=0.5,
        mode="bcast",
        channel="",
        connect_timeout=1.0,
    )
    location = f"near-{uuid.uuid4().hex}"
    a = _core.near(location, **kw)
    assert _core.near(location, **kw) is a
    assert a.l1_location == location
    bad: list[dict[str, Any]] = [
        {"mode": "tracking"},
        {"mode": "pubsub", "channel": ""},
        {"lease": 0.0},
        {"lease": float("nan")},
        {"connect_timeout": -1.0},
        {"unix_path": "/tmp/x.sock"},
        {"host": None},
        {"port": 70000},
    ]
    for change in bad:
        with pytest.raises(ValueError):
            _core.Near(location, **{**kw, **change})
    with pytest.raises(TypeError):
        _core.Near(location, host="127.0.0.1")  # every setting is required
    a.close()


def test_a_forked_child_does_not_keep_the_parents_listener_connection_open(
    redis_server: Server,
) -> None:
    # A child inherits the listener's descriptors but not its thread. Were they kept open, the
    # connection would outlive the parent (its exit, or a reconnect) for as long as the child
    # lives, and the server would keep pushing invalidations into a socket nobody reads.
    import redis

    script = f"""
import os, sys, time, uuid
from django_rustcache import _core
loc = "near-" + uuid.uuid4().hex
h = _core.Handle(loc, object(), lambda key: None)
n = _core.near(loc, host="127.0.0.1", port={redis_server.port}, unix_path=None, username=None,
               password=None, prefix="p:", lease=0.5, mode="bcast", channel="",
               connect_timeout=1.0)
n.ensure_started()
assert n.wait_fresh(5.0)
pid = os.fork()
if pid == 0:
    time.sleep(20)  # alive, touching nothing, after its parent is gone
    os._exit(0)
print(pid, flush=True)
sys.stdin.readline()  # the test looks at the server's clients while the parent is alive
os._exit(0)  # the parent dies without closing its listener
"""
    r = redis.Redis(port=redis_server.port)

    def trackers() -> set[int]:
        """Ids of the server's tracking connections (listeners of this module's earlier tests
        may still be among them: the server is shared)."""
        return {c["id"] for c in r.client_list() if "t" in c["flags"]}

    before = trackers()
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    child = 0
    try:
        assert parent.stdin is not None and parent.stdout is not None
        child = int(parent.stdout.readline())
        # The parent waits for a line before it exits: listed any later, its listener could be
        # gone already (it was, once, in CI) and this would test nothing.
        theirs = trackers() - before  # the parent's listener (fresh before it forked)
        assert theirs, "the parent's listener was not tracking"
        parent.stdin.write("exit\n")
        parent.stdin.close()
        parent.wait(10)
        wait_until(
            lambda: not trackers() & theirs, "the dead parent's listener connection to close"
        )
        os.kill(child, 0)  # the child is still alive: it did not keep the connection open
    finally:
        if child:
            os.kill(child, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
        r.close()


def test_a_fork_while_the_listener_applies_invalidations_never_hangs_the_child(
    redis_server: Server, pair: tuple[Any, Any]
) -> None:
    # The listener takes store locks without the GIL. Were it parked on one that the fork's
    # prepare step holds, the child, releasing that lock, would go through parking_lot's queue
    # of parked threads and could hang there forever (it did, once, in CI: a Popen with
    # preexec_fn in a process whose listener was busy). The window is narrow, so this is a
    # smoke test; src/fork.rs's unit tests check the mechanism that closes it deterministically.
    h, n = pair
    for i in range(200):
        h.set(f"k{i}", i, None)
    ballast = bytearray(64 << 20)  # a larger process: each fork takes longer, as in a real one
    ballast[:: 1 << 12] = b"x" * len(ballast[:: 1 << 12])
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import socket, sys\n"
            f"s = socket.create_connection(('127.0.0.1', {redis_server.port}))\n"
            "cmd = b''.join(b'*3\\r\\n$3\\r\\nSET\\r\\n$%d\\r\\n%s\\r\\n$1\\r\\nx\\r\\n'"
            " % (len(k), k) for k in (b'p:1:k%d' % i for i in range(200)))\n"
            "while True:\n"
            "    s.sendall(cmd)\n"
            "    s.recv(1 << 16)\n",
        ]
    )
    hung = 0
    try:
        # A bound on the wait, not a timing: the writer is a new interpreter, slow to start on a
        # busy machine.
        wait_until(lambda: n.stats()["invalidations"] > 1000, "invalidations to flow", limit=30)
        for _ in range(200):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # fork with a thread
                pid = os.fork()
            if pid == 0:
                os._exit(0)  # the atfork child handler has run by now
            deadline = time.monotonic() + 10
            while os.waitpid(pid, os.WNOHANG) == (0, 0):
                if time.monotonic() > deadline:
                    hung += 1
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    break
                time.sleep(0.001)
            if hung:
                break
    finally:
        writer.kill()
        writer.wait()
    del ballast
    assert hung == 0, "a forked child hung in the fork handler"
