"""NearCache over TLS (``rediss://``): the data path (redis-py) and the Rust listener (rustls).

Each test starts its servers TLS-only (``--port 0 --tls-port P``, Debian's redis-server is built
with TLS) with a throwaway CA that ``servers.make_pki`` makes with the ``openssl`` CLI. A lease
that becomes fresh proves the listener spoke TLS: the server has no plaintext port.
"""

from __future__ import annotations

import itertools
import os
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from django.core.exceptions import ImproperlyConfigured

from django_rustcache import NearCache
from django_rustcache import near as near_mod
from tests import servers

_prefixes = itertools.count()


def _start(*args: str, **kw: Any) -> servers.Server:
    try:
        return servers.start("redis", *args, **kw)
    except servers.ServerUnavailable as e:
        pytest.fail(f"the TLS tests need Debian's redis-server (with TLS): {e}", pytrace=False)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> servers.Pki:
    return servers.make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_server(pki: servers.Pki) -> Iterator[servers.Server]:
    server = _start(tls=pki)
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def mtls_server(pki: servers.Pki) -> Iterator[servers.Server]:
    server = _start(tls=pki, tls_auth_clients=True)
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.Server]:
    """A TLS server whose certificate names only ``elsewhere.invalid``, not 127.0.0.1."""
    other = servers.make_pki(tmp_path_factory.mktemp("pki-elsewhere"), ("elsewhere.invalid",))
    server = _start(tls=other)
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def plain_server() -> Iterator[servers.Server]:
    server = _start()
    yield server
    server.cleanup()


def make(location: str, **options: Any) -> NearCache:
    """A NearCache with its own L1 (a fresh KEY_PREFIX) and a short lease."""
    return NearCache(
        location, {"KEY_PREFIX": f"tls{next(_prefixes)}", "OPTIONS": {"LEASE": 0.25, **options}}
    )


