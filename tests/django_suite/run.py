"""Run Django's own cache test suite (``tests/cache`` of the Django sdist) against a backend.

    python tests/django_suite/run.py [-v 2] [--failfast] [-k PATTERN] [--list] [LABEL ...]

Steps: download the sdist of exactly the installed Django version into ``.work/django-suite/``
(once; ``$RUSTCACHE_WORK/django-suite/`` when set),
copy ``tests/cache/`` out of it as the importable package ``cache`` with every LocMemCache
reference rewritten to ``$RUSTCACHE_SUITE_BACKEND`` (default ``django_rustcache.RustCache``),
then run the in-process-backend test classes with Django's DiscoverRunner.
LABELs narrow the run: ``LocMemCacheTests`` or ``LocMemCacheTests.test_cull``.
Exit status is non-zero on any failure or error, or when no test passed.

With ``RUSTCACHE_SUITE_BACKEND=django_rustcache.NearCache`` it instead runs Django's Redis test
class (``BaseCacheTests`` with RedisCacheTests' settings: the culling caches left out, so the
culling tests skip themselves, exactly as for Django's RedisCache) as ``NearCacheTests``, against
a server it starts itself (``RUSTCACHE_SUITE_SERVER``: redis (default) or valkey) and stops at exit.
``--near-listener rust`` (the default) runs NearCache as shipped, with its Rust invalidation
listener and L1; ``none`` runs it without, so every read goes to Redis.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import unittest
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# Under the build directory (.ci/lib.sh exports RUSTCACHE_WORK), not in the source tree.
CACHE_DIR = Path(os.environ.get("RUSTCACHE_WORK") or HERE.parent.parent / ".work") / "django-suite"
LOCMEM = "django.core.cache.backends.locmem.LocMemCache"
LOCMEM_IMPORT = "from django.core.cache.backends.locmem import LocMemCache"
NEAR = "django_rustcache.NearCache"

# Test classes of cache/tests.py that are NOT run, and why. Everything else in the module runs
# (LocMemCacheTests, key validation, closing, CacheUtils, CacheHEADTest, CacheI18nTest,
# CacheMiddlewareTest, TestWithTemplateResponse, CacheHandlerTest, ...), with LocMemCache
# rebound to the backend under test. cache/tests_async.py only holds AsyncDummyCacheTests
# (DummyCache) and is not run either.
EXCLUDED = {
    "DummyCacheTests": "DummyCache backend (stores nothing)",
    "DBCacheTests": "DatabaseCache backend",
    "DBCacheWithTimeZoneTests": "DatabaseCache backend",
    "CreateCacheTableForDBCacheTests": "DatabaseCache's createcachetable command",
    "FileBasedCacheTests": "FileBasedCache backend",
    "FileBasedCachePathLibTests": "FileBasedCache backend",
    "PyLibMCCacheTests": "memcached server backend (skips itself when unconfigured)",
    "PyMemcacheCacheTests": "memcached server backend (skips itself when unconfigured)",
    "RedisCacheTests": "Redis server backend (skips itself when unconfigured)",
}


def fetch_sdist(version: str) -> Path:
    """Return the Django sdist for ``version``, downloading it with pip if needed."""
    sdist_dir = CACHE_DIR / "sdist"
    found = sorted(sdist_dir.glob(f"[dD]jango-{version}.tar.gz"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        cmd += ["--dest", str(sdist_dir), f"django=={version}"]
        print("Downloading:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        found = sorted(sdist_dir.glob(f"[dD]jango-{version}.tar.gz"))
    if not found:
        sys.exit(f"pip did not produce django-{version}.tar.gz in {sdist_dir}")
    return found[0]


def rewrite(source: str, backend: str) -> str:
    """Rebind LocMemCache references (dotted paths and the class import) to ``backend``."""
    module, _, cls = backend.rpartition(".")
    source = source.replace(LOCMEM_IMPORT, f"from {module} import {cls} as LocMemCache")
    return source.replace(LOCMEM, backend)


def materialize(sdist: Path, backend: str) -> Path:
    """Write the rewritten ``cache`` package; return the directory to put on sys.path."""
    root = CACHE_DIR / sdist.name.removesuffix(".tar.gz") / backend.replace(".", "_")
    shutil.rmtree(root, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if not member.isfile() or parts[1:3] != ("tests", "cache"):
                continue
            target = root.joinpath(*parts[2:])
            target.parent.mkdir(parents=True, exist_ok=True)
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            if target.suffix == ".py":
                text = rewrite(data.decode(), backend)
                if backend != LOCMEM and "backends.locmem" in text:
                    sys.exit(f"{target}: a LocMemCache reference was not rewritten")
                data = text.encode()
            target.write_bytes(data)
    if not (root / "cache" / "tests.py").is_file():
        sys.exit(f"{sdist} has no tests/cache/tests.py")
    return root


def suite_classes(suite: Any) -> list[str]:
    """Names of the TestCase classes defined in ``cache.tests`` that apply to our backend."""
    return [
        name
        for name, obj in vars(suite).items()
        if isinstance(obj, type)
        and issubclass(obj, unittest.TestCase)
        and obj.__module__ == suite.__name__
        and name not in EXCLUDED
    ]


def start_near_server() -> str:
    """Start our own server for the NearCache run (tests/servers.py); its redis:// URL."""
    sys.path.insert(0, str(HERE.parent.parent))
    from tests import servers

    kind = os.environ.get("RUSTCACHE_SUITE_SERVER", "redis")
    try:
        server = servers.start(kind)
    except servers.ServerUnavailable as e:
        sys.exit(f"NearCache suite needs a {kind} server: {e}")
    print(f"Started {kind} ({server.binary}) on port {server.port}, pid {server.pid}")
    return server.url


