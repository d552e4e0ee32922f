"""The ``django_rustcache`` app: applies ``RUSTCACHE_AUTO_INVALIDATE`` once models are loaded."""

from django.apps import AppConfig


class RustCacheConfig(AppConfig):
    """Add ``"django_rustcache"`` to INSTALLED_APPS for the template tags and auto-invalidation."""

    name = "django_rustcache"
    verbose_name = "RustCache"

    def ready(self) -> None:
        from django.core import checks

        from django_rustcache.checks import check_auto_invalidate
        from django_rustcache.invalidation import configure_auto_invalidation

        checks.register(check_auto_invalidate)
        configure_auto_invalidation()
