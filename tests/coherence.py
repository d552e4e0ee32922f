"""Multi-process coherence harness: do reads in one process see writes acknowledged in another?

Several forked reader processes read a few keys in a loop through the Django cache API, while a
writer process ``set``s increasing versions. Every read records (send time, key, value), every
acknowledged write (ack time, key, value), all on ``time.monotonic()`` (CLOCK_MONOTONIC, one
clock for every process on Linux). A read is **stale** if a newer value of its key was
acknowledged (the writer's ``set`` had returned) before the read was sent; its age is the read's
send time minus the ack time of the first newer value. A write that raised is not acknowledged
and counts for nothing.

Faults, injected by the parent while the processes run:

- ``pause``: SIGSTOP the server for ``length`` s, then SIGCONT;
- ``kill``: SIGKILL the server, ``length`` s later start it again on the same port (empty: the
  truth is reset, so reads sent after the restart are judged only against writes acked after it);
- ``freeze``: the invalidation listener connects through ``Proxy``, a threaded TCP forwarder that
  stops forwarding both ways for ``length`` s (sockets kept open) while the data path goes direct.
- ``failover``: behind Redis Sentinel (``server`` is a ``servers.SentinelGroup``), SIGKILL the
  master and wait until every sentinel names the promoted replica, which answers as a master: the
  failover time. The data carries over (no reset); a write the dead master acknowledged but had
  not yet passed to the replica is lost, and reads may then be stale for about the failover time,
  so this fault's bar is LEASE + the measured failover time (+ the same slack). ``length`` is how
  long the run budgets for the failover.
- ``switch``: behind Redis Sentinel, ``SENTINEL FAILOVER`` with the master alive, and wait until
  every sentinel names the promoted replica (the failover time). Writes the old master took
  between the replica's promotion and the sentinels' announcement (``+switch-master``) are lost,
  as with ``failover``, hence the same bar. A process that stays on the old master after the
  announcement (it stays a master until the sentinels convert it, about 10 s later) writes and
  reads there: once it is converted, those writes are gone too and reads see older values. The
  run budgets ``length`` (12 s) to outlast the conversion.

By default 4 readers read 4 keys round robin, pausing 0.2 ms between reads, and the writer
writes one of the keys every 5 ms: each key changes every 20 ms, as in the issue's measurement
(a writer every 20 ms). The fraction of stale reads is about the mean delay of an invalidation
after the ack divided by that 20 ms, so the 1% bar asks for a mean delay under 0.2 ms.

Per reader, an optional ``l1_hits(cache) -> int`` callback is sampled every ~20 ms, so that "L1 back
in use after the fault" is measured without knowing the backend (RustCache runs too). A reader or
writer that has not reported by its deadline is killed and reported as hung.

Runnable as a script (from the repository root): ``python tests/coherence.py`` prints a table
for RustCache and for NearCache on our own redis-server and valkey-server (tests/servers.py).
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import multiprocessing
import os
import pickle
import queue
import select
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import uuid
import warnings
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The issue's bars (issue 9, "Tests"): without faults, and with a fault injected.
NO_FAULT_OLDEST_MS = 10.0
NO_FAULT_FRACTION = 0.01
FAULT_SLACK_MS = 100.0  # with a fault: no stale read older than LEASE + this
L1_RECOVERY_S = 2.0  # with a fault: L1 back in use within this long after recovery

#: Fault lengths from the issue; ``kill`` is how long the server stays down before the restart.
FAULT_LENGTHS = {
    "none": 0.0,
    "pause": 1.5,
    "kill": 0.5,
    "freeze": 2.0,
    "failover": 4.0,
    "switch": 12.0,
}
SAMPLE_EVERY = 0.02  # s between two samples of a reader's L1 hit counter

_mono = time.monotonic


# The TCP proxy ---------------------------------------------------------------------------------


class Proxy:
    """A threaded TCP forwarder to ``target``; ``freeze()`` stops forwarding both ways, keeping
    every socket open (a stalled link, not a broken one), until ``thaw()``.

    It listens at once (``port`` is known) but starts its threads in ``start()``, which ``run``
    calls after forking its processes: no thread of ours is running when they fork."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._pumps: list[threading.Thread] = []
        self.connections = 0  # accepted so far
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.1)
        self.port: int = self._server.getsockname()[1]
        self._accepter = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)

    def start(self) -> Proxy:
        """Start accepting and forwarding (idempotent)."""
        if not self._accepter.is_alive() and not self._closed.is_set():
            self._accepter.start()
        return self

    def freeze(self) -> None:
        """Stop forwarding in both directions (bytes wait in the proxy and the kernel buffers)."""
        self._flowing.clear()

    def thaw(self) -> None:
        """Forward again, starting with what was held back."""
        self._flowing.set()

    def close(self) -> None:
        """Close every socket and stop the threads."""
        self._closed.set()
        self._flowing.set()
        with self._lock:
            socks, self._sockets = self._sockets, []
        for s in [self._server, *socks]:
            with contextlib.suppress(OSError):
                s.close()
        if self._accepter.is_alive():
            self._accepter.join(5)
        for pump in self._pumps:  # each wakes within its select() timeout
            pump.join(5)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                client.close()
                continue
            for s in (client, upstream):  # no Nagle: small replies would wait for delayed ACKs
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.settimeout(None)
            with self._lock:
                self.connections += 1
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                pump = threading.Thread(target=self._pump, args=(a, b), daemon=True)
                pump.start()
                self._pumps.append(pump)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self._closed.is_set():
                self._flowing.wait()
                readable, _, _ = select.select([src], [], [], 0.05)
                if not readable:
                    continue
                data = src.recv(65536)
                if not data:
                    break
                self._flowing.wait()  # frozen while reading: hold the bytes back
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def near_listener_via(host: str, port: int) -> None:
    """Make NearCaches built from now on in this process connect their invalidation listener to
    ``host:port`` (e.g. a ``Proxy``) while their data path keeps LOCATION's address.

    Uses ``django_rustcache.near.LISTENER_FACTORY``, NearCache's hook for tests (there is no
    production option for this on purpose). Call it in the process that builds the cache."""
    from django_rustcache import near

    inner = near.LISTENER_FACTORY

    def via(l1_location: str, **kwargs: Any) -> Any:
        kwargs.update(host=host, port=port, unix_path=None)
        return inner(l1_location, **kwargs)

    near.LISTENER_FACTORY = via


