"""django_rustcache.invalidation: tags, signal rules, transactions, the QuerySet mixin, settings.

The rules under test are registered in tests/testapp (apps.py and model decorators):
Product -> default tags in "default", plus ``product_list`` and key ``product-count`` in "other";
Category -> ``category:<pk>``; Article -> default (bare decorator); Page -> key by slug + "pages".
"""

import logging
import threading
from decimal import Decimal

import pytest
from django.core.cache import cache, caches
from django.core.cache.backends.locmem import LocMemCache
from django.db import transaction

from django_rustcache.invalidation import (
    instance_tag,
    invalidate_model,
    invalidate_on,
    model_tag,
    versioned_key,
)
from django_rustcache.signals import tags_invalidated
from tests.testapp.models import (
    Article,
    AuditLog,
    Category,
    DiscountedProduct,
    Page,
    Place,
    Product,
    Restaurant,
    Supplier,
    Widget,
)

pytestmark = pytest.mark.django_db
other = caches["other"]


def cache_product(product, key=None):
    """A cached entry computed from ``product``, tagged the canonical way."""
    key = key or f"product:{product.pk}"
    cache.set(key, str(product.price), tags=[model_tag(product), instance_tag(product)])
    return key


@pytest.fixture
def apple():
    return Product.objects.create(name="apple", price=Decimal("1.20"))


@pytest.fixture
def banana():
    return Product.objects.create(name="banana", price=Decimal("0.50"))


# Tags and keys ---------------------------------------------------------------------------------


def test_model_and_instance_tags(apple):
    assert model_tag(Product) == model_tag(apple) == "testapp.product"
    assert instance_tag(apple) == f"testapp.product:{apple.pk}"
    # A proxy shares its concrete model's tags: they are the same rows.
    assert model_tag(DiscountedProduct) == "testapp.product"
    with pytest.raises(ValueError):
        instance_tag(Product(name="unsaved", price=1))


def test_versioned_key_follows_version_field():
    article = Article.objects.create(title="a")
    first = versioned_key(article)
    assert first == f"testapp.article:{article.pk}:v1"
    assert versioned_key(article, "body", 2) == f"{first}:body:2"
    article.save()
    assert versioned_key(article) == f"testapp.article:{article.pk}:v2"


def test_versioned_key_follows_updated_at():
    page = Page.objects.create(slug="home")
    first = versioned_key(page)
    assert first.startswith(f"testapp.page:{page.pk}:v{page.updated_at.year}")
    page.body = "new"
    page.save()
    assert versioned_key(page) != first
    assert versioned_key(page, field="slug") == f"testapp.page:{page.pk}:vhome"


def test_versioned_key_without_a_version_is_the_instance_tag():
    supplier = Supplier.objects.create(name="s")
    assert versioned_key(supplier, "x") == f"testapp.supplier:{supplier.pk}:x"


def test_set_many_tags_are_invalidated_by_a_save(apple, banana):
    cache.set_many({"a1": 1, "a2": 2}, tags=[instance_tag(apple)])
    cache.set_many({"b1": 1}, tags=[instance_tag(banana)])
    apple.price = Decimal("1.30")
    apple.save()
    assert cache.get_many(["a1", "a2", "b1"]) == {"b1": 1}


# Signal rules ----------------------------------------------------------------------------------


def test_save_invalidates_default_tags_and_the_other_rules(apple, banana):
    apple_key = cache_product(apple)
    cache.set("untagged", 1)
    cache.set("per-banana", 1, tags=[instance_tag(banana)])
    other.set("list", ["apple"], tags=["product_list"])
    other.set("product-count", 2)

    apple.price = Decimal("1.50")
    apple.save()

    assert cache.get(apple_key) is None
    assert cache.get("per-banana") == 1  # only apple's row changed
    assert cache.get("untagged") == 1  # untagged entries are untouched
    assert other.get("list") is None and other.get("product-count") is None


def test_model_tag_entries_go_on_any_save(apple, banana):
    cache.set("all-products", [1, 2], tags=[model_tag(Product)])
    banana.save()
    assert cache.get("all-products") is None


def test_delete_invalidates(apple):
    key = cache_product(apple)
    apple.delete()
    assert cache.get(key) is None


def test_save_through_a_proxy_runs_the_concrete_models_rules(apple):
    key = cache_product(apple)
    other.set("list", 1, tags=["product_list"])
    proxy = DiscountedProduct.objects.get(pk=apple.pk)
    proxy.price = Decimal("0.99")
    proxy.save()
    assert cache.get(key) is None and other.get("list") is None


