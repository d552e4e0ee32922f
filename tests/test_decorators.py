"""django_rustcache.decorators: ``@cached`` and ``cache_page_tagged``."""

import threading
from collections import Counter
from decimal import Decimal

import pytest
from django.core.cache import cache, caches
from django.http import HttpResponse
from django.template import engines
from django.template.response import TemplateResponse
from django.urls import path
from django.views.decorators.cache import cache_page

from django_rustcache.decorators import cache_page_tagged, cached
from django_rustcache.invalidation import instance_tag
from tests.testapp.models import Product

calls: Counter = Counter()


@pytest.fixture(autouse=True)
def _reset_calls():
    calls.clear()


# @cached ---------------------------------------------------------------------------------------


@cached(60)
def square(x, power=2):
    calls["square"] += 1
    return x**power


@cached
def nothing():
    calls["nothing"] += 1


@cached(timeout=60, tags=["testapp.product:{pk}", lambda pk: "prices"])
def price(pk):
    calls["price"] += 1
    return Product.objects.get(pk=pk).price


@cached(key="total:{0}", tags="product_list", cache="other")
def total(label):
    calls["total"] += 1
    return sum(p.price for p in Product.objects.all())


class Shelf:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"Shelf({self.name!r})"

    @cached(key=lambda self, n: f"shelf:{self.name}:{n}")
    def top(self, n):
        calls["top"] += 1
        return f"{self.name}:{n}"

    @cached
    def label(self):
        calls["label"] += 1
        return self.name.upper()


class NoRepr:
    @cached
    def value(self):
        return 1


def test_cached_computes_once_per_arguments():
    assert [square(3), square(3), square(x=3), square(3, 2), square(3, 3)] == [9, 9, 9, 9, 27]
    assert calls["square"] == 2
    assert square.cache_key(3) == square.cache_key(x=3, power=2) != square.cache_key(4)
    assert square.cache_key(3).startswith("cached:tests.test_decorators.square:")
    assert square.__name__ == "square"


def test_cached_stores_none_results():
    assert nothing() is None and nothing() is None
    assert calls["nothing"] == 1


def test_invalidate_drops_one_result():
    square(3), square(4)
    assert square.invalidate(3) is True
    assert square.invalidate(3) is False
    square(3), square(4)
    assert calls["square"] == 3


@pytest.mark.django_db
def test_tags_as_templates_and_callables_give_fresh_output_after_a_change():
    apple = Product.objects.create(name="apple", price=Decimal("1.20"))
    assert price.tags_for(apple.pk) == [instance_tag(apple), "prices"]
    assert price(apple.pk) == Decimal("1.20")
    assert price(apple.pk) == Decimal("1.20") and calls["price"] == 1
    Product.objects.filter(pk=apple.pk).update(price=Decimal("2"))  # the mixin
    assert price(apple.pk) == Decimal("2")
    apple.refresh_from_db()
    apple.price = Decimal("3")
    apple.save()  # post_save
    assert price(apple.pk) == Decimal("3")
    assert calls["price"] == 3


@pytest.mark.django_db
def test_key_template_and_cache_alias_with_a_rule_on_that_cache():
    apple = Product.objects.create(name="apple", price=Decimal("1.20"))
    assert total("all") == Decimal("1.20")
    assert caches["other"].get("total:all") == Decimal("1.20")
    assert cache.get("total:all") is None
    Product.objects.create(name="banana", price=Decimal("0.50"))  # testapp's "other" rule
    assert caches["other"].get("total:all") is None
    assert total("all") == Decimal("1.70")
    apple.delete()
    assert total("all") == Decimal("0.50")


def test_methods_key_on_self_and_invalidate_through_the_instance():
    a, b = Shelf("a"), Shelf("b")
    assert [a.top(1), a.top(1), b.top(1)] == ["a:1", "a:1", "b:1"]
    assert calls["top"] == 2
    assert a.top.cache_key(1) == "shelf:a:1"
    assert [a.label(), a.label(), b.label()] == ["A", "A", "B"]
    assert a.label.invalidate() is True
    assert a.label() == "A" and calls["label"] == 3
    assert Shelf.label.cache_key(a) == a.label.cache_key()


@pytest.mark.django_db
def test_model_instances_are_keyed_by_pk():
    apple = Product.objects.create(name="apple", price=1)

    @cached
    def describe(product):
        calls["describe"] += 1
        return product.name

    assert describe(apple) == describe(Product.objects.get(pk=apple.pk)) == "apple"
    assert calls["describe"] == 1
    with pytest.raises(TypeError, match="unsaved"):
        describe(Product(name="new", price=1))


def test_objects_without_a_stable_repr_are_refused_in_default_keys():
    with pytest.raises(TypeError, match="pass key="):
        NoRepr().value()


def test_async_functions_and_methods_are_refused_when_decorated():
    """Their result would be a coroutine: never run, unpicklable (it failed at the first call,
    after taking NearCache's STAMPEDE_LOCK, with "cannot pickle 'coroutine' object")."""

    async def fetch(pk: int) -> int:
        return pk

    with pytest.raises(TypeError, match="async function 'test_async_.*fetch'"):
        cached(60)(fetch)
    with pytest.raises(TypeError, match="async function"):
        cached(fetch)
    with pytest.raises(TypeError, match="async function"):

        class Basket:
            @cached(60, tags="basket")
            async def total(self) -> int:
                return 1