# Results ---------------------------------------------------------------------------------------


@dataclass
class Result:
    """What one run measured; ``violations()`` says which of the issue's bars it broke."""

    label: str
    fault: str
    lease: float | None  # None: no lease (a backend without one); fault bar then LEASE=0.5
    duration: float
    reads: int = 0
    stale: int = 0
    oldest_stale_ms: float = 0.0
    read_errors: int = 0
    writes_acked: int = 0
    writes_failed: int = 0
    l1_hits: int | None = None  # over the run, all readers; None without a callback
    #: For a fault: when it started and when the server/link was back, relative to the start.
    fault_at: float | None = None
    recovered_at: float | None = None
    #: Seconds from recovery until every reader's L1 hit counter moved again (None: never).
    l1_recovery_s: float | None = None
    #: Stale reads sent between the fault's start and recovery + 2 s, and the oldest of them.
    stale_in_fault: int = 0
    oldest_in_fault_ms: float = 0.0
    hung: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # first error text per process
    #: Share of the machine's CPU time that was busy during the run (all processes, not just
    #: ours; None where /proc/stat is missing): a saturated machine delays every listener.
    cpu_busy: float | None = None

    @property
    def failover_ms(self) -> float:
        """From the fault (the master killed, or ``SENTINEL FAILOVER``) to recovery (the new
        master named), in ms."""
        if self.fault_at is None or self.recovered_at is None:
            return 0.0
        return (self.recovered_at - self.fault_at) * 1000

    @property
    def stale_fraction(self) -> float:
        return self.stale / self.reads if self.reads else 0.0

    def violations(self) -> list[str]:
        """The issue's bars this run broke, in words (empty: all held)."""
        out = []
        if self.hung:
            out.append(f"hung: {', '.join(self.hung)}")
        if not self.reads or not self.writes_acked:
            out.append(f"nothing measured ({self.reads} reads, {self.writes_acked} acked writes)")
        if self.fault == "none":
            if self.oldest_stale_ms > NO_FAULT_OLDEST_MS:
                out.append(
                    f"oldest stale read {self.oldest_stale_ms:.1f} ms > {NO_FAULT_OLDEST_MS:g} ms"
                )
            if self.stale_fraction >= NO_FAULT_FRACTION:
                out.append(f"{self.stale_fraction:.2%} stale >= {NO_FAULT_FRACTION:.0%}")
        else:
            bound = (0.5 if self.lease is None else self.lease) * 1000 + FAULT_SLACK_MS
            if self.fault in ("failover", "switch"):
                bound += self.failover_ms
            if self.oldest_stale_ms > bound:
                out.append(f"oldest stale read {self.oldest_stale_ms:.1f} ms > {bound:g} ms")
            if self.l1_hits is not None and (
                self.l1_recovery_s is None or self.l1_recovery_s > L1_RECOVERY_S
            ):
                got = "never" if self.l1_recovery_s is None else f"{self.l1_recovery_s:.2f} s"
                out.append(f"L1 back in use after recovery: {got} > {L1_RECOVERY_S:g} s")
        return out

    def row(self) -> str:
        rec = "-" if self.fault == "none" else _fmt_s(self.l1_recovery_s)
        l1 = "-" if self.l1_hits is None else f"{self.l1_hits / max(self.reads, 1):.0%}"
        bars = "ok" if not self.violations() else "FAIL: " + "; ".join(self.violations())
        return (
            f"{self.label:<22} {self.fault:<7} {self.reads:>8} {self.stale_fraction:>8.3%} "
            f"{self.oldest_stale_ms:>9.1f} {self.stale_in_fault:>7} "
            f"{self.oldest_in_fault_ms:>9.1f} "
            f"{self.writes_acked:>6}/{self.writes_failed:<4} {self.read_errors:>6} {l1:>5} "
            f"{rec:>7} {_fmt_share(self.cpu_busy):>4}  {bars}"
        )