def test_rule_on_a_multi_table_parent_covers_the_child():
    restaurant = Restaurant.objects.create(name="r")
    tags = [model_tag(Place), f"testapp.place:{restaurant.pk}", instance_tag(restaurant)]
    for tag in tags:
        cache.set(tag, 1, tags=[tag])
    restaurant.serves_pizza = True
    restaurant.save()  # post_save is sent for Restaurant only
    assert cache.get_many(tags) == {}


def test_bare_class_decorator_gives_the_default_rule():
    article = Article.objects.create(title="a")
    cache.set("article", 1, tags=[instance_tag(article)])
    cache.set("articles", 1, tags=[model_tag(Article)])
    article.save()
    assert cache.get_many(["article", "articles"]) == {}


def test_class_decorator_with_callable_key_and_fixed_tag():
    page = Page.objects.create(slug="about")
    cache.set("page-by-slug:about", "old")
    cache.set("page-by-slug:home", "other page")
    cache.set("nav", 1, tags=["pages"])
    cache.set("page", 1, tags=[instance_tag(page)])  # explicit rules replace the default
    page.body = "new"
    page.save()
    assert cache.get("page-by-slug:about") is None and cache.get("nav") is None
    assert cache.get("page-by-slug:home") == "other page"
    assert cache.get("page") == 1


def test_invalidate_on_by_label_returns_a_decorator():
    decorate = invalidate_on("testapp.Widget", tags=["widgets"])
    assert decorate(Widget) is Widget  # the same rule again: invalidated once, not twice
    widget = Widget.objects.create()
    cache.set("w", 1, tags=["widgets"])
    widget.save()
    assert cache.get("w") is None


# Many-to-many, both sides ----------------------------------------------------------------------


@pytest.fixture
def fruit():
    return Category.objects.create(name="fruit")


def fill(product, category):
    cache_product(product)
    cache.set("category", 1, tags=[f"category:{category.pk}"])
    other.set("list", 1, tags=["product_list"])


def assert_both_sides_invalidated(product):
    assert cache.get(f"product:{product.pk}") is None
    assert cache.get("category") is None
    assert other.get("list") is None


def change(manager, action, obj):
    if action == "set":
        manager.set([])
    elif action == "clear":
        manager.clear()
    else:
        getattr(manager, action)(obj)


@pytest.mark.parametrize("action", ["add", "remove", "clear", "set"])
def test_m2m_change_from_the_forward_side(apple, fruit, action):
    if action != "add":
        apple.categories.add(fruit)
    fill(apple, fruit)
    change(apple.categories, action, fruit)
    assert_both_sides_invalidated(apple)


@pytest.mark.parametrize("action", ["add", "remove", "clear"])
def test_m2m_change_from_the_reverse_side(apple, banana, fruit, action):
    if action != "add":
        fruit.products.add(apple)
    fill(apple, fruit)
    cache.set("banana", 1, tags=[instance_tag(banana)])
    change(fruit.products, action, apple)
    assert_both_sides_invalidated(apple)
    assert cache.get("banana") == 1  # banana was never linked to fruit


# Transactions ----------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_commit_invalidates_at_once_and_again_on_commit(apple):
    key = cache_product(apple)
    with transaction.atomic():
        apple.price = Decimal("2.00")
        apple.save()
        assert cache.get(key) is None  # the writing thread never reads its stale entry
        # Meanwhile another request, not seeing the uncommitted row, caches the old price.
        cache.set(key, "1.20", tags=[instance_tag(apple)])
        assert cache.get(key) == "1.20"
    assert cache.get(key) is None


@pytest.mark.django_db(transaction=True)
def test_rollback_leaves_no_entry_computed_from_the_rolled_back_write(apple):
    def price():
        return cache.get_or_set(
            "price", lambda: str(Product.objects.get(pk=apple.pk).price), tags=[instance_tag(apple)]
        )

    with pytest.raises(RuntimeError), transaction.atomic():
        apple.price = Decimal("9.99")
        apple.save()
        assert price() == "9.99"  # computed from the uncommitted row
        raise RuntimeError("roll back")
    assert cache.get("price") is None
    assert price() == "1.20"


