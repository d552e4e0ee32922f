"""Shared fixtures: every test starts with empty caches."""

import pytest
from django.core.cache import caches


@pytest.fixture(autouse=True)
def _empty_caches():
    for alias in ("default", "other"):
        caches[alias].clear()
    yield
    for alias in ("default", "other"):
        caches[alias].clear()