HEADER = (
    f"{'cache':<22} {'fault':<7} {'reads':>8} {'stale':>8} {'oldest ms':>9} "
    f"{'f.stale':>7} {'f.oldest':>9} {'acked/failed':>11} {'r.errs':>6} {'L1':>5} "
    f"{'L1 back':>7} {'cpu':>4}  bars"
)


def _fmt_share(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) CPU ticks of the whole machine so far (Linux), or None."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(t) for t in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return sum(ticks) - idle, sum(ticks)


def _fmt_s(s: float | None) -> str:
    return "never" if s is None else f"{s * 1000:.0f}ms"


def analyze(
    reads: list[tuple[float, float, int, int]],
    writes: list[tuple[float, int, int]],
    resets: list[float],
) -> list[tuple[float, float]]:
    """The stale reads among ``reads`` (send time, answer time, key, value; a missing key is
    -1): a list of (send time, age s).

    ``writes`` are the acknowledged (ack time, key, value), values increasing per key. A reset
    (the server restarted empty) voids every write acked before it: a read answered after a
    reset is judged only against writes acked since (a read sent while the server was down and
    answered by the restarted one may rightly see the key missing)."""
    by_key: dict[int, tuple[list[float], list[int]]] = {}
    for ack, key, value in sorted(writes):
        acks, values = by_key.setdefault(key, ([], []))
        acks.append(ack)
        values.append(value)
    resets = sorted(resets)
    stale = []
    for sent, answered, key, value in reads:
        if key not in by_key:
            continue
        acks, values = by_key[key]
        r = bisect.bisect_right(resets, answered)
        lo = bisect.bisect_left(acks, resets[r - 1]) if r else 0
        hi = bisect.bisect_left(acks, sent)  # writes acked strictly before the read was sent
        if hi > lo and values[hi - 1] > value:
            first_newer = bisect.bisect_right(values, value, lo, hi)
            stale.append((sent, sent - acks[first_newer]))
    return stale


