"""Multi-process coherence (issue 9, "Tests"): forked readers, a writer, stale reads counted.

The harness is tests/coherence.py. RustCache (one store per process) must break the bars: the
proof that the harness can see staleness. NearCache must keep them on our own redis-server and
valkey-server, without faults and with the server paused, killed and restarted, and with its
invalidation link frozen while the data path keeps working.
"""

from __future__ import annotations

import multiprocessing
import socket
import sys
import threading
import time
from typing import Any

import pytest

from tests import coherence, servers

LEASE = 0.5


# The harness itself ---------------------------------------------------------------------------


def test_a_read_is_stale_when_a_newer_value_was_acknowledged_before_it_was_sent():
    writes = [(1.0, 0, 10), (2.0, 0, 20), (3.0, 0, 30), (2.5, 1, 5)]
    reads = [
        (0.5, 0.6, 0, -1),  # before any ack: fresh
        (1.5, 1.6, 0, 10),  # the latest acked value
        (2.0, 2.1, 0, 10),  # sent at the very ack time of 20: not yet stale
        (2.4, 2.5, 0, 10),  # 20 acked at 2.0: stale for 0.4 s
        (3.5, 3.6, 0, 10),  # 20 and 30 acked: as old as the first newer ack (2.0)
        (3.5, 3.6, 0, 40),  # newer than anything acked (an unacked write): fresh
        (3.5, 3.6, 1, -1),  # key 1 missing after its ack at 2.5: stale for 1.0 s
        (3.5, 3.6, 2, -1),  # a key never written: nothing to be stale against
    ]
    stale = coherence.analyze(reads, writes, resets=[])
    assert stale == [(2.4, pytest.approx(0.4)), (3.5, 1.5), (3.5, 1.0)]


def test_a_restart_voids_the_writes_acknowledged_before_it():
    writes = [(1.0, 0, 10), (4.0, 0, 20)]
    reads = [
        (2.0, 2.1, 0, 10),  # before the restart at 3.0: fresh
        (2.5, 3.5, 0, -1),  # sent while down, answered by the empty restarted server: fresh
        (3.5, 3.6, 0, -1),  # after the restart, nothing acked since: fresh
        (4.5, 4.6, 0, 10),  # an old value after a post-restart ack: stale for 0.5 s
        (2.5, 2.6, 0, -1),  # answered before the restart, missing although 10 was acked
    ]
    stale = coherence.analyze(reads, writes, resets=[3.0])
    assert stale == [(4.5, 0.5), (2.5, 1.5)]