def wait_until(ok: Callable[[], bool], what: str, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not ok():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def fresh(cache: NearCache) -> bool:
    cache._near.ensure_started()
    return cache._near.wait_fresh(10.0)


def listener_error(cache: NearCache) -> str:
    """The listener's first error (it must fail, and keep failing: never fresh)."""
    cache._near.ensure_started()
    wait_until(lambda: cache.stats()["listener"]["last_error"] is not None, "a listener error")
    stats = cache.stats()["listener"]
    assert stats["lease_ok"] is False and stats["connected"] is False, stats
    assert cache._near.fresh() is False
    return stats["last_error"]


def tls_client(server: servers.Server, pki: servers.Pki) -> redis.Redis:
    return redis.Redis.from_url(
        server.url,
        ssl_ca_certs=str(pki.ca),
        ssl_certfile=str(pki.client_cert),
        ssl_keyfile=str(pki.client_key),
    )


# It works ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["tracking", "pubsub"])
def test_get_set_and_invalidation_between_two_l1s_over_tls(tls_server, pki, mode):
    # Two L1 stores (two LOCATIONs naming one server: its IP address, then its DNS name, both
    # in its certificate), as two processes would have. A lease of seconds, so that the L1 hit below
    # does not depend on a loaded machine's heartbeat coming within a quarter of a second either.
    prefix = f"tls{next(_prefixes)}"
    options = {"LEASE": 2.0, "INVALIDATION": mode, "ssl_ca_certs": str(pki.ca)}
    params = {"KEY_PREFIX": prefix, "OPTIONS": options}
    a = NearCache(f"rediss://127.0.0.1:{tls_server.port}/0", params)
    b = NearCache(f"rediss://localhost:{tls_server.port}/0", params)
    assert a._l1_location != b._l1_location
    assert fresh(a) and fresh(b), (a.stats()["listener"], b.stats()["listener"])
    key = b.make_key("k")
    a.set("k", "one")
    # b's listener hears of a's write too. Applied while b's read below fills L1, it would
    # (rightly) void that fill, and L1 would not serve the next read: wait for it first.
    wait_until(lambda: b._near.applied_ns(key) is not None, "b's listener to hear of a's write")
    assert b.get("k") == "one"  # from Redis, filling b's L1
    hits = b.stats()["l1_hits"]
    assert b.get("k") == "one"
    assert b.stats()["l1_hits"] == hits + 1  # served by L1: the lease is fresh over TLS
    before = b._near.applied_ns(key)
    a.set("k", "two")
    wait_until(lambda: b._near.applied_ns(key) != before, "b's listener to hear of a's write")
    assert b.get("k") == "two"
    assert a.get("k") == "two"
    for cache in (a, b):
        stats = cache.stats()["listener"]
        assert stats["connected"] and stats["last_error"] is None, stats
    check = tls_client(tls_server, pki)
    assert check.get(key) is not None  # really stored in the TLS server
    check.close()


def test_the_data_path_speaks_tls_on_the_pool_and_on_direct_connections(tls_server, pki):
    cache = make(tls_server.url, ssl_ca_certs=str(pki.ca))
    client = cache._client()
    assert issubclass(client.connection_pool.connection_class, redis.SSLConnection)
    check = tls_client(tls_server, pki)
    received = check.info("stats")["total_connections_received"]
    for i in range(50):  # a miss and a set each: the direct connections (``_Conn.call``)
        assert cache.get(f"k{i}") is None
        cache.set(f"k{i}", i)
        assert cache.get(f"k{i}") == i
    assert cache.get_many([f"k{i}" for i in range(50)]) == {f"k{i}": i for i in range(50)}
    # The direct connections are kept, not made again for every call (a TLS socket may be
    # readable with nothing for the application: session tickets).
    assert check.info("stats")["total_connections_received"] - received <= 4
    check.close()
    assert cache._conn.direct and cache._conn._wires
    for wire in cache._conn._wires:  # made with the pool's class and options
        assert isinstance(wire.conn, redis.SSLConnection)
        assert isinstance(wire.conn._sock, ssl.SSLSocket)


def test_ssl_min_version_is_honoured_by_both_paths(pki):
    server = _start("--tls-protocols", "TLSv1.2", tls=pki)  # a server that stops at TLS 1.2
    try:
        tls12 = make(server.url, ssl_ca_certs=str(pki.ca), ssl_min_version=ssl.TLSVersion.TLSv1_2)
        tls12.set("k", 1)
        assert tls12.get("k") == 1
        assert fresh(tls12), tls12.stats()["listener"]
        tls13 = make(server.url, ssl_ca_certs=str(pki.ca), ssl_min_version=ssl.TLSVersion.TLSv1_3)
        with pytest.raises(redis.ConnectionError):
            tls13.get("k")
        error = listener_error(tls13)
        assert "TLS handshake" in error and "ProtocolVersion" in error, error
    finally:
        server.cleanup()


def test_async_methods_work_over_tls(tls_server, pki):
    import asyncio

    cache = make(tls_server.url, ssl_ca_certs=str(pki.ca))

    async def run() -> Any:
        await cache.aset("k", {"v": 1})
        return await cache.aget("k")

    assert asyncio.run(run()) == {"v": 1}


def test_mutual_tls_needs_the_client_certificate_on_both_paths(mtls_server, pki):
    cache = make(
        mtls_server.url,
        ssl_ca_certs=str(pki.ca),
        ssl_certfile=str(pki.client_cert),
        ssl_keyfile=str(pki.client_key),
    )
    assert fresh(cache), cache.stats()["listener"]
    cache.set("k", 1)
    assert cache.get("k") == 1

    without = make(mtls_server.url, ssl_ca_certs=str(pki.ca))
    with pytest.raises(redis.ConnectionError):
        without.get("k")
    assert "certificate" in listener_error(without).lower()


def test_check_hostname_off_still_verifies_the_chain(elsewhere, pki, tmp_path):
    ca = str(elsewhere.tls.ca)
    # The default verifies the name, on both paths (redis-py 6+'s default, set by NearCache).
    strict = make(elsewhere.url, ssl_ca_certs=ca)
    with pytest.raises(redis.ConnectionError, match="(?i)hostname|match"):
        strict.get("k")
    error = listener_error(strict)
    assert "not valid for name" in error and "127.0.0.1" in error, error

    lax = make(elsewhere.url, ssl_ca_certs=ca, ssl_check_hostname=False)
    lax.set("k", 1)
    assert lax.get("k") == 1
    assert fresh(lax), lax.stats()["listener"]

    # ... but the chain still: a CA that did not sign the certificate fails.
    wrong = make(elsewhere.url, ssl_ca_certs=str(pki.ca), ssl_check_hostname=False)
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        wrong.get("k")
    assert "UnknownIssuer" in listener_error(wrong)


def test_cert_reqs_none_accepts_any_certificate(elsewhere):
    # Insecure, as documented: no CA given, a certificate for another name.
    cache = make(f"{elsewhere.url}?ssl_cert_reqs=none")
    cache.set("k", 1)
    assert cache.get("k") == 1
    assert fresh(cache), cache.stats()["listener"]


# It fails clearly, never in plaintext ------------------------------------------------------


def test_a_wrong_ca_fails_on_both_paths_with_a_clear_error(tls_server, pki):
    cache = make(tls_server.url, ssl_ca_certs=str(pki.other_ca))
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        cache.get("k")
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        cache.set("k", 1)
    error = listener_error(cache)
    assert "invalid peer certificate" in error and "UnknownIssuer" in error, error


def test_the_system_roots_do_not_trust_a_private_ca(tls_server):
    # No ssl_ca_certs: the system's CAs (which never signed our throwaway CA) decide.
    cache = make(tls_server.url)
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        cache.get("k")
    assert "UnknownIssuer" in listener_error(cache)


def test_rediss_to_a_plaintext_server_fails_and_sends_nothing_in_plaintext(plain_server, pki):
    raw = redis.Redis.from_url(plain_server.url)
    raw.config_resetstat()
    cache = make(
        f"rediss://127.0.0.1:{plain_server.port}/0",
        ssl_ca_certs=str(pki.ca),
        socket_connect_timeout=0.3,
    )
    # The server takes the ClientHello for the start of a command and waits for its end.
    with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
        cache.get("k")
    with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
        cache.set("k", 1)
    error = listener_error(cache)
    assert "TLS handshake" in error, error
    # Not one command reached the server: no plaintext fallback on either path.
    stats = raw.info("commandstats")
    assert set(stats) <= {"cmdstat_config|resetstat", "cmdstat_info"}, stats
    raw.close()


# Settings ----------------------------------------------------------------------------------


def test_the_listener_gets_the_ssl_options_and_the_url_query_wins(monkeypatch, pki):
    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(
        near_mod, "LISTENER_FACTORY", lambda loc, **kw: seen.append(kw) or near_mod._NoListener()
    )
    NearCache(
        "rediss://cache.example:6380/1?ssl_check_hostname=false",
        {
            "OPTIONS": {
                "ssl_ca_certs": pki.ca,  # a Path is fine
                "ssl_certfile": str(pki.client_cert),
                "ssl_keyfile": str(pki.client_key),
                "ssl_cert_reqs": ssl.CERT_REQUIRED,
                "ssl_check_hostname": True,
                "ssl_min_version": ssl.TLSVersion.TLSv1_3,
            }
        },
    )
    (kwargs,) = seen
    assert (kwargs["host"], kwargs["port"]) == ("cache.example", 6380)
    assert kwargs["tls"] == {
        "cert_reqs": "required",
        "check_hostname": False,
        "ca_certs": str(pki.ca),
        "certfile": str(pki.client_cert),
        "keyfile": str(pki.client_key),
        "min_version": "1.3",
    }
    NearCache("rediss://cache.example:6380/1", {})
    assert seen[-1]["tls"] == {"cert_reqs": "required", "check_hostname": True}
    NearCache("redis://cache.example:6380/1", {})
    assert "tls" not in seen[-1]


@pytest.mark.parametrize(
    ("location", "options", "says"),
    [
        ("redis://127.0.0.1:1/0", {"ssl_ca_certs": "ca.pem"}, "needs a rediss://"),
        ("rediss://127.0.0.1:1/0", {"ssl_password": "pw"}, "ssl_password"),
        ("rediss://127.0.0.1:1/0", {"ssl_ciphers": "HIGH"}, "ssl_ciphers"),
        ("rediss://127.0.0.1:1/0", {"ssl_validate_ocsp": True}, "ssl_validate_ocsp"),
        ("rediss://127.0.0.1:1/0?ssl_validate_ocsp=true", {}, "ssl_validate_ocsp in LOCATION"),
        ("rediss://127.0.0.1:1/0", {"ssl_cert_reqs": "always"}, "ssl_cert_reqs"),
        ("rediss://127.0.0.1:1/0", {"ssl_check_hostname": "yes"}, "ssl_check_hostname"),
        ("rediss://127.0.0.1:1/0", {"ssl_min_version": "TLSv1_3"}, "ssl_min_version"),
        ("rediss://127.0.0.1:1/0", {"ssl_ca_certs": "/nonexistent/ca.pem"}, "/nonexistent/ca"),
        ("rediss://127.0.0.1:1/0", {"ssl_ca_data": "not a certificate"}, "ssl_ca_data"),
        ("rediss://127.0.0.1:1/0", {"ssl_keyfile": "/x.key"}, "without ssl_certfile"),
    ],
)
def test_bad_tls_settings_raise_improperly_configured(location, options, says):
    with pytest.raises(ImproperlyConfigured, match=says):
        NearCache(location, {"OPTIONS": options})


def test_a_key_file_without_a_key_is_named(pki, tmp_path):
    with pytest.raises(ImproperlyConfigured, match="private key.*ssl_keyfile"):
        NearCache(
            "rediss://127.0.0.1:1/0",
            {
                "OPTIONS": {
                    "ssl_ca_certs": str(pki.ca),
                    "ssl_certfile": str(pki.client_cert),
                    "ssl_keyfile": str(pki.ca),  # a certificate, not a key
                }
            },
        )


def test_ca_data_and_ca_path_are_trusted_like_ca_certs(tls_server, pki, tmp_path):
    pem = Path(pki.ca).read_text()
    by_data = make(tls_server.url, ssl_ca_data=pem)
    by_data.set("k", 1)
    assert by_data.get("k") == 1
    assert fresh(by_data), by_data.stats()["listener"]
    der = ssl.PEM_cert_to_DER_cert(pem)
    by_der = make(tls_server.url, ssl_ca_data=der)
    assert fresh(by_der), by_der.stats()["listener"]

    # OpenSSL finds a CA in a directory by its subject hash (``openssl rehash``).
    import subprocess

    cadir = tmp_path / "cadir"
    cadir.mkdir()
    subject_hash = subprocess.run(
        ["openssl", "x509", "-hash", "-noout", "-in", str(pki.ca)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    os.symlink(pki.ca, cadir / f"{subject_hash}.0")
    by_path = make(tls_server.url, ssl_ca_path=str(cadir))
    by_path.set("k", 2)
    assert by_path.get("k") == 2
    assert fresh(by_path), by_path.stats()["listener"]


@pytest.fixture
def own_tls_server(pki: servers.Pki) -> Iterator[servers.Server]:
    """A TLS server of this test's alone (no other test's listener connected to it)."""
    server = _start(tls=pki)
    yield server
    server.cleanup()


def test_a_forked_child_closes_the_tls_connection_it_inherited_and_makes_its_own(
    own_tls_server, pki
):
    # The listener's TLS connection is registered for closing in a forked child (its TCP
    # socket's descriptor), as a plaintext one is: once the parent is gone, only the child's own
    # listener connection (a new TLS session) remains.
    import signal
    import subprocess
    import sys

    tls = {"ca_certs": str(pki.ca), "cert_reqs": "required", "check_hostname": True}
    script = f"""
import os, sys, time, uuid
from django_rustcache import _core
loc = "near-" + uuid.uuid4().hex
h = _core.Handle(loc, object(), lambda key: None)
n = _core.near(loc, host="127.0.0.1", port={own_tls_server.port}, unix_path=None, username=None,
               password=None, prefix="p:", lease=0.5, mode="bcast", channel="",
               connect_timeout=2.0, tls={tls!r})
n.ensure_started()
assert n.wait_fresh(10.0), n.stats()
pid = os.fork()
if pid == 0:
    n.ensure_started()
    print("child", n.wait_fresh(10.0), n.stats()["last_error"], flush=True)
    time.sleep(20)  # alive, after its parent is gone
    os._exit(0)
print(pid, flush=True)
os._exit(0)  # the parent dies without closing its listener
"""
    r = tls_client(own_tls_server, pki)

    def trackers() -> int:
        return sum(1 for c in r.client_list() if "t" in c["flags"])

    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        assert parent.stdout is not None
        lines = [parent.stdout.readline().strip() for _ in range(2)]
        child = int(next(line for line in lines if line.isdigit()))
        assert "child True None" in lines, lines
        parent.wait(10)
        wait_until(lambda: trackers() == 1, "only the child's own listener connection")
        os.kill(child, 0)  # the child is alive: it did not keep the parent's connection open
    finally:
        if child:
            os.kill(child, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
        r.close()
