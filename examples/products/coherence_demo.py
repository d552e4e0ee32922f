"""The products demo, second part: four gunicorn workers, one price change, every worker checked.

Starts a redis-server of its own (Debian's package is installed with apt-get when it is missing
and this runs as root; otherwise it says why it cannot and exits with status 2), migrates a
throw-away SQLite database, and runs the products site under ``gunicorn --preload -w 4``, first
with NearCache (an L1 in each worker over that Redis), then with RustCache (a store per worker):

1. warm-up: GET the apple page on fresh connections until each of the 4 workers has served it
   from its own memory (the ``X-Served-By`` header names the worker's pid);
2. ``POST /products/<pk>/price/`` through one worker: apple 1.20 -> 1.50, and post_save
   invalidates the page's tag;
3. for 2 s after the write was answered, GET the page on fresh connections, 4 at a time, and
   record per worker how many pages it served, how many showed the old price (stale), and how
   long after the change it first served the new one.

NearCache: every worker serves the new price within milliseconds (a near cache's invalidation
arrives a moment after the write: an L1 hit in that moment would be stale, and NearCache's lease,
0.5 s, bounds it). The exit status is 1 if NearCache served a stale page later than 1 s after
the change, or a worker never served the new price. RustCache: the workers that did not save
keep serving the old page until it expires (300 s); that is what NearCache is for.

    python coherence_demo.py      (in a venv with Django, django-rustcache, gunicorn, redis-py)
    bash examples/products/run.sh --coherence      (from a fresh clone: builds that venv first)

Every process it starts (redis-server, each gunicorn and its workers) is stopped by PID at the
end, also on Ctrl-C or SIGTERM. Uses only the standard library itself; the site runs Django.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.util
import os
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
WORKERS = 4
CLIENTS = 4  # requests in flight at once: keeps every worker busy, so each gets its share
WINDOW = 2.0  # seconds of GETs after the change
BOUND = 1.0  # NearCache: no stale page later than this after the change (LEASE 0.5 s bounds it)
MAX_WAIT = 10.0  # NearCache: how long to wait past WINDOW for a worker not yet seen fresh
WARM_TIMEOUT = 30.0
OLD, NEW = "1.20", "1.50"
APPLE = re.compile(rb"<li>apple: ([\d.]+)</li>")


class CannotRun(Exception):
    """Something the demo needs is missing: the message says what, and how to get it."""


# redis-server: found, or installed with Debian's package ----------------------------------------


def find_redis_server(install: bool = True) -> str:
    """Path of ``redis-server``; installs Debian's package with apt-get when it is missing and we
    are root (``install``). Raises CannotRun saying why it cannot."""
    path = shutil.which("redis-server")
    if path:
        return path
    how = "install Redis so that redis-server is on PATH (Debian: apt-get install -y redis-server)"
    if not install:
        raise CannotRun(f"redis-server not found on PATH: {how}")
    apt = shutil.which("apt-get")
    if apt is None:
        raise CannotRun(f"redis-server not found on PATH and there is no apt-get here: {how}")
    if os.geteuid() != 0:
        raise CannotRun(
            "redis-server not found on PATH, and installing Debian's package needs root: run "
            "`sudo apt-get install -y redis-server`, then this demo again"
        )
    print("redis-server is missing: apt-get install -y redis-server ...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in ([apt, "update", "-q"], [apt, "install", "-y", "-q", "redis-server"]):
        done = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, check=False)
        if done.returncode != 0:
            raise CannotRun(f"`{' '.join(cmd)}` failed (exit status {done.returncode}): {how}")
    path = shutil.which("redis-server")
    if path is None:
        raise CannotRun(f"apt-get installed redis-server but it is not on PATH: {how}")
    return path


def check_python() -> None:
    """The site's packages must be importable by this Python (gunicorn runs with it)."""
    missing = [m for m in ("django", "django_rustcache", "gunicorn", "redis") if not _has(m)]
    if missing:
        raise CannotRun(
            f"this Python ({sys.executable}) lacks {', '.join(missing)}: pip install Django "
            "gunicorn 'redis>=5' hiredis and the django-rustcache wheel (run.sh --coherence "
            "builds such a venv)"
        )


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _die_with_parent(cmd: list[str]) -> list[str]:
    """``cmd`` run so that it gets SIGKILL if this process dies without stopping it (kill -9):
    util-linux's ``setpriv --pdeathsig`` sets that and execs the command (same PID)."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--", *cmd] if setpriv else cmd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes], group: bool) -> None:
    """SIGTERM by PID, wait, then SIGKILL (with ``group``: the session it leads, its workers)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(15)
    if group:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


