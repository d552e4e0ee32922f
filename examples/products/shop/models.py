"""A product with a price (the seeds' apple 1.2, banana 0.5 and cherry 2.5)."""

from django.db import models

from django_rustcache.invalidation import InvalidatingManager


class Product(models.Model):
    name = models.CharField(max_length=50, unique=True)
    price = models.DecimalField(max_digits=8, decimal_places=2)

    # QuerySet.update() and bulk_update() send no signal; this manager invalidates for them.
    objects = InvalidatingManager()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name}: {self.price}"