# The processes ---------------------------------------------------------------------------------


def _wait_go(go: Any, t0: Any, timeout: float) -> float:
    if not go.wait(timeout):
        raise TimeoutError("the harness never said go")
    start = t0.value
    while _mono() < start:
        time.sleep(0.001)
    return start


def _reader(
    name: str,
    make: Callable[[], Any],
    keys: list[str],
    l1_hits: Callable[[Any], int] | None,
    read_pause: float,
    ready: Any,
    go: Any,
    t0: Any,
    length: float,
    out: str,
) -> None:
    sent_at, recv_at, key_ix, values = array("d"), array("d"), array("l"), array("q")
    samples: list[tuple[float, int]] = []
    errors = 0
    first_error = None
    cache = make()
    for key in keys:  # connect, start a listener, fill L1 (values of before the start)
        with contextlib.suppress(Exception):
            cache.get(key)
    ready.put(name)
    start = _wait_go(go, t0, 60)
    end = start + length
    next_sample = 0.0
    nkeys = len(keys)
    i = 0
    while True:
        sent = _mono()
        if sent >= end:
            break
        if l1_hits is not None and sent >= next_sample:
            samples.append((sent, l1_hits(cache)))
            next_sample = sent + SAMPLE_EVERY
            # The read is sent after the sample: judged as sent before it, a read could miss a
            # write acknowledged meanwhile, and a stale read would pass for a fresh one.
            sent = _mono()
        k = i % nkeys
        i += 1
        try:
            value = cache.get(keys[k])
            received = _mono()
        except Exception as e:  # the server is down: not a read, but counted
            errors += 1
            first_error = first_error or f"{name}: {type(e).__name__}: {e}"
            time.sleep(0.001)
            continue
        sent_at.append(sent)
        recv_at.append(received)
        key_ix.append(k)
        values.append(-1 if value is None else int(value))
        if read_pause:
            time.sleep(read_pause)
    if l1_hits is not None:
        samples.append((_mono(), l1_hits(cache)))
    with open(out, "wb") as f:
        pickle.dump((sent_at, recv_at, key_ix, values, samples, errors, first_error), f)


def _writer(
    make: Callable[[], Any],
    keys: list[str],
    interval: float,
    ready: Any,
    go: Any,
    t0: Any,
    length: float,
    out: str,
) -> None:
    acks: list[tuple[float, int, int]] = []
    failed = 0
    first_error = None
    cache = make()
    nkeys = len(keys)
    version = 0
    for k, key in enumerate(keys):  # every key has a value before the readers start
        version += 1
        cache.set(key, version * nkeys + k, None)
        acks.append((_mono(), k, version * nkeys + k))
    ready.put("writer")
    start = _wait_go(go, t0, 60)
    end = start + length
    next_write = start
    while True:
        now = _mono()
        if now >= end:
            break
        if now < next_write:
            time.sleep(next_write - now)
        next_write = max(next_write + interval, _mono())
        version += 1
        k = version % nkeys
        value = version * nkeys + k
        try:
            cache.set(keys[k], value, None)
        except Exception as e:  # not acknowledged: does not count
            failed += 1
            first_error = first_error or f"writer: {type(e).__name__}: {e}"
            continue
        acks.append((_mono(), k, value))
    with open(out, "wb") as f:
        pickle.dump((acks, failed, first_error), f)


# One run ---------------------------------------------------------------------------------------


