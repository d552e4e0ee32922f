"""Shared fixtures: every test starts with empty caches. Hypothesis profiles: ``ci``
(derandomized: the same examples on every run, so a CI result is reproducible) is what
``.ci/run`` selects with ``HYPOTHESIS_PROFILE=ci``; locally the default profile explores new
random examples on each run."""

import os

import pytest
from django.core.cache import caches
from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _empty_caches():
    for alias in ("default", "other"):
        caches[alias].clear()
    yield
    for alias in ("default", "other"):
        caches[alias].clear()


@pytest.fixture(scope="session", params=["redis", "valkey"])
def near_server(request):
    """A redis-server and a valkey-server of our own (one each per session), stopped at the end.

    A missing binary fails every test that uses it, with what to install: never a skip.
    """
    from tests import servers

    try:
        server = servers.start(request.param)
    except servers.ServerUnavailable as e:
        pytest.fail(f"NearCache tests need a real {request.param} server: {e}", pytrace=False)
    yield server
    server.cleanup()


@pytest.fixture
def raw(near_server):
    """A plain redis-py client on the test server's db 0, emptied before each test."""
    import redis

    client = redis.Redis.from_url(near_server.url)
    client.flushall()
    yield client
    client.close()