@pytest.mark.django_db(transaction=True)
def test_savepoint_rollback_inside_a_committed_transaction(apple, banana):
    with transaction.atomic():
        banana.save()
        cache.set("banana", 1, tags=[instance_tag(banana)])  # filled after banana's write
        try:
            with transaction.atomic():
                apple.price = Decimal("9.99")
                apple.save()
                cache_product(apple)
                raise RuntimeError
        except RuntimeError:
            pass
        assert cache.get(f"product:{apple.pk}") is None  # gone when the savepoint rolled back
        assert cache.get("banana") == 1
    assert cache.get("banana") is None  # banana's invalidation ran again on commit


def test_on_commit_callbacks_are_scheduled(apple, django_capture_on_commit_callbacks):
    key = cache_product(apple)
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        apple.save()
        cache_product(apple)  # refilled inside the transaction
    assert len(callbacks) == 2  # one per cache: "default" and "other"
    assert cache.get(key) is None


@pytest.mark.django_db(transaction=True)
def test_autocommit_invalidates_once_and_transactions_again_at_the_end(apple, caplog):
    caplog.set_level(logging.DEBUG, logger="django_rustcache")

    def whens():
        found = [r.rustcache["when"] for r in caplog.records if hasattr(r, "rustcache")]
        caplog.clear()
        return found

    apple.save()
    assert whens() == ["now", "now"]  # "default" and "other", nothing to repeat
    with transaction.atomic():
        apple.save()
    assert whens() == ["now", "now", "commit", "commit"]
    with pytest.raises(RuntimeError), transaction.atomic():
        apple.save()
        raise RuntimeError
    assert whens() == ["now", "now", "rollback", "rollback"]


# Writes that send no signal ----------------------------------------------------------------------


def test_update_through_the_mixin(apple, banana):
    key_a = cache_product(apple)
    cache.set("banana", "0.50", tags=[instance_tag(banana)])
    cache.set("products", 1, tags=[model_tag(Product)])
    other.set("list", 1, tags=["product_list"])
    assert Product.objects.filter(pk=apple.pk).update(price=Decimal("3")) == 1
    assert cache.get(key_a) is None and cache.get("products") is None
    assert other.get("list") is None
    assert cache.get("banana") == "0.50"  # the update did not touch banana


def test_bulk_update_through_the_mixin(apple, banana, caplog):
    caplog.set_level(logging.DEBUG, logger="django_rustcache")
    keys = [cache_product(apple), cache_product(banana)]
    other.set("list", 1, tags=["product_list"])
    apple.price, banana.price = Decimal("1"), Decimal("2")
    assert Product.objects.bulk_update([apple, banana], ["price"]) == 2
    assert cache.get_many(keys) == {} and other.get("list") is None
    logged = [r.rustcache for r in caplog.records if hasattr(r, "rustcache")]
    assert [(r["signal"], r["pk"]) for r in logged] == [
        ("bulk_update", [apple.pk, banana.pk])
    ] * 2  # "default" and "other"; Django's inner update() does not invalidate again


def test_bulk_create_and_delete_through_the_mixin(apple):
    cache.set("products", 1, tags=[model_tag(Product)])
    Product.objects.bulk_create([Product(name="cherry", price=Decimal("2.50"))])
    assert cache.get("products") is None
    cache.set("products", 1, tags=[model_tag(Product)])
    Product.objects.filter(name="cherry").delete()
    assert cache.get("products") is None


def test_plain_update_without_the_mixin_is_not_seen_but_invalidate_model_is():
    page = Page.objects.create(slug="p")
    cache.set("nav", 1, tags=["pages"])
    cache.set("pages", 1, tags=[model_tag(Page)])
    cache.set(f"page-by-slug:{page.slug}", 1)
    Page.objects.update(body="x")  # a plain manager: no signal, nothing invalidated
    assert cache.get("nav") == 1
    invalidate_model(Page)
    assert cache.get("nav") is None and cache.get("pages") is None
    assert cache.get("page-by-slug:p") == 1  # callable keys need an instance


# Logs and signals -------------------------------------------------------------------------------


def test_invalidations_are_logged_with_tags_model_pk_and_signal(apple, caplog):
    caplog.set_level(logging.DEBUG, logger="django_rustcache")
    apple.save()
    records = [r for r in caplog.records if hasattr(r, "rustcache")]
    default, extra = (r.rustcache for r in records if r.rustcache["when"] == "now")
    assert default["tags"] == ["testapp.product", f"testapp.product:{apple.pk}"]
    assert (default["model"], default["pk"], default["signal"]) == (
        "testapp.product",
        apple.pk,
        "post_save",
    )
    assert extra["tags"] == ["product_list"] and extra["keys"] == ["product-count"]
    assert f"pk={apple.pk} signal=post_save" in caplog.text
    assert "keys=['product-count'] cache=other" in caplog.text