def run(
    make: Callable[[], Any],
    *,
    label: str = "cache",
    fault: str = "none",
    server: Any = None,
    proxy: Proxy | None = None,
    lease: float | None = None,
    l1_hits: Callable[[Any], int] | None = None,
    readers: int = 4,
    keys: int = 4,
    write_interval: float = 0.005,
    read_pause: float = 0.0002,
    before: float = 1.0,
    after: float = 2.2,
    length: float | None = None,
    hang_grace: float = 10.0,
) -> Result:
    """Run readers and a writer over ``make()``-built caches (one per process) and measure.

    ``make`` runs in each forked process and returns a Django cache (``caches[alias]`` or a
    backend instance). ``fault`` is ``none``, ``pause``, ``kill`` (these need ``server``: an
    object with ``pid``, ``proc`` and ``start()``, as tests/servers.py's) or ``freeze`` (needs
    ``proxy``, through which ``make``'s cache connects its invalidation listener). The fault
    starts ``before`` s into the run and lasts ``length`` s; the run goes on ``after`` s past
    recovery. Without a fault the run lasts ``before + after`` s."""
    if fault not in FAULT_LENGTHS:
        raise ValueError(f"fault must be one of {sorted(FAULT_LENGTHS)}, not {fault!r}")
    if fault in ("pause", "kill", "failover", "switch") and server is None:
        raise ValueError(f"fault {fault!r} needs the server")
    if fault == "freeze" and proxy is None:
        raise ValueError("fault 'freeze' needs the proxy the listener connects through")
    length = FAULT_LENGTHS[fault] if length is None else length
    # Restarting the server takes a moment: give the kill run that much more time.
    total = before + length + after + (0.5 if fault == "kill" else 0.0)
    run_id = uuid.uuid4().hex[:8]
    key_names = [f"coherence:{run_id}:{i}" for i in range(keys)]
    # fork on purpose, with this process's listener thread running: what gunicorn --preload and
    # Celery prefork do (Python 3.12+ warns about forking a multi-threaded process).
    warnings.filterwarnings("ignore", "This process .* is multi-threaded", DeprecationWarning)
    ctx = multiprocessing.get_context("fork")
    ready, go, t0 = ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0)
    tmp = Path(tempfile.mkdtemp(prefix="coherence-"))
    procs: dict[str, Any] = {}
    outs: dict[str, Path] = {}
    result = Result(label=label, fault=fault, lease=lease, duration=total)
    try:
        for i in range(readers):
            name = f"reader{i}"
            outs[name] = tmp / f"{name}.pickle"
            procs[name] = ctx.Process(
                target=_reader,
                name=name,
                args=(name, make, key_names, l1_hits, read_pause, ready, go, t0, total,
                      str(outs[name])),
            )  # fmt: skip
        outs["writer"] = tmp / "writer.pickle"
        procs["writer"] = ctx.Process(
            target=_writer,
            name="writer",
            args=(make, key_names, write_interval, ready, go, t0, total, str(outs["writer"])),
        )
        for p in procs.values():
            p.start()
        if proxy is not None:
            proxy.start()
        waiting = set(procs)
        deadline = _mono() + 60
        while waiting:
            try:
                waiting.discard(ready.get(timeout=0.2))
            except queue.Empty:
                dead = {n: procs[n].exitcode for n in waiting if not procs[n].is_alive()}
                if dead or _mono() > deadline:
                    raise RuntimeError(
                        f"not ready: {sorted(waiting)}; exited (name: exit code): {dead}"
                    ) from None
        start = _mono() + 0.1
        t0.value = start
        go.set()
        cpu_before = _cpu_times()
        resets = _inject(fault, start + before, length, server, proxy, result, start)
        end = start + total
        time.sleep(max(0.0, end - _mono()))
        cpu_after = _cpu_times()
        if cpu_before and cpu_after and cpu_after[1] > cpu_before[1]:
            busy = (cpu_after[0] - cpu_before[0]) / (cpu_after[1] - cpu_before[1])
            result.cpu_busy = busy
        for name, p in procs.items():
            p.join(max(0.0, end + hang_grace - _mono()))
            if p.is_alive():
                result.hung.append(name)
                os.kill(p.pid, signal.SIGKILL)
                p.join(5)
        _collect(result, outs, resets, start, l1_hits is not None)
    finally:
        go.set()
        for p in procs.values():
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join(5)
        if fault == "pause" and server is not None:
            with contextlib.suppress(OSError):
                os.kill(server.pid, signal.SIGCONT)
        if proxy is not None:
            proxy.thaw()
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    return result


