"""django-rustcache: a Django cache backend whose store is written in Rust.

Point ``CACHES["default"]["BACKEND"]`` at ``"django_rustcache.RustCache"`` (one process), or at
``"django_rustcache.NearCache"`` (Redis/Valkey as the truth, the Rust store as a near cache).
"""

from django_rustcache.backend import RustCache
from django_rustcache.near import NearCache

__all__ = ["NearCache", "RustCache"]
__version__ = "0.1.0"
