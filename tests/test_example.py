"""The products example runs from a clean state and proves that no stale page was served; its
second part (coherence_demo.py) shows 4 gunicorn workers fresh on NearCache, stale on RustCache."""

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parent.parent / "examples" / "products" / "run_demo.py"


def test_products_demo_serves_fresh_pages_from_the_cache():
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    result = subprocess.run(
        [sys.executable, str(DEMO)],
        cwd=DEMO.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "stale pages served: 0" in out and "STALE" not in out
    assert "served from the cache" in out and "rendered by the view" in out
    assert "a cached page expires in 300 s" in out
    # The fresh list after the two writes: the save and the manager's update().
    assert "<li>apple: 1.50</li>\n<li>banana: 0.50</li>\n<li>cherry: 2.75</li>" in out
    assert "pages served from the cache: 5, rendered: 6" in out


# The demo's second part: coherence_demo.py, 4 gunicorn workers on NearCache then RustCache ------

COHERENCE = DEMO.parent / "coherence_demo.py"


def _demo_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DJANGO_SETTINGS_MODULE", "PRODUCTS_CACHE_URL", "PRODUCTS_WORKER_DEMO")
    }
    env.update(extra)
    return env


def test_coherence_demo_nearcache_workers_all_fresh_rustcache_workers_stale():
    """End to end: the demo's own redis-server and gunicorns (CI installs redis-server and
    gunicorn); it exits 1 if a NearCache worker served a stale page past its bound."""
    result = subprocess.run(
        [sys.executable, str(COHERENCE)],
        cwd=COHERENCE.parent,
        env=_demo_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    # Every NearCache worker served the new price; no stale page later than the bound.
    assert re.search(r"^NearCache: 4 of 4 workers served the new price", out, re.M), out
    assert "OK: no NearCache worker served a stale page later than 1 s" in out
    # RustCache: only the worker that saved serves the new price; the others serve stale pages.
    m = re.search(r"^RustCache: 1 of 4 workers served the new price; stale pages: (\d+)", out, re.M)
    assert m and int(m.group(1)) > 0, out
    # Two tables of 4 workers each, one writer each; the warm-up reached every worker.
    rows = re.findall(r"^  (\d+)( \(wrote\))? +(\d+) +(\d+) ", out, re.M)
    assert len(rows) == 8 and sum(bool(w) for _, w, _, _ in rows) == 2, out
    assert out.count("until each of the 4 workers served") == 2
    near_rows, rust_rows = rows[:4], rows[4:]
    assert all(int(stale) < int(pages) for _, _, pages, stale in near_rows), out
    # RustCache's non-writers served nothing but the old price.
    assert all(int(stale) == int(pages) > 0 for _, w, pages, stale in rust_rows if not w), out


def test_coherence_demo_says_why_it_cannot_run_without_redis_server(tmp_path):
    """No redis-server and no apt-get on PATH: status 2 and what to install, nothing started."""
    result = subprocess.run(
        [sys.executable, str(COHERENCE)],
        cwd=COHERENCE.parent,
        env=_demo_env(PATH=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "redis-server not found on PATH and there is no apt-get here" in result.stderr
    assert "apt-get install -y redis-server" in result.stderr
    assert "Traceback" not in result.stderr and "NearCache" not in result.stdout


@pytest.fixture
def demo(monkeypatch):
    """coherence_demo.py as a module (registered while the test runs: dataclasses need that)."""
    spec = importlib.util.spec_from_file_location("coherence_demo", COHERENCE)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "coherence_demo", module)
    spec.loader.exec_module(module)
    return module


def _fake_which(found: dict[str, str]):
    return lambda name: found.get(name)


def test_find_redis_server_needs_root_to_install(demo, monkeypatch):
    monkeypatch.setattr(demo.shutil, "which", _fake_which({"apt-get": "/usr/bin/apt-get"}))
    monkeypatch.setattr(demo.os, "geteuid", lambda: 1000)
    ran = []
    monkeypatch.setattr(demo.subprocess, "run", lambda *a, **k: ran.append(a))
    with pytest.raises(demo.CannotRun, match="needs root: run `sudo apt-get install -y redis-ser"):
        demo.find_redis_server()
    assert ran == []


def test_find_redis_server_installs_debians_package_as_root(demo, monkeypatch):
    found = {"apt-get": "/usr/bin/apt-get"}
    monkeypatch.setattr(demo.shutil, "which", _fake_which(found))
    monkeypatch.setattr(demo.os, "geteuid", lambda: 0)
    ran = []

    def run(cmd, env, **kwargs):
        ran.append((cmd, env["DEBIAN_FRONTEND"]))
        if cmd[1] == "install":
            found["redis-server"] = "/usr/bin/redis-server"
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(demo.subprocess, "run", run)
    assert demo.find_redis_server() == "/usr/bin/redis-server"
    assert ran == [
        (["/usr/bin/apt-get", "update", "-q"], "noninteractive"),
        (["/usr/bin/apt-get", "install", "-y", "-q", "redis-server"], "noninteractive"),
    ]
    # Found on PATH: nothing is installed.
    ran.clear()
    assert demo.find_redis_server() == "/usr/bin/redis-server" and ran == []


def test_find_redis_server_reports_a_failed_install(demo, monkeypatch):
    monkeypatch.setattr(demo.shutil, "which", _fake_which({"apt-get": "/usr/bin/apt-get"}))
    monkeypatch.setattr(demo.os, "geteuid", lambda: 0)
    monkeypatch.setattr(
        demo.subprocess,
        "run",
        lambda cmd, **kwargs: subprocess.CompletedProcess(cmd, 100 if cmd[1] == "install" else 0),
    )
    with pytest.raises(demo.CannotRun, match="install -y -q redis-server` failed .exit status 100"):
        demo.find_redis_server()
    # No install wanted: says what to do.
    with pytest.raises(demo.CannotRun, match="redis-server not found on PATH: install Redis"):
        demo.find_redis_server(install=False)


# What the site adds for the coherence demo, in-process with Django's test client.
SITE_CHECK = """
import json, os, django
from django.core.management import call_command
django.setup()
call_command("migrate", verbosity=0)
from django.test import Client
from shop.models import Product
c, pk = Client(), Product.objects.get(name="apple").pk
page, price = f"/products/{pk}/", f"/products/{pk}/price/"
out = {"pid": os.getpid(), "pages": []}
for _ in range(2):
    r = c.get(page)
    h = r.headers
    out["pages"].append([r.status_code, h.get("X-Served-By"), h.get("X-Page-Source")])
out["bad"] = [c.post(price, data).status_code
              for data in ({"price": "abc"}, {"price": ""}, {"price": "1234567.891"}, {})]
out["bad_body"] = c.post(price, {"price": "abc"}).content.decode()
out["get"] = c.get(price).status_code
out["unknown"] = c.post("/products/999/price/", {"price": "2"}).status_code
out["price_after_bad"] = str(Product.objects.get(pk=pk).price)
r = c.post(price, {"price": "1.50"})
out["good"] = [r.status_code, r.content.decode(), r.headers.get("X-Served-By")]
r = c.get(page)
out["after"] = [r.headers.get("X-Page-Source"), "apple: 1.50" in r.content.decode()]
print(json.dumps(out))
"""


def _site_check(tmp_path, **extra):
    result = subprocess.run(
        [sys.executable, "-c", SITE_CHECK],
        cwd=DEMO.parent,
        env=_demo_env(
            DJANGO_SETTINGS_MODULE="products_site.settings",
            PRODUCTS_DB=str(tmp_path / "db.sqlite3"),
            **extra,
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def test_worker_demo_site_names_the_worker_and_validates_the_price(tmp_path):
    out = _site_check(tmp_path, PRODUCTS_WORKER_DEMO="1")
    pid = str(out["pid"])
    assert out["pages"] == [[200, pid, "view"], [200, pid, "memory"]]
    # Not a price, empty, too many digits, missing: 400, nothing saved.
    assert out["bad"] == [400, 400, 400, 400]
    assert "Enter a number" in out["bad_body"]
    assert out["get"] == 405 and out["unknown"] == 404
    assert out["price_after_bad"] == "1.20"
    assert out["good"] == [200, "apple: 1.50\n", pid]
    # The save invalidated the cached page: the view ran again, with the new price.
    assert out["after"] == ["view", True]


def test_site_without_the_worker_demo_has_no_price_endpoint_nor_headers(tmp_path):
    out = _site_check(tmp_path)
    assert out["pages"] == [[200, None, None], [200, None, None]]
    assert out["bad"] == [404] * 4 and out["get"] == 404 and out["unknown"] == 404
    assert out["good"][0] == 404 and out["price_after_bad"] == "1.20"
    assert out["after"] == [None, False]


def test_site_start_moves_to_another_port_when_its_free_port_was_taken(demo, monkeypatch, tmp_path):
    """Someone binds the port picked for gunicorn first: gunicorn gives up, the demo retries."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = iter([port])
        real = demo._free_port
        monkeypatch.setattr(demo, "_free_port", lambda: next(ports, None) or real())
        demo.migrate(tmp_path / "db.sqlite3")
        site = demo.Site.start("RustCache", tmp_path / "db.sqlite3", None, tmp_path, "/")
        try:
            assert site.port != port
            assert demo.get(site.port, "/").status == 200
        finally:
            site.stop()
        assert site.proc.poll() is not None
        assert "Connection in use" in (tmp_path / "gunicorn-RustCache.log").read_text()
