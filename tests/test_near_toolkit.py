# ruff: noqa: F811  (the fixtures imported from tests.test_near are used as parameters)
"""The invalidation toolkit, unchanged, on NearCache aliases: ``invalidate_on``,
``RUSTCACHE_AUTO_INVALIDATE``, the QuerySet mixin, transactions, ``@cached``,
``cache_page_tagged`` and ``{% cache_tagged %}`` (issue 9 item 5), and a save in one process
seen by another."""

from __future__ import annotations

import itertools
import os
import time
from collections import Counter
from decimal import Decimal

import pytest
from django.core.cache import cache, caches
from django.db import transaction
from django.http import HttpResponse
from django.template import Context, Template
from django.test import RequestFactory

from django_rustcache import NearCache
from django_rustcache.decorators import cache_page_tagged, cached
from django_rustcache.invalidation import instance_tag, model_tag
from tests.test_near import listener  # noqa: F401 (fixtures)
from tests.testapp.models import Product, Supplier

pytestmark = pytest.mark.django_db
calls: Counter = Counter()
_prefixes = itertools.count()


@pytest.fixture
def near(settings, near_server, raw, listener):
    """ "default" and "other" are NearCache aliases on the test server (fresh L1s each test)."""
    n = next(_prefixes)
    settings.CACHES = {
        alias: {
            "BACKEND": "django_rustcache.NearCache",
            "LOCATION": near_server.url,
            "KEY_PREFIX": f"tk{n}{alias}",
        }
        for alias in ("default", "other")
    }
    calls.clear()
    assert isinstance(caches["default"], NearCache) and isinstance(caches["other"], NearCache)
    return caches["default"]


@pytest.fixture
def apple():
    return Product.objects.create(name="apple", price=Decimal("1.20"))


def _cache_product(product):
    key = f"product:{product.pk}"
    cache.set(key, str(product.price), tags=[model_tag(product), instance_tag(product)])
    return key


def test_invalidate_on_save_and_delete_reach_a_near_alias(near, apple):
    key = _cache_product(apple)
    caches["other"].set("list", 1, tags=["product_list"])
    caches["other"].set("product-count", 1)
    assert cache.get(key) == "1.20"
    apple.price = Decimal("1.30")
    apple.save()
    assert cache.get(key) is None
    assert caches["other"].get("list") is None and caches["other"].get("product-count") is None
    key = _cache_product(apple)
    apple.delete()
    assert cache.get(key) is None


def test_the_queryset_mixin_invalidates_a_near_alias(near, apple):
    key = _cache_product(apple)
    cache.set("all", 1, tags=[model_tag(Product)])
    assert Product.objects.filter(pk=apple.pk).update(price=Decimal("3")) == 1
    assert cache.get(key) is None and cache.get("all") is None


def test_auto_invalidate_reaches_a_near_alias(near, settings):
    supplier = Supplier.objects.create(name="s")
    cache.set("supplier", 1, tags=[instance_tag(supplier)])
    settings.RUSTCACHE_AUTO_INVALIDATE = True
    supplier.save()
    assert cache.get("supplier") is None


@pytest.mark.django_db(transaction=True)
def test_a_transaction_invalidates_at_once_and_again_on_commit(near, apple):
    key = _cache_product(apple)
    with transaction.atomic():
        apple.price = Decimal("2.00")
        apple.save()
        assert cache.get(key) is None
        cache.set(key, "1.20", tags=[instance_tag(apple)])  # another request, old row
        assert cache.get(key) == "1.20"
    assert cache.get(key) is None


@pytest.mark.django_db(transaction=True)
def test_a_rollback_leaves_no_entry_computed_from_the_rolled_back_write(near, apple):
    def price():
        return cache.get_or_set(
            "price", lambda: str(Product.objects.get(pk=apple.pk).price), tags=[instance_tag(apple)]
        )

    with pytest.raises(RuntimeError), transaction.atomic():
        apple.price = Decimal("9.99")
        apple.save()
        assert price() == "9.99"
        raise RuntimeError("roll back")
    assert cache.get("price") is None
    assert price() == "1.20"


@cached(60, tags=["testapp.product:{pk}"])
def cached_price(pk):
    calls["price"] += 1
    return Product.objects.get(pk=pk).price


def test_cached_functions_on_a_near_alias(near, apple):
    assert cached_price(apple.pk) == Decimal("1.20")
    assert cached_price(apple.pk) == Decimal("1.20")
    assert calls["price"] == 1
    apple.price = Decimal("1.50")
    apple.save()
    assert cached_price(apple.pk) == Decimal("1.50")
    assert calls["price"] == 2


@cache_page_tagged(300, tags="testapp.product:{pk}")
def product_view(request, pk):
    calls["view"] += 1
    return HttpResponse(f"price {Product.objects.get(pk=pk).price}")


def test_cache_page_tagged_on_a_near_alias(near, apple):
    def get():
        return product_view(RequestFactory().get(f"/p/{apple.pk}/"), pk=apple.pk).content

    assert get() == b"price 1.20"
    assert get() == b"price 1.20"
    assert calls["view"] == 1
    apple.price = Decimal("1.40")
    apple.save()
    assert get() == b"price 1.40"
    assert calls["view"] == 2


def test_cache_tagged_template_fragments_on_a_near_alias(near, apple):
    source = (
        '{% load rustcache %}{% cache_tagged 300 products tags="testapp.product" %}'
        "{% for p in products %}{{ p.name }} {{ p.price }};{% endfor %}{% endcache_tagged %}"
    )

    def render():
        return Template(source).render(Context({"products": Product.objects.all()}))

    assert render() == "apple 1.20;"
    Product.objects.filter(pk=apple.pk).update(price=Decimal("1.25"))
    assert render() == "apple 1.25;"
    apple.refresh_from_db()
    apple.price = Decimal("0.90")
    Product.objects.bulk_update([apple], ["price"])
    assert render() == "apple 0.90;"


def _in_child(fn):
    """Run ``fn`` in a forked child; its exit code must be 0."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            fn()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _eventually(predicate, seconds=10.0):
    """Whether ``predicate()`` became true within ``seconds`` (a bound on a wait, generous for a
    loaded machine: it costs nothing when the invalidation comes at once)."""
    end = time.monotonic() + seconds
    while not predicate() and time.monotonic() < end:
        time.sleep(0.01)
    return predicate()


# Forking while the listener thread runs is what this tests (gunicorn --preload does it).
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
@pytest.mark.django_db(transaction=True)
def test_a_save_in_another_process_is_seen_by_this_one(near, apple):
    key = _cache_product(apple)
    assert cached_price(apple.pk) == Decimal("1.20")
    assert cache.get(key) == "1.20" and cache.get(key) == "1.20"  # warm L1

    def save_in_child():
        with transaction.atomic():  # invalidates now and again on commit
            apple.price = Decimal("7.00")
            apple.save()

    _in_child(save_in_child)
    assert _eventually(lambda: cache.get(key) is None)
    cached_price(apple.pk)
    assert calls["price"] == 2  # recomputed: the child's save reached this process's entry
