"""End to end: ``cache_page`` behind gunicorn (threads) on 127.0.0.1, loaded with wrk.

For each backend a fresh gunicorn serves ``e2e_app`` (1 worker, 4 threads) on a free loopback
port; one request fills the cache, then ``wrk`` runs for a bounded time and we read requests/s
and the 99th percentile latency. gunicorn is always stopped, and every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
WRK_THREADS = 1
WRK_CONNECTIONS = 8
GUNICORN_THREADS = 4


def _free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(url: str, proc: subprocess.Popen[bytes], seconds: float) -> bool:
    """Poll ``url`` until it answers 200 (which also fills the cache), at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=2) as r:  # loopback only
                if r.status == 200:
                    return True
        time.sleep(0.1)
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _parse_wrk(out: str) -> tuple[float, str]:
    """Requests/s and the p99 latency (as wrk prints it) from ``wrk --latency`` output."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"^\s*99%\s+(\S+)", out, re.MULTILINE)
    if not rps or not p99:
        raise ValueError(f"cannot parse wrk output: {out[-400:]!r}")
    return float(rps.group(1)), p99.group(1)


def run_one(backend: str, redis_url: str | None, seconds: int) -> tuple[float, str]:
    """Serve ``e2e_app`` with ``backend`` and load it for ``seconds``; (requests/s, p99)."""
    port = _free_port()
    env = dict(os.environ, BENCH_CACHE=backend)
    if redis_url:
        env["BENCH_REDIS_URL"] = redis_url
    cmd = [
        sys.executable, "-m", "gunicorn",
        "--bind", f"127.0.0.1:{port}",
        "--workers", "1",
        "--worker-class", "gthread",
        "--threads", str(GUNICORN_THREADS),
        "--graceful-timeout", "2",
        "--log-level", "warning",
        "--chdir", str(HERE),
        "e2e_app:application",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}/page/"
        if not _wait_ready(url, proc, 20):
            err = b""
            if proc.poll() is not None and proc.stderr is not None:
                err = proc.stderr.read()
            raise RuntimeError(f"gunicorn did not serve {url}: {err.decode(errors='replace')}")
        wrk = [
            "wrk", f"-t{WRK_THREADS}", f"-c{WRK_CONNECTIONS}", f"-d{seconds}s",
            "--timeout", "5s", "--latency", url,
        ]  # fmt: skip
        out = subprocess.run(wrk, capture_output=True, text=True, timeout=seconds + 30, check=True)
        return _parse_wrk(out.stdout)
    finally:
        _stop(proc)


def run_e2e(redis_url: str | None, seconds: int, log: Callable[[str], None]) -> str:
    """The end-to-end Markdown section (or a line saying why it was skipped)."""
    if shutil.which("wrk") is None:
        return "Skipped: `wrk` not found (Debian package `wrk`; `run.sh --e2e` installs it)."
    backends = ["RustCache", "LocMemCache"] + (["RedisCache"] if redis_url else [])
    rows: dict[str, tuple[float, str] | str] = {}
    for backend in backends:
        log(f"[bench] e2e: {backend}, wrk for {seconds} s")
        try:
            rows[backend] = run_one(backend, redis_url, seconds)
        except Exception as exc:  # report it in the table, keep the other backends
            rows[backend] = f"error: {type(exc).__name__}: {exc}"
        log(f"[bench]   {rows[backend]}")
    lines = [
        f"`cache_page` view (20 KB page) served by gunicorn (1 worker, gthread, "
        f"{GUNICORN_THREADS} threads) on 127.0.0.1, loaded by `wrk -t{WRK_THREADS} "
        f"-c{WRK_CONNECTIONS} -d{seconds}s --latency` on the same 2 cores."
        + ("" if redis_url else " RedisCache skipped: no redis-server."),
        "",
        "| backend | requests/s | p99 latency | vs RustCache |",
        "|---|---|---|---|",
    ]
    base = rows.get("RustCache")
    for backend, row in rows.items():
        if isinstance(row, str):
            lines.append(f"| {backend} | {row} | | |")
            continue
        rps, p99 = row
        ratio = f"{rps / base[0]:.2f}x" if isinstance(base, tuple) and base[0] else "—"
        lines.append(f"| {backend} | {rps:,.0f} | {p99} | {ratio} |")
    return "\n".join(lines)
