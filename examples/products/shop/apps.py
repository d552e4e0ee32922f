"""Where the invalidation rule lives: ``invalidate_on`` in ``ready()``."""

from django.apps import AppConfig


class ShopConfig(AppConfig):
    name = "shop"

    def ready(self) -> None:
        from django_rustcache.invalidation import invalidate_on

        # Saving or deleting a product invalidates "shop.product" and "shop.product:<pk>".
        invalidate_on(self.get_model("Product"))