def _inject(
    fault: str, at: float, length: float, server: Any, proxy: Proxy | None, result: Result,
    start: float,
) -> list[float]:  # fmt: skip
    """Inject ``fault`` at ``at`` for ``length`` s; note when; return the resets (restarts)."""
    if fault == "none":
        return []
    time.sleep(max(0.0, at - _mono()))
    result.fault_at = _mono() - start
    resets = []
    if fault == "pause":
        os.kill(server.pid, signal.SIGSTOP)
        time.sleep(length)
        os.kill(server.pid, signal.SIGCONT)
    elif fault == "kill":
        os.kill(server.pid, signal.SIGKILL)
        server.proc.wait(10)
        time.sleep(length)
        resets.append(_mono())  # from here on, the truth is an empty server
        server.start()
    elif fault == "freeze":
        assert proxy is not None
        proxy.freeze()
        time.sleep(length)
        proxy.thaw()
    elif fault == "failover":
        old = server.master
        os.kill(old.pid, signal.SIGKILL)
        old.proc.wait(10)
        server.wait_failover(old.port, timeout=30)
    elif fault == "switch":
        old_port = server.master_port()
        server._ask(server.sentinels[0], "FAILOVER", server.service)
        server.wait_failover(old_port, timeout=30)
    result.recovered_at = _mono() - start
    return resets


def _collect(
    result: Result, outs: dict[str, Path], resets: list[float], start: float, sampled: bool
) -> None:
    reads: list[tuple[float, float, int, int]] = []
    per_reader_samples: list[list[tuple[float, int]]] = []
    writes: list[tuple[float, int, int]] = []
    for name, path in outs.items():
        if name in result.hung or not path.exists():
            if name not in result.hung:
                result.hung.append(f"{name} (exited without a report)")
            continue
        with open(path, "rb") as f:
            data = pickle.load(f)
        if name == "writer":
            writes, result.writes_failed, err = data
            result.writes_acked = sum(1 for ack, _, _ in writes if ack >= start)
        else:
            sent_at, recv_at, key_ix, values, samples, errors, err = data
            reads += zip(sent_at, recv_at, key_ix, values, strict=True)
            result.read_errors += errors
            per_reader_samples.append(samples)
        if err:
            result.errors.append(err)
    result.reads = len(reads)
    stale = analyze(reads, writes, resets)
    result.stale = len(stale)
    result.oldest_stale_ms = max((age for _, age in stale), default=0.0) * 1000
    if result.fault_at is not None and result.recovered_at is not None:
        lo = start + result.fault_at
        hi = start + result.recovered_at + L1_RECOVERY_S
        in_fault = [age for sent, age in stale if lo <= sent <= hi]
        result.stale_in_fault = len(in_fault)
        result.oldest_in_fault_ms = max(in_fault, default=0.0) * 1000
    if sampled:
        result.l1_hits = sum(s[-1][1] - s[0][1] for s in per_reader_samples if s)
        if result.recovered_at is not None:
            result.l1_recovery_s = _l1_recovery(per_reader_samples, start + result.recovered_at)


def _l1_recovery(per_reader: list[list[tuple[float, int]]], recovered: float) -> float | None:
    """Seconds from ``recovered`` until every reader's L1 hit counter has moved (None: one never
    did): a reader's first sample after recovery showing more hits than the one before it."""
    worst = 0.0
    for samples in per_reader:
        moved = None
        for (_, before), (t, hits) in itertools.pairwise(samples):
            if t >= recovered and hits > before:
                moved = t - recovered
                break
        if moved is None:
            return None
        worst = max(worst, moved)
    return worst