def test_m2m_and_update_are_logged(apple, fruit, caplog):
    caplog.set_level(logging.DEBUG, logger="django_rustcache")
    apple.categories.add(fruit)
    Product.objects.filter(pk=apple.pk).update(price=1)
    signals = {r.rustcache["signal"] for r in caplog.records if hasattr(r, "rustcache")}
    assert signals == {"m2m_changed", "update"}


def test_tags_invalidated_signal_is_sent(apple):
    seen = []

    def receiver(sender, cache, tags, count, **kwargs):
        seen.append((cache is caches["default"], tags, count))

    tags_invalidated.connect(receiver)
    try:
        cache_product(apple)
        apple.save()
    finally:
        tags_invalidated.disconnect(receiver)
    assert (True, ("testapp.product", f"testapp.product:{apple.pk}"), 1) in seen


# RUSTCACHE_AUTO_INVALIDATE -----------------------------------------------------------------------


def test_auto_invalidate_covers_models_without_rules(settings):
    supplier = Supplier.objects.create(name="s")
    cache.set("supplier", 1, tags=[instance_tag(supplier)])
    supplier.save()
    assert cache.get("supplier") == 1  # off by default
    settings.RUSTCACHE_AUTO_INVALIDATE = True
    supplier.save()
    assert cache.get("supplier") is None


def test_auto_invalidate_opt_out_and_alias(settings):
    settings.RUSTCACHE_AUTO_INVALIDATE = "other"
    settings.RUSTCACHE_AUTO_INVALIDATE_EXCLUDE = ["testapp.AuditLog"]
    log, supplier = AuditLog.objects.create(message="m"), Supplier.objects.create(name="s")
    other.set("log", 1, tags=[model_tag(AuditLog)])
    other.set("supplier", 1, tags=[model_tag(Supplier)])
    log.save()
    supplier.save()
    assert other.get("log") == 1 and other.get("supplier") is None


def test_auto_invalidate_excludes_whole_apps(settings):
    settings.RUSTCACHE_AUTO_INVALIDATE = True
    settings.RUSTCACHE_AUTO_INVALIDATE_EXCLUDE = ["testapp"]
    supplier = Supplier.objects.create(name="s")
    cache.set("supplier", 1, tags=[model_tag(Supplier)])
    supplier.save()
    assert cache.get("supplier") == 1


# Race guard ------------------------------------------------------------------------------------


def test_get_or_set_fill_overlapping_an_invalidation_is_not_stored(apple):
    computing, invalidated = threading.Event(), threading.Event()
    results = []

    def slow_fill():
        computing.set()
        assert invalidated.wait(5)
        return "computed before the write"

    thread = threading.Thread(
        target=lambda: results.append(cache.get_or_set("k", slow_fill, tags=[instance_tag(apple)]))
    )
    thread.start()
    assert computing.wait(5)
    Product.objects.filter(pk=apple.pk).update(price=5)  # invalidates from this thread
    invalidated.set()
    thread.join(5)
    assert results == ["computed before the write"]  # returned to its caller...
    assert cache.get("k") is None  # ...but not stored


class PublicTagsOnlyCache(LocMemCache):
    """A third-party backend that offers ``invalidate_tags`` but not our private quiet variant
    (the system check accepts any backend with ``invalidate_tags``)."""

    calls: list[list[str]] = []

    def invalidate_tags(self, tags):
        PublicTagsOnlyCache.calls.append(list(tags))
        return 0


def test_rules_work_with_a_backend_that_has_only_a_public_invalidate_tags(
    settings, django_capture_on_commit_callbacks
):
    settings.CACHES = {
        **settings.CACHES,
        "public-tags": {"BACKEND": "tests.test_invalidation.PublicTagsOnlyCache"},
    }
    supplier = Supplier.objects.create(name="s")  # before the rule exists: nothing to run
    settings.RUSTCACHE_AUTO_INVALIDATE = "public-tags"
    PublicTagsOnlyCache.calls.clear()
    # Run the on-commit invalidation inside the test, while the alias still exists.
    with django_capture_on_commit_callbacks(execute=True):
        supplier.save()
    assert len(PublicTagsOnlyCache.calls) == 2, "now and at commit"
    assert all(model_tag(Supplier) in tags for tags in PublicTagsOnlyCache.calls)