def test_fill_overlapping_an_invalidation_from_another_thread_is_not_stored():
    computing, invalidated = threading.Event(), threading.Event()

    @cached(tags=["t"])
    def slow():
        calls["slow"] += 1
        computing.set()
        assert invalidated.wait(5)
        return calls["slow"]

    results = []
    thread = threading.Thread(target=lambda: results.append(slow()))
    thread.start()
    assert computing.wait(5)
    cache.invalidate_tags(["t"])
    invalidated.set()
    thread.join(5)
    assert results == [1]  # returned to its caller, not stored:
    assert cache.get(slow.cache_key()) is None
    assert slow() == 2 and slow() == 2  # the next fill, with no invalidation, is stored


# cache_page_tagged -----------------------------------------------------------------------------

state = {"price": "1.20"}


@cache_page_tagged(300, tags=["pages", "product:{pk}", lambda request, pk: f"by-request:{pk}"])
def product_view(request, pk):
    calls["product_view"] += 1
    return HttpResponse(f"product {pk}: {state['price']}")


@cache_page(300)
def django_view(request, pk):
    return HttpResponse(f"product {pk}: {state['price']}")


@cache_page_tagged(300, tags="pages")
def template_view(request):
    calls["template_view"] += 1
    template = engines["django"].from_string("price {{ price }}")
    return TemplateResponse(request, template, {"price": state["price"]})


@cache_page_tagged(300, tags="pages")
def racing_view(request):
    calls["racing_view"] += 1
    cache.invalidate_tags(["pages"])  # a write lands while the page renders
    return HttpResponse(str(calls["racing_view"]))


@cache_page_tagged(300, tags="testapp.product:{pk}")
def db_view(request, pk):
    calls["db_view"] += 1
    return HttpResponse(f"price {Product.objects.get(pk=pk).price}")


urlpatterns = [
    path("db/<int:pk>/", db_view),
    path("product/<int:pk>/", product_view),
    path("django/<int:pk>/", django_view),
    path("template/", template_view),
    path("racing/", racing_view),
]

pytestmark_urls = pytest.mark.urls("tests.test_decorators")


@pytestmark_urls
def test_cache_page_tagged_serves_from_cache_and_fresh_after_invalidation(client):
    state["price"] = "1.20"
    assert client.get("/product/1/").content == b"product 1: 1.20"
    state["price"] = "9.99"
    assert client.get("/product/1/").content == b"product 1: 1.20"  # cached, 300 s
    assert calls["product_view"] == 1
    cache.invalidate_tags(["product:2"])
    assert client.get("/product/1/").content == b"product 1: 1.20"
    for tag in ("product:1", "by-request:1", "pages"):
        assert client.get("/product/1/").status_code == 200  # refill
        cache.invalidate_tags([tag])
        assert client.get("/product/1/").content == b"product 1: 9.99"
    assert cache.keys() != []
    cache.invalidate_tags(["pages"])
    assert cache.keys() == []  # the page and its header list both carried the tags


@pytestmark_urls
def test_cache_page_tagged_has_cache_pages_headers_and_rules(client):
    ours, django = client.get("/product/1/"), client.get("/django/1/")
    for header in ("Cache-Control", "Expires"):
        assert ours[header] == django[header]
    assert ours["Cache-Control"] == "max-age=300"
    assert client.post("/product/1/").status_code == 200
    client.post("/product/1/")
    assert calls["product_view"] == 3  # POSTs are never served from the cache
    assert all(290 < cache.ttl(key) <= 300 for key in cache.keys())


@pytestmark_urls
def test_template_responses_are_stored_after_rendering(client):
    state["price"] = "1.20"
    assert client.get("/template/").content == b"price 1.20"
    state["price"] = "2.00"
    assert client.get("/template/").content == b"price 1.20"
    cache.invalidate_tags(["pages"])
    assert client.get("/template/").content == b"price 2.00"
    assert calls["template_view"] == 2


@pytestmark_urls
def test_page_rendered_during_an_invalidation_is_served_but_not_stored(client):
    assert client.get("/racing/").content == b"1"
    assert client.get("/racing/").content == b"2"
    assert cache.keys() == []


@pytestmark_urls
@pytest.mark.django_db
def test_cached_page_is_fresh_after_a_save(client):
    apple = Product.objects.create(name="apple", price=Decimal("1.20"))
    banana = Product.objects.create(name="banana", price=Decimal("0.50"))
    assert client.get(f"/db/{apple.pk}/").content == b"price 1.20"
    assert client.get(f"/db/{banana.pk}/").content == b"price 0.50"
    apple.price = Decimal("1.50")
    apple.save()
    assert client.get(f"/db/{apple.pk}/").content == b"price 1.50"
    assert client.get(f"/db/{banana.pk}/").content == b"price 0.50"
    assert calls["db_view"] == 3  # banana's page was still cached
