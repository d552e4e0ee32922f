"""End to end: gunicorn ``--preload -w 4``, a view doing 20 cache reads, per cache backend.

    python benchmarks/e2e.py [--quick] [--rounds N] [--seconds S] [--no-coherence]
                             [--write-results]

Issue 9's bar: "End to end, gunicorn with 4 workers, a view doing 20 cache reads of small dicts:
>= 3x the requests/s of the same view on Django's RedisCache, with no more stale reads than
RedisCache under the coherence test."

Needs, in the Python that runs it: Django, django-rustcache (with ``_core.near``), redis-py
(hiredis if installed), gunicorn, and a ``redis-server`` on PATH; django-redis is an extra
column when installed::

    pip install gunicorn 'redis>=5' hiredis django-redis   # + Django and the django-rustcache wheel
    apt-get install -y redis-server

What it does, all in one run:

* starts its own redis-server on a free loopback port (``tests/servers.py``);
* writes a one-file Django site into a temp dir: one view reading the 20 keys ``e2e:0`` ..
  ``e2e:19``, each holding the small dict ``{'id': 42, 'name': 'apple', 'price': 1.2}`` (a key
  found missing is set, which only happens on the first requests of a per-process cache);
* starts one ``gunicorn --preload -w 4`` (sync workers) per backend, each on its own free
  loopback port: NearCache and Django's RedisCache (the bar), RustCache, LocMemCache and
  django-redis as context;
* drives each with the same load generator (this file: several processes, each with several
  threads, each thread sending ``GET /`` on a new connection, since gunicorn's sync workers close
  it after every response, and reading the whole answer): a warm-up, then several rounds, the
  backends in alternating order round by round; requests/s per round, the median over rounds, and
  NearCache/RedisCache computed per round (paired) and its median;
* then (unless ``--no-coherence``) the no-fault coherence measurement of ``tests/coherence.py``
  (forked readers and a writer, stale reads counted) against NearCache and RedisCache side by
  side.

Every gunicorn (master and workers, in a session of their own) and the redis-server are stopped
by PID on exit, also on Ctrl-C or an error. The machine may be shared: the load average is
printed, and the ratio measured side by side is what counts.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

import servers  # noqa: E402  (tests/servers.py: our own redis-server, stopped by PID)
from _sections import replace_section  # noqa: E402

RESULTS = REPO / "benchmarks" / "RESULTS.md"
SECTION_BEGIN, SECTION_END = "<!-- e2e_bench:begin -->", "<!-- e2e_bench:end -->"
SMALL_DICT = {"id": 42, "name": "apple", "price": 1.2}
READS = 20
WORKERS = 4

SITE = '''
"""The e2e benchmark's Django site: one view, 20 cache reads (benchmarks/e2e.py)."""
import json, os
import django
from django.conf import settings

settings.configure(
    DEBUG=False,
    ALLOWED_HOSTS=["*"],
    ROOT_URLCONF=__name__,
    SECRET_KEY="e2e-benchmark-not-secret",
    INSTALLED_APPS=[],
    MIDDLEWARE=[],
    USE_TZ=True,
    CACHES={{"default": json.loads(os.environ["E2E_CACHE"])}},
)
django.setup()

from django.core.cache import cache
from django.core.wsgi import get_wsgi_application
from django.http import HttpResponse
from django.urls import path

KEYS = [f"e2e:{{i}}" for i in range({reads})]
SMALL_DICT = {small!r}


def view(request):
    found = 0
    for key in KEYS:
        value = cache.get(key)
        if value is None:  # first requests of a per-process cache (LocMemCache, RustCache)
            cache.set(key, dict(SMALL_DICT), 3600)
        else:
            found += 1
    response = HttpResponse(str(found), content_type="text/plain")
    response["Content-Length"] = str(len(response.content))  # else gunicorn sends it chunked
    return response