# Script mode -----------------------------------------------------------------------------------


def near_hits(cache: Any) -> int:
    """L1 hits of a NearCache (its ``stats()["l1_hits"]``)."""
    return int(cache.stats()["l1_hits"])


def rust_hits(cache: Any) -> int:
    """Hits of a RustCache (all of them are L1 hits)."""
    return int(cache.stats()["hits"])


def near_maker(
    url: str, lease: float, listener: tuple[str, int] | None = None, **options: Any
) -> Callable[[], Any]:
    """A ``make`` for ``run``: a NearCache on ``url`` with its own KEY_PREFIX (its own L1), the
    listener optionally connecting to ``listener`` instead (see ``near_listener_via``);
    ``options`` are more OPTIONS (e.g. ``INVALIDATION="pubsub"``)."""
    prefix = f"coh{uuid.uuid4().hex[:6]}"

    def make() -> Any:
        from django_rustcache import NearCache

        if listener is not None:
            near_listener_via(*listener)
        return NearCache(url, {"KEY_PREFIX": prefix, "OPTIONS": {"LEASE": lease, **options}})

    return make


def rust_maker() -> Callable[[], Any]:
    """A ``make`` for ``run``: a RustCache (one store per process: it cannot be coherent)."""
    location = f"coherence-{uuid.uuid4().hex[:6]}"

    def make() -> Any:
        from django_rustcache import RustCache

        return RustCache(location, {})

    return make


def scenarios(
    kind: str, faults: list[str], lease: float = 0.5, invalidation: str = "tracking"
) -> Iterator[Result]:
    """NearCache on a fresh ``kind`` server (tests/servers.py), one run per fault; ``kind``
    ``sentinel``: a fresh Sentinel group (master, replica, three sentinels) per fault."""
    from tests import servers

    if kind == "sentinel":
        suffix = "" if invalidation == "tracking" else f"/{invalidation}"
        for fault in faults:
            group = servers.start_sentinel_group()
            try:
                yield run(
                    near_maker(group.location(), lease, INVALIDATION=invalidation),
                    label=f"NearCache/sentinel{suffix}",
                    fault=fault,
                    server=group,
                    lease=lease,
                    l1_hits=near_hits,
                )
            finally:
                group.cleanup()
        return
    server = servers.start(kind)
    try:
        for fault in faults:
            proxy = Proxy("127.0.0.1", server.port) if fault == "freeze" else None
            try:
                via = ("127.0.0.1", proxy.port) if proxy else None
                suffix = "" if invalidation == "tracking" else f"/{invalidation}"
                yield run(
                    near_maker(server.url, lease, via, INVALIDATION=invalidation),
                    label=f"NearCache/{kind}{suffix}",
                    fault=fault,
                    server=server,
                    proxy=proxy,
                    lease=lease,
                    l1_hits=near_hits,
                )
            finally:
                if proxy is not None:
                    proxy.close()
    finally:
        server.cleanup()


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default="redis,valkey", help="redis, valkey, sentinel")
    parser.add_argument("--faults", default="none,pause,kill,freeze")
    parser.add_argument("--lease", type=float, default=0.5)
    parser.add_argument("--invalidation", default="tracking", choices=["tracking", "pubsub"])
    parser.add_argument("--no-rustcache", action="store_true")
    args = parser.parse_args(argv)
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    import django

    django.setup()
    print(HEADER, flush=True)
    failed = False
    if not args.no_rustcache:
        r = run(rust_maker(), label="RustCache", l1_hits=rust_hits)
        print(r.row(), flush=True)
    for kind in args.servers.split(","):
        try:
            for r in scenarios(kind, args.faults.split(","), args.lease, args.invalidation):
                print(r.row(), flush=True)
                for e in r.errors[:3]:
                    print(f"    {e}", flush=True)
                failed |= bool(r.violations())
        except Exception:
            traceback.print_exc()
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