def near_suite_class(suite: Any, location: str) -> str:
    """Add ``NearCacheTests`` to the suite module: RedisCacheTests' contract and settings, minus
    the tests of RedisCache's own internals (its client class, pools, serializer)."""
    import redis
    from django.test import TestCase, override_settings

    params = {"BACKEND": NEAR, "LOCATION": location}
    cls = type(
        "NearCacheTests",
        (suite.BaseCacheTests, TestCase),
        {"__module__": suite.__name__, "incr_decr_type_error": redis.ResponseError},
    )
    settings = suite.caches_setting_for_tests(base=params, exclude=suite.redis_excluded_caches)
    suite.NearCacheTests = override_settings(CACHES=settings)(cls)
    return "NearCacheTests"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("labels", nargs="*", help="Class or Class.test_method to run")
    parser.add_argument("-v", "--verbosity", type=int, default=1)
    parser.add_argument("--failfast", action="store_true")
    parser.add_argument("-k", dest="patterns", action="append", help="test name pattern")
    parser.add_argument("--list", action="store_true", help="list the classes and exit")
    parser.add_argument(
        "--near-listener",
        choices=("none", "rust"),
        default="rust",
        help="NearCache only: with its Rust invalidation listener and L1 (default), or without",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=float(os.environ.get("RUSTCACHE_SUITE_TIMEOUT", 1200)),
        help="dump all tracebacks and exit 1 after this many seconds (deadlock guard)",
    )
    args = parser.parse_args(argv)
    faulthandler.dump_traceback_later(args.timeout, exit=True)

    sys.path.insert(0, str(HERE))
    os.environ["DJANGO_SETTINGS_MODULE"] = "suite_settings"
    import suite_settings

    backend = suite_settings.SUITE_BACKEND
    near = backend == NEAR
    if near:
        location = start_near_server()
        suite_settings.CACHES = {"default": {"BACKEND": NEAR, "LOCATION": location}}
        if args.near_listener == "none":
            from django_rustcache import near as near_module

            near_module.LISTENER_FACTORY = lambda *a, **k: near_module._NoListener()
    version = importlib.metadata.version("django")
    sys.path.insert(0, str(materialize(fetch_sdist(version), backend)))

    import django
    from django.test.runner import DiscoverRunner

    django.setup()
    suite = importlib.import_module("cache.tests")

    if near:
        classes = [near_suite_class(suite, location)]
        print(f"Django {version} cache suite against {backend} (listener: {args.near_listener})")
        print("Running NearCacheTests: BaseCacheTests with RedisCacheTests' settings (no cull")
        print("caches: the culling tests skip themselves, as for RedisCache)")
    else:
        classes = suite_classes(suite)
        print(f"Django {version} cache suite against {backend}")
        print(f"Running {len(classes)} classes: {', '.join(classes)}")
        print(f"Excluded: {', '.join(EXCLUDED)}")
        print("No test is modified: RustCache offers LocMemCache's _cache, _expire_info and _lock.")
    if args.list:
        return 0

    labels = [lbl if lbl.startswith("cache.") else f"cache.tests.{lbl}" for lbl in args.labels]
    labels = labels or [f"cache.tests.{name}" for name in classes]

    class CountingResult(unittest.TextTestResult):
        passed = 0

        def addSuccess(self, test: unittest.TestCase) -> None:
            super().addSuccess(test)
            self.passed += 1

    class Runner(DiscoverRunner):
        result: CountingResult | None = None

        def get_resultclass(self) -> type[CountingResult]:
            return CountingResult

        def run_suite(self, suite: unittest.TestSuite, **kwargs: Any) -> CountingResult:
            self.result = super().run_suite(suite, **kwargs)
            return self.result

    runner = Runner(
        verbosity=args.verbosity, failfast=args.failfast, test_name_patterns=args.patterns
    )
    failures = runner.run_tests(labels)
    result = runner.result
    passed = result.passed if result else 0
    if result:  # a plain closing line; skipped tests are not all in testsRun on Python 3.12+
        failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
        print(f"django-suite: {passed} passed, {failed} failed, {len(result.skipped)} skipped")
    return 1 if failures or not passed else 0


if __name__ == "__main__":
    sys.exit(main())