class RedisServer:
    """Our own redis-server on a free loopback port, without persistence."""

    def __init__(self, binary: str, dir: Path) -> None:
        self.binary, self.dir = binary, dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> RedisServer:
        log = self.dir / "redis.log"
        for _ in range(5):  # another process may take the free port first
            self.port = _free_port()
            cmd = [
                self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.dir), "--logfile", str(log),
                "--daemonize", "no",
            ]  # fmt: skip
            self.proc = subprocess.Popen(
                _die_with_parent(cmd), stdin=subprocess.DEVNULL, start_new_session=True
            )
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self.proc.poll() is None:
                if self._ping():
                    return self
                time.sleep(0.02)
            _stop(self.proc, group=False)
        text = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise CannotRun(f"redis-server ({self.binary}) did not answer:\n{text}")

    def _ping(self) -> bool:
        """Whether our server answers on the port: the one there names our process as its own
        (another process's server could hold the port we picked; then ours exits, and we retry)."""
        assert self.proc is not None
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"INFO server\r\n")
                reply = b""
                while b"process_id:" not in reply or not reply.endswith(b"\r\n"):
                    chunk = s.recv(4096)
                    if not chunk:
                        return False
                    reply += chunk
                    if len(reply) > 1 << 16:
                        return False
        except OSError:
            return False
        return f"process_id:{self.proc.pid}\r\n".encode() in reply

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc, group=False)


# The site under gunicorn ----------------------------------------------------------------------


class PortTaken(Exception):
    """Another process bound the free port we picked before gunicorn did."""


