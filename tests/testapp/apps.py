"""Registers the test rules the way a project would: in ``AppConfig.ready()``."""

from django.apps import AppConfig


class TestAppConfig(AppConfig):
    name = "tests.testapp"
    label = "testapp"

    def ready(self) -> None:
        from django_rustcache.invalidation import invalidate_on

        product = self.get_model("Product")
        invalidate_on(product)
        invalidate_on(product, tags=["product_list"], keys=["product-count"], cache="other")
        invalidate_on("testapp.Category", tags=lambda category: f"category:{category.pk}")
