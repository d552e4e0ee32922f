"""Models for the invalidation tests: rules are registered in ``apps.py`` and by decorator here."""

from django.db import models

from django_rustcache.invalidation import InvalidatingManager, invalidate_on


class Category(models.Model):
    """The reverse side of ``Product.categories``; invalidates ``category:<pk>`` by a callable."""

    name = models.CharField(max_length=50)

    def __str__(self) -> str:
        return self.name


class Product(models.Model):
    """Default rule (model + instance tags) and a ``product_list`` rule, set up in apps.py."""

    name = models.CharField(max_length=50, unique=True)
    price = models.DecimalField(max_digits=8, decimal_places=2)
    categories = models.ManyToManyField(Category, related_name="products", blank=True)

    objects = InvalidatingManager()

    def __str__(self) -> str:
        return self.name


class DiscountedProduct(Product):
    """A proxy: its saves go through the rules of ``Product``."""

    class Meta:
        proxy = True


@invalidate_on
class Article(models.Model):
    """The seeds' version-based keys: ``save`` bumps ``version``."""

    title = models.CharField(max_length=100)
    version = models.IntegerField(default=0)

    def save(self, *args, **kwargs) -> None:
        self.version += 1
        super().save(*args, **kwargs)


@invalidate_on(keys=[lambda page: f"page-by-slug:{page.slug}"], tags="pages")
class Page(models.Model):
    """``updated_at`` versions its keys; a key rule and a fixed tag by class decorator."""

    slug = models.SlugField(unique=True)
    body = models.TextField(default="")
    updated_at = models.DateTimeField(auto_now=True)


class Supplier(models.Model):
    """No rule of its own: only ``RUSTCACHE_AUTO_INVALIDATE`` covers it."""

    name = models.CharField(max_length=50)


class AuditLog(models.Model):
    """No rule, and in the tests' ``RUSTCACHE_AUTO_INVALIDATE_EXCLUDE`` list."""

    message = models.CharField(max_length=100)


class Widget(models.Model):
    """Given a rule by a test, so no other test depends on it."""


@invalidate_on
class Place(models.Model):
    """A multi-table parent with the default rule: it covers ``Restaurant`` saves too."""

    name = models.CharField(max_length=50)


class Restaurant(Place):
    serves_pizza = models.BooleanField(default=False)