class Site:
    """``gunicorn --preload -w 4`` serving the products site, in a session of its own."""

    @classmethod
    def start(cls, label: str, db: Path, cache_url: str | None, dir: Path, path: str) -> Site:
        """A site answering ``path``; another port if someone took ours first."""
        for _ in range(3):
            site = cls(label, db, cache_url, dir)
            try:
                site.wait_ready(path)
                return site
            except PortTaken:
                site.stop()
            except BaseException:
                site.stop()
                raise
        raise RuntimeError(f"gunicorn ({label}): three free ports were taken before it bound them")

    def __init__(self, label: str, db: Path, cache_url: str | None, dir: Path) -> None:
        self.label = label
        self.port = _free_port()
        self.log = dir / f"gunicorn-{label}.log"
        env = {k: v for k, v in os.environ.items() if k != "PRODUCTS_CACHE_URL"}
        env.update(
            DJANGO_SETTINGS_MODULE="products_site.settings",
            PRODUCTS_DB=str(db),
            PRODUCTS_WORKER_DEMO="1",
            PYTHONPATH=os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        )
        if cache_url:
            env["PRODUCTS_CACHE_URL"] = cache_url
        cmd = [
            sys.executable, "-m", "gunicorn", "--preload", "-w", str(WORKERS), "-k", "sync",
            "-b", f"127.0.0.1:{self.port}", "--error-logfile", str(self.log),
            "products_site.wsgi:application",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            _die_with_parent(cmd),
            cwd=HERE,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us only; we stop it (and its workers)
        )

    def wait_ready(self, path: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if "Connection in use" in self.tail():
                    raise PortTaken(self.port)
                raise RuntimeError(f"gunicorn ({self.label}) exited:\n{self.tail()}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                if get(self.port, path).status == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"gunicorn ({self.label}) did not answer in {timeout:.0f} s")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def stop(self) -> None:
        _stop(self.proc, group=True)


@dataclass
class Response:
    sent: float
    received: float
    status: int
    pid: int
    price: str | None
    source: str


def get(port: int, path: str) -> Response:
    """One GET on a new connection (gunicorn's sync workers close it after every response)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        sent = time.monotonic()
        conn.request("GET", path)
        r = conn.getresponse()
        body = r.read()
        received = time.monotonic()
    finally:
        conn.close()
    m = APPLE.search(body)
    return Response(
        sent, received, r.status, int(r.getheader("X-Served-By") or 0),
        m.group(1).decode() if m else None, r.getheader("X-Page-Source") or "?",
    )  # fmt: skip


def post_price(port: int, pk: int, price: str) -> tuple[int, float]:
    """The change, through whichever worker takes the connection: (its pid, when answered)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(
            "POST", f"/products/{pk}/price/", body=f"price={price}",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )  # fmt: skip
        r = conn.getresponse()
        body = r.read()
        done = time.monotonic()
    finally:
        conn.close()
    if r.status != 200:
        raise RuntimeError(f"POST /products/{pk}/price/ answered {r.status}: {body!r}")
    return int(r.getheader("X-Served-By") or 0), done


def poll(port: int, path: str, stop: Callable[[Response], bool], limit: float) -> list:
    """GETs from ``CLIENTS`` threads until ``stop(response)`` is true of one (it sees each, in
    the order they are recorded) or ``limit`` seconds have passed."""
    out: list[Response] = []
    lock, done = threading.Lock(), threading.Event()
    errors: list[BaseException] = []
    end = time.monotonic() + limit

    def client() -> None:
        while not done.is_set() and time.monotonic() < end:
            try:
                r = get(port, path)
            except (OSError, http.client.HTTPException) as e:
                errors.append(e)
                done.set()
                return
            if r.status != 200:
                errors.append(RuntimeError(f"worker {r.pid} answered {r.status}"))
                done.set()
                return
            with lock:
                out.append(r)
                if stop(r):
                    done.set()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"GET {path} failed: {errors[0]!r}")
    return out


# One backend's run ------------------------------------------------------------------------------


@dataclass
class Row:
    pid: int
    writer: bool
    pages: int
    stale: int
    first_fresh_ms: float | None  # when its first fresh page arrived, after the change
    first_fresh_asked_ms: float | None  # when that page was asked for
    last_stale_ms: float | None  # when the last stale request was sent, after the change
    fresh_sources: dict[str, int]
    median_ms: float  # of this worker's GETs in the window


def run_backend(label: str, db: Path, cache_url: str | None, tmp: Path) -> tuple[list[Row], int]:
    """Warm-up, the change, the window; one row per worker, and the pid that wrote."""
    pk = _apple_pk(db)
    path = f"/products/{pk}/"
    site = Site.start(label, db, cache_url, tmp, path)
    try:
        from_memory: set[int] = set()

        def warmed(r: Response) -> bool:
            if r.source == "memory" and r.price == OLD:
                from_memory.add(r.pid)
            return len(from_memory) >= WORKERS

        warm = poll(site.port, path, warmed, WARM_TIMEOUT)
        if len(from_memory) < WORKERS:
            seen = sorted(from_memory)
            raise RuntimeError(
                f"{label}: after {WARM_TIMEOUT:.0f} s only workers {seen} served the page from "
                f"memory\n{site.tail()}"
            )
        bad = [r for r in warm if r.price != OLD or r.status != 200]
        if bad:
            raise RuntimeError(f"{label}: a warm-up page was not apple {OLD}: {bad[0]}")
        print(
            f"  warm-up: {len(warm)} GETs until each of the {WORKERS} workers served {path} "
            f"(apple {OLD}) from its own memory",
            flush=True,
        )
        writer, t0 = post_price(site.port, pk, NEW)
        print(
            f"  POST /products/{pk}/price/ price={NEW}: worker {writer} saved it (post_save "
            f"invalidates the tag shop.product:{pk});\n  then GET {path} for {WINDOW:g} s, "
            f"{CLIENTS} at a time, each on a new connection",
            flush=True,
        )
        pids = {r.pid for r in warm}
        fresh: set[int] = set()

        def all_fresh(r: Response) -> bool:
            if r.price == NEW:
                fresh.add(r.pid)
            if time.monotonic() < t0 + WINDOW:
                return False
            return cache_url is None or fresh >= pids  # RustCache: the window only

        after = poll(site.port, path, all_fresh, WINDOW + (MAX_WAIT if cache_url else 0))
    finally:
        site.stop()
    return _rows(after, pids | {r.pid for r in after}, writer, t0), writer


def _apple_pk(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return int(conn.execute("SELECT id FROM shop_product WHERE name = 'apple'").fetchone()[0])


def _rows(rs: list[Response], pids: set[int], writer: int, t0: float) -> list[Row]:
    rows = []
    for pid in sorted(pids):
        mine = [r for r in rs if r.pid == pid]
        stale = [r for r in mine if r.price != NEW]
        fresh = sorted((r for r in mine if r.price == NEW), key=lambda r: r.received)
        sources = Counter(r.source for r in fresh)
        rows.append(
            Row(
                pid,
                pid == writer,
                len(mine),
                len(stale),
                (fresh[0].received - t0) * 1000 if fresh else None,
                (fresh[0].sent - t0) * 1000 if fresh else None,
                (max(r.sent for r in stale) - t0) * 1000 if stale else None,
                sources,
                statistics.median(r.received - r.sent for r in mine) * 1000 if mine else 0.0,
            )
        )
    return rows


def print_table(rows: list[Row]) -> None:
    print(
        f"\n  {'worker':<14} {'pages':>6} {'stale':>6}  {'first fresh page (asked at)':>28}  "
        f"{'GET median':>10}  fresh: memory/redis/view"
    )
    for r in rows:
        who = f"{r.pid} (wrote)" if r.writer else str(r.pid)
        first = "never"
        if r.first_fresh_ms is not None:
            first = f"{r.first_fresh_ms:.1f} ms ({r.first_fresh_asked_ms:.1f} ms)"
        src = "/".join(str(r.fresh_sources.get(k, 0)) for k in ("memory", "redis", "view"))
        median = f"{r.median_ms:.1f} ms"
        print(f"  {who:<14} {r.pages:>6} {r.stale:>6}  {first:>28}  {median:>10}  {src}")
    print(
        "  (times from the moment the change was answered; pages served from memory: the worker's"
        " own store,\n  from redis: read from Redis (then kept in memory), view: the view ran, the"
        " page being invalidated)\n"
    )


# The demo ---------------------------------------------------------------------------------------


def migrate(db: Path) -> None:
    """A fresh database with the seeds (apple 1.20, banana 0.50, cherry 2.50)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PRODUCTS_CACHE_URL",)}
    env.update(DJANGO_SETTINGS_MODULE="products_site.settings", PRODUCTS_DB=str(db))
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--verbosity", "0"], cwd=HERE, env=env, check=True
    )


def demo(redis_binary: str, tmp: Path) -> int:
    seed = tmp / "seed.sqlite3"
    migrate(seed)
    server = RedisServer(redis_binary, tmp).start()
    try:
        out = subprocess.run([redis_binary, "--version"], capture_output=True, text=True).stdout
        version = re.search(r"v=(\S+)", out)
        print(
            f"redis-server {version.group(1) if version else ''} on {server.url} (pid "
            f"{server.proc.pid if server.proc else '?'}), a fresh SQLite database per run\n"
        )
        print(f"1. NearCache (an L1 in each worker, Redis behind): gunicorn --preload -w {WORKERS}")
        shutil.copy(seed, tmp / "near.sqlite3")
        near, _ = run_backend("NearCache", tmp / "near.sqlite3", server.url, tmp)
    finally:
        server.stop()
    print_table(near)

    print(f"2. RustCache (a store in each worker): gunicorn --preload -w {WORKERS}")
    shutil.copy(seed, tmp / "rust.sqlite3")
    rust, _ = run_backend("RustCache", tmp / "rust.sqlite3", None, tmp)
    print_table(rust)
    return conclude(near, rust)


def conclude(near: list[Row], rust: list[Row]) -> int:
    """The two summary lines (tests/test_example.py reads them) and the exit status."""
    fresh_near = [r for r in near if r.first_fresh_ms is not None]
    late = [r for r in near if r.last_stale_ms is not None and r.last_stale_ms > BOUND * 1000]
    near_stale = sum(r.stale for r in near)
    slowest = max((r.first_fresh_ms or 0.0) for r in fresh_near) if fresh_near else 0.0
    print(
        f"NearCache: {len(fresh_near)} of {len(near)} workers served the new price, the last "
        f"{slowest:.1f} ms after the change; stale pages: {near_stale}"
        + (f" (the last sent {max(r.last_stale_ms or 0 for r in near):.1f} ms after it)"
           if near_stale else "")
    )  # fmt: skip
    fresh_rust = [r for r in rust if r.first_fresh_ms is not None]
    rust_stale = sum(r.stale for r in rust)
    print(
        f"RustCache: {len(fresh_rust)} of {len(rust)} workers served the new price; stale pages: "
        f"{rust_stale} in {WINDOW:g} s"
    )
    print(
        "\nWith RustCache each worker has its own store: a save invalidates the page in the "
        "worker that ran it,\nand the others keep serving the old price until the page expires "
        "(300 s). With NearCache every\nworker's L1 hears the change from Redis and drops the "
        "page: the new price everywhere within\nmilliseconds, still served from each worker's "
        "memory."
    )
    failed = []
    if late:
        failed.append(
            f"NearCache served a stale page more than {BOUND:g} s after the change (workers "
            f"{', '.join(str(r.pid) for r in late)})"
        )
    if len(fresh_near) < len(near):
        failed.append(f"a NearCache worker never served the new price in {WINDOW + MAX_WAIT:g} s")
    if failed:
        print("FAILED: " + "; ".join(failed), file=sys.stderr)
        return 1
    print(f"OK: no NearCache worker served a stale page later than {BOUND:g} s after the change")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--find-redis-server",
        action="store_true",
        help="only find (or install) redis-server and print its path (run.sh does this first)",
    )
    args = ap.parse_args(argv)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # unwinds through the finally blocks that stop our processes

    signal.signal(signal.SIGTERM, on_term)
    try:
        redis_binary = find_redis_server()
        if args.find_redis_server:
            print(f"redis-server: {redis_binary}")
            return 0
        check_python()
    except CannotRun as e:
        print(f"The coherence demo cannot run: {e}", file=sys.stderr)
        return 2
    print(
        f"django-rustcache products demo, part 2: {WORKERS} gunicorn workers, apple {OLD} -> "
        f"{NEW} through one of them\n"
    )
    try:
        with tempfile.TemporaryDirectory(prefix="products-coherence-") as tmp:
            return demo(redis_binary, Path(tmp))
    except CannotRun as e:
        print(f"The coherence demo cannot run: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: every process the demo started was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