@pytest.fixture
def echo():
    """A TCP echo server on a free loopback port."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(4096):
                    conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    server.shutdown(socket.SHUT_RDWR)  # wakes the accept()
    server.close()
    thread.join(5)


def test_the_proxy_forwards_both_ways_and_holds_everything_back_while_frozen(echo):
    proxy = coherence.Proxy("127.0.0.1", echo).start()
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
            s.sendall(b"one")
            assert s.recv(16) == b"one"
            proxy.freeze()
            s.sendall(b"two")
            s.settimeout(0.3)
            with pytest.raises(TimeoutError):
                s.recv(16)
            proxy.thaw()
            s.settimeout(5)
            assert s.recv(16) == b"two"
        assert proxy.connections == 1
    finally:
        proxy.close()


class _HangsAfterWarmUp:
    """A cache whose get() never returns once the run has started (after the warm-up reads)."""

    def __init__(self) -> None:
        self.gets = 0

    def set(self, key, value, timeout=None):
        return True

    def get(self, key, default=None):
        self.gets += 1
        if self.gets > 2:  # the warm-up reads each of the 2 keys once
            time.sleep(3600)
        return default


def test_a_reader_that_never_returns_is_reported_hung_and_killed():
    started = time.monotonic()
    result = coherence.run(
        _HangsAfterWarmUp, readers=2, keys=2, before=0.2, after=0.3, hang_grace=0.5
    )
    assert sorted(result.hung) == ["reader0", "reader1"]
    assert "hung: reader0, reader1" in result.violations()
    assert time.monotonic() - started < 30  # killed, not waited for


#: The value last stored under each key, shared by the forked processes of the test below.
_SHARED: Any = None


class _StaleAfterSample:
    """A coherent cache (one value per key, shared by every process), except that the read
    after each sample of its L1 counter answers what the sample saw, 15 ms earlier."""

    def __init__(self) -> None:
        self.snapshot: list[int] | None = None

    def set(self, key, value, timeout=None):
        _SHARED[int(key.rsplit(":", 1)[1])] = value

    def get(self, key, default=None):
        k = int(key.rsplit(":", 1)[1])
        if self.snapshot is not None:
            value, self.snapshot = self.snapshot[k], None
        else:
            value = _SHARED[k]
        return default if value < 0 else value


def _sample_slowly(cache: _StaleAfterSample) -> int:
    cache.snapshot = list(_SHARED)
    time.sleep(0.015)  # of the 20 ms between two samples
    return 0


def test_a_read_is_judged_by_when_it_was_sent_not_by_when_the_sample_before_it_began(
    monkeypatch,
):
    # The reader samples its L1 counter now and then, just before a read. Were that read taken
    # as sent when the sample began, writes acknowledged during the sample would not count
    # against it, and a value as old as the sample would pass for fresh.
    shared = multiprocessing.get_context("fork").Array("q", [-1] * 4, lock=False)
    monkeypatch.setattr(sys.modules[__name__], "_SHARED", shared)
    result = coherence.run(
        _StaleAfterSample, readers=1, keys=4, before=0.2, after=1.0, l1_hits=_sample_slowly
    )
    assert result.reads > 100 and result.writes_acked > 50, result.row()
    # Each key changes every 20 ms: most reads after a 15 ms sample are stale, by up to 15 ms.
    assert result.stale >= 5 and result.oldest_stale_ms > 5, result.row()
    assert result.stale < result.reads / 4, result.row()  # the other reads are fresh


# RustCache: the harness must see staleness ----------------------------------------------------


def test_rustcache_breaks_the_staleness_bars_because_each_process_has_its_own_store():
    result = coherence.run(
        coherence.rust_maker(), label="RustCache", l1_hits=coherence.rust_hits, after=1.0
    )
    print(coherence.HEADER, result.row(), sep="\n")
    assert result.reads > 1000 and result.writes_acked > 50, result.row()
    assert not result.hung, result.row()
    # Every reader keeps what its own process saw: the writer's values never reach it.
    assert result.stale_fraction >= coherence.NO_FAULT_FRACTION, result.row()
    assert result.oldest_stale_ms > coherence.NO_FAULT_OLDEST_MS, result.row()
    assert result.violations(), result.row()


# NearCache on both servers --------------------------------------------------------------------


def _near_run(server, fault, proxy=None):
    via = ("127.0.0.1", proxy.port) if proxy is not None else None
    result = coherence.run(
        coherence.near_maker(server.url, LEASE, via),
        label=f"NearCache/{server.kind}",
        fault=fault,
        server=server,
        proxy=proxy,
        lease=LEASE,
        l1_hits=coherence.near_hits,
    )
    print(coherence.HEADER, result.row(), *result.errors, sep="\n")
    return result


def _assert_bars(result):
    assert result.reads > 1000 and result.writes_acked > 50, result.row()
    # The test means something only if L1 answers reads: else every read would go to Redis.
    assert result.l1_hits, result.row()
    assert result.violations() == [], result.row()


def test_near_cache_serves_no_stale_read_older_than_10ms_and_under_1_percent_without_faults(
    near_server,
):
    _assert_bars(_near_run(near_server, "none"))


def test_near_cache_keeps_the_staleness_bound_while_the_server_is_paused_for_1_5s(near_server):
    _assert_bars(_near_run(near_server, "pause"))


def test_near_cache_keeps_the_staleness_bound_when_the_server_is_killed_and_restarted(
    near_server,
):
    # Our own server of the same kind: the session's one is not killed under other tests.
    server = servers.start(near_server.kind)
    try:
        result = _near_run(server, "kill")
    finally:
        server.cleanup()
    assert result.writes_failed, result.row()  # the server really was down
    _assert_bars(result)


def test_near_cache_keeps_the_staleness_bound_when_its_invalidation_link_freezes_for_2s(
    near_server,
):
    proxy = coherence.Proxy("127.0.0.1", near_server.port)
    try:
        result = _near_run(near_server, "freeze", proxy)
    finally:
        proxy.close()
    assert proxy.connections >= 4, result.row()  # every reader's listener went through it
    # Writes went on during the freeze: it is the invalidation link alone that stalled.
    assert result.stale_in_fault, result.row()
    _assert_bars(result)


def test_the_frozen_link_bar_catches_an_l1_served_past_the_lease():
    # A NearCache whose LEASE is 3 s, judged against the default 0.5 s: proof that the fault
    # bar can fail. The freeze is the fault that shows a lease too long: while the server is
    # paused or down no write is acknowledged, so nothing can be stale against one.
    server = servers.start("redis")
    proxy = coherence.Proxy("127.0.0.1", server.port)
    try:
        result = coherence.run(
            coherence.near_maker(server.url, 3.0, ("127.0.0.1", proxy.port)),
            label="NearCache LEASE=3",
            fault="freeze",
            proxy=proxy,
            lease=LEASE,
            l1_hits=coherence.near_hits,
        )
    finally:
        proxy.close()
        server.cleanup()
    print(coherence.HEADER, result.row(), sep="\n")
    assert result.oldest_stale_ms > LEASE * 1000 + coherence.FAULT_SLACK_MS, result.row()
    assert result.violations(), result.row()