urlpatterns = [path("", view)]
application = get_wsgi_application()
'''


def backends(url: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """name -> (label, CACHES entry); django-redis only when installed."""
    out: dict[str, tuple[str, dict[str, Any]]] = {
        "near": (
            "NearCache",
            {"BACKEND": "django_rustcache.NearCache", "LOCATION": url, "KEY_PREFIX": "e2en"},
        ),
        "redis": (
            "RedisCache",
            {
                "BACKEND": "django.core.cache.backends.redis.RedisCache",
                "LOCATION": url,
                "KEY_PREFIX": "e2er",
            },
        ),
        "rust": (
            "RustCache",
            {"BACKEND": "django_rustcache.RustCache", "LOCATION": "e2e", "KEY_PREFIX": "e2eu"},
        ),
        "locmem": (
            "LocMemCache",
            {
                "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
                "LOCATION": "e2e",
                "KEY_PREFIX": "e2el",
            },
        ),
    }
    try:
        import django_redis  # noqa: F401

        out["django_redis"] = (
            "django-redis",
            {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": url, "KEY_PREFIX": "e2ed"},
        )
    except ImportError:
        pass
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _gunicorn() -> list[str]:
    """How to run gunicorn with this Python (it must see the same packages)."""
    try:
        import gunicorn  # noqa: F401
    except ImportError:
        sys.exit("gunicorn is not installed in this Python: pip install gunicorn")
    return [sys.executable, "-m", "gunicorn"]


class Site:
    """One gunicorn (``--preload -w 4``) serving the site with one backend."""

    def __init__(self, name: str, cache: dict[str, Any], site_dir: Path) -> None:
        self.name = name
        self.port = _free_port()
        self.log = site_dir / f"gunicorn-{name}.log"
        env = dict(os.environ, E2E_CACHE=json.dumps(cache), PYTHONPATH=str(site_dir))
        cmd = _gunicorn() + [
            "--preload",
            "-w",
            str(WORKERS),
            "-k",
            "sync",
            "-b",
            f"127.0.0.1:{self.port}",
            "--backlog",
            "256",
            "--error-logfile",
            str(self.log),
            "e2e_site:application",
        ]
        # Its own session: the workers can be found (and stopped) with the master.
        self.proc = subprocess.Popen(
            cmd,
            cwd=site_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"gunicorn for {self.name} exited ({self.proc.returncode}):\n"
                    + self.log.read_text(errors="replace")[-3000:]
                )
            with contextlib.suppress(OSError):
                status, _ = _request(self.port)
                if status == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"gunicorn for {self.name} did not answer within {timeout:.0f} s")

    def stop(self) -> None:
        """SIGTERM the master (it stops its workers), then SIGKILL what is left of its session."""
        pid = self.proc.pid
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
        # The session (process group) this master led: its workers, if any outlived it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


# The load generator: the same for every backend -------------------------------------------------


def _request(port: int) -> tuple[int, bytes]:
    """One ``GET /`` on a new connection; (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def _drive(port: int, seconds: float, threads: int) -> tuple[int, int, int]:
    """In a load process: ``threads`` threads requesting for ``seconds``; (ok, partial, errors):
    ok answered 200 with all 20 reads found, partial 200 with fewer (a cold cache)."""
    counts = [[0, 0, 0] for _ in range(threads)]
    end = time.monotonic() + seconds
    want = str(READS).encode()

    def loop(c: list[int]) -> None:
        while time.monotonic() < end:
            try:
                status, body = _request(port)
            except OSError:
                c[2] += 1
                continue
            if status != 200:
                c[2] += 1
            elif body == want:
                c[0] += 1
            else:
                c[1] += 1

    ts = [threading.Thread(target=loop, args=(c,)) for c in counts]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return (sum(c[0] for c in counts), sum(c[1] for c in counts), sum(c[2] for c in counts))


class Load:
    """``procs`` load processes (forked once, reused), each with ``threads`` threads."""

    def __init__(self, procs: int, threads: int) -> None:
        self.procs, self.threads = procs, threads
        ctx = multiprocessing.get_context("fork")
        self.pool = concurrent.futures.ProcessPoolExecutor(procs, mp_context=ctx)

    def run(self, port: int, seconds: float) -> tuple[float, int, int]:
        """(requests/s answered with all reads found, partial answers, errors)."""
        futs = [self.pool.submit(_drive, port, seconds, self.threads) for _ in range(self.procs)]
        res = [f.result() for f in futs]
        ok, partial, err = (sum(r[i] for r in res) for i in range(3))
        return ok / seconds, partial, err

    def close(self) -> None:
        # Load processes are idle between runs; shut them down (joins them by the pool's PIDs).
        self.pool.shutdown(wait=True, cancel_futures=True)


# Coherence (tests/coherence.py), no fault ------------------------------------------------------


def coherence_rows(url: str) -> list[tuple[str, Any]]:
    """The no-fault coherence run against NearCache and RedisCache; (label, Result) each."""
    import django
    from django.conf import settings

    if not settings.configured:
        settings.configure(SECRET_KEY="e2e-benchmark-not-secret", CACHES={}, USE_TZ=True)
        django.setup()
    from tests import coherence

    prefix = f"cohr{uuid.uuid4().hex[:6]}"

    def redis_make() -> Any:
        from django.core.cache.backends.redis import RedisCache

        return RedisCache(url, {"KEY_PREFIX": prefix})

    lease = 0.5
    near = coherence.run(
        coherence.near_maker(url, lease),
        label="NearCache",
        lease=lease,
        l1_hits=coherence.near_hits,
    )
    red = coherence.run(redis_make, label="RedisCache")
    return [("NearCache", near), ("RedisCache", red)]


# Report ----------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 rounds of 3 s (about a minute)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 5; --quick 2)")
    ap.add_argument("--seconds", type=float, default=None, help="per backend per round (5; 3)")
    ap.add_argument("--procs", type=int, default=2, help="load generator processes (2)")
    ap.add_argument("--threads", type=int, default=4, help="threads per load process (4)")
    ap.add_argument("--no-coherence", action="store_true", help="skip the stale-read runs")
    ap.add_argument(
        "--write-results",
        action="store_true",
        help="put the tables into benchmarks/RESULTS.md (between the e2e_bench markers)",
    )
    args = ap.parse_args()
    rounds = args.rounds or (2 if args.quick else 5)
    seconds = args.seconds or (3.0 if args.quick else 5.0)
    _gunicorn()  # exits with how to install it when it is missing
    load_at_start = os.getloadavg()
    started = time.monotonic()

    # SIGTERM (e.g. from a CI timeout) unwinds like Ctrl-C, through the finally blocks below.
    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    server = servers.start("redis")
    sites: dict[str, Site] = {}
    load: Load | None = None
    site_dir = Path(tempfile.mkdtemp(prefix="e2e-site-"))
    rps: dict[str, list[float]] = {}
    bad: dict[str, list[int]] = {}
    order_used: list[list[str]] = []
    coh: list[tuple[str, Any]] = []
    try:
        (site_dir / "e2e_site.py").write_text(
            textwrap.dedent(SITE.format(reads=READS, small=SMALL_DICT))
        )
        which = backends(server.url)
        for name, (_, cache) in which.items():
            sites[name] = Site(name, cache, site_dir)
        for s in sites.values():
            s.wait_ready()
        load = Load(args.procs, args.threads)
        names = list(sites)
        print(
            f"load average {load_at_start[0]:.2f} {load_at_start[1]:.2f} {load_at_start[2]:.2f}; "
            f"{rounds} rounds of {seconds:g} s per backend, {args.procs}x{args.threads} clients",
            flush=True,
        )
        for name in names:  # warm-up: fills the caches, starts listeners, warms every worker
            load.run(sites[name].port, 1.0)
        for r in range(rounds):
            order = names if r % 2 == 0 else names[::-1]
            order_used.append(order)
            for name in order:
                v, partial, err = load.run(sites[name].port, seconds)
                rps.setdefault(name, []).append(v)
                bad.setdefault(name, []).append(partial + err)
                print(
                    f"round {r + 1} {which[name][0]:>12}: {v:8,.0f} req/s"
                    + (f" ({partial} partial, {err} errors)" if partial or err else ""),
                    flush=True,
                )
        load_after = os.getloadavg()
        if not args.no_coherence:
            print("coherence runs (tests/coherence.py, no fault) ...", flush=True)
            coh = coherence_rows(server.url)
    finally:
        if load is not None:
            load.close()
        for s in sites.values():
            s.stop()
        server.cleanup()
        shutil.rmtree(site_dir, ignore_errors=True)
    wall = time.monotonic() - started
    lines = report(which, rps, bad, coh, args, rounds, seconds, load_at_start, load_after, wall)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write_results:
        write_results(text)
    return 0


def report(
    which: dict[str, tuple[str, dict[str, Any]]],
    rps: dict[str, list[float]],
    bad: dict[str, list[int]],
    coh: list[tuple[str, Any]],
    args: argparse.Namespace,
    rounds: int,
    seconds: float,
    load_at_start: tuple[float, float, float],
    load_after: tuple[float, float, float],
    wall: float,
) -> list[str]:
    """The section for benchmarks/RESULTS.md (also printed)."""
    from importlib.metadata import PackageNotFoundError, version

    import django
    import redis

    try:
        gunicorn_version = version("gunicorn")
    except PackageNotFoundError:  # report() is also tested without gunicorn installed
        gunicorn_version = "(not installed)"

    try:
        import hiredis

        hi = f"hiredis {hiredis.__version__}"
    except ImportError:
        hi = "no hiredis"
    ratios = [n / max(r, 1e-9) for n, r in zip(rps["near"], rps["redis"], strict=True)]
    ratio = statistics.median(ratios)
    stale_line = "not measured (`--no-coherence`)"
    ok_stale = None
    if coh:
        (_, near), (_, red) = coh
        ok_stale = near.stale <= red.stale
        stale_line = (
            f"NearCache {near.stale} stale of {near.reads:,} reads (oldest "
            f"{near.oldest_stale_ms:.1f} ms), RedisCache {red.stale} of {red.reads:,} "
            f"(oldest {red.oldest_stale_ms:.1f} ms)"
        )
    flag = "PASS" if ratio >= 3 else "**FAIL**"
    stale_flag = "" if ok_stale is None else ("PASS" if ok_stale else "**FAIL**")
    given = [a for a in sys.argv[1:] if a != "--write-results"]
    cmd = " ".join(["python benchmarks/e2e.py", *given])
    out = [
        SECTION_BEGIN,
        "## End to end: gunicorn, 20 cache reads per request (`benchmarks/e2e.py`)",
        "",
        "Command (starts and stops its own redis-server and one gunicorn per backend on free "
        "loopback ports; `pip install gunicorn` first):",
        "",
        f"    {cmd}",
        "",
        f"Wall time {wall:.0f} s. **The machine is shared** (2 cores; load average "
        f"{load_at_start[0]:.2f}, {load_at_start[1]:.2f}, {load_at_start[2]:.2f} at start, "
        f"{load_after[0]:.2f}, {load_after[1]:.2f}, {load_after[2]:.2f} after the rounds), and "
        "the load generator runs on the same cores as the servers: the ratio, measured side by "
        "side, is what counts. "
        f"Python {platform.python_version()}, Django {django.__version__}, gunicorn "
        f"{gunicorn_version} (`gunicorn --preload -w {WORKERS} -k sync`), "
        f"redis-py {redis.__version__}, {hi}.",
        "",
        "| bar (issue 9) | measured | bar | |",
        "|---|---|---|---|",
        f"| requests/s: NearCache / RedisCache (median of {rounds} paired rounds; range "
        f"{min(ratios):.2f}x-{max(ratios):.2f}x) | {ratio:.2f}x | ≥ 3x | {flag} |",
        f"| stale reads, coherence test without faults: {stale_line} | "
        f"{'' if not coh else coh[0][1].stale} | ≤ RedisCache's | {stale_flag} |",
        "",
        "| backend | requests/s (median) | per round | vs RedisCache |",
        "|---|---|---|---|",
    ]
    red = max(statistics.median(rps["redis"]), 1e-9)
    for name, (label, _) in which.items():
        med = statistics.median(rps[name])
        per = ", ".join(f"{v:,.0f}" for v in rps[name])
        extra = f" ({sum(bad[name])} partial/error answers)" if sum(bad[name]) else ""
        out.append(f"| {label} | {med:,.0f} | {per}{extra} | {med / red:.2f}x |")
    out += [
        "",
        f"- The view reads the {READS} keys `e2e:0`..`e2e:{READS - 1}` with `cache.get`, each "
        f"holding `{SMALL_DICT!r}`, and answers how many it found; only answers with all "
        f"{READS} found are counted. Every backend has the site to itself (one gunicorn each, "
        f"{WORKERS} sync workers, `--preload`), Redis-backed ones on one redis-server.",
        f"- Load: {args.procs} processes x {args.threads} threads, each a loop of `GET /` on a "
        "new connection (gunicorn's sync workers close it after each answer), the same "
        f"generator for every backend; a 1 s warm-up per backend, then {rounds} rounds of "
        f"{seconds:g} s per backend, the order reversed every other round. The ratio is "
        "computed per round (the two backends ran seconds apart) and its median is reported.",
    ]
    if coh:
        out.append(
            "- Stale reads: `tests/coherence.py`'s run without faults (forked readers and a "
            "writer on 4 keys, a read is stale if a newer value was acknowledged before it was "
            "sent), the same run against each backend:"
        )
        from tests import coherence

        out += ["", "```", coherence.HEADER, *(res.row() for _, res in coh), "```"]
    out.append(SECTION_END)
    return out


def write_results(section: str, path: Path = RESULTS) -> None:
    """Replace (or append) the e2e_bench section of ``path``, nothing else."""
    replace_section(path, section, SECTION_BEGIN, SECTION_END)


if __name__ == "__main__":
    sys.exit(main())
