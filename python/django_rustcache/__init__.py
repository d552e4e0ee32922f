"""django-rustcache: a Django cache backend whose store is written in Rust.

Point ``CACHES["default"]["BACKEND"]`` at ``"django_rustcache.RustCache"``.
"""

from django_rustcache.backend import RustCache

__all__ = ["RustCache"]
__version__ = "0.1.0"
