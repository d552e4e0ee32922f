"""A one-view Django site for the end-to-end benchmark, served by gunicorn.

``BENCH_CACHE`` picks the cache backend (``RustCache``, ``LocMemCache`` or ``RedisCache``; the
latter needs ``BENCH_REDIS_URL``). ``/page/`` renders a 20 KB page behind ``cache_page``, so
after the first request each request is served from the cache: two ``get`` calls (the header
list and the page) and the unpickling of an ``HttpResponse``.
"""

from __future__ import annotations

import os

import django
from django.conf import settings

BACKENDS = {
    "RustCache": "django_rustcache.RustCache",
    "LocMemCache": "django.core.cache.backends.locmem.LocMemCache",
    "RedisCache": "django.core.cache.backends.redis.RedisCache",
}

_name = os.environ.get("BENCH_CACHE", "RustCache")
_cache: dict[str, object] = {"BACKEND": BACKENDS[_name], "TIMEOUT": 3600}
if _name == "RedisCache":
    _cache["LOCATION"] = os.environ["BENCH_REDIS_URL"]

settings.configure(
    DEBUG=False,
    SECRET_KEY="benchmark-only",
    ALLOWED_HOSTS=["127.0.0.1", "localhost"],
    ROOT_URLCONF=__name__,
    CACHES={"default": _cache},
    INSTALLED_APPS=[],
    MIDDLEWARE=[],
    USE_TZ=True,
)
django.setup()

from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.http import HttpRequest, HttpResponse  # noqa: E402
from django.urls import path  # noqa: E402
from django.views.decorators.cache import cache_page  # noqa: E402

_ROWS = "".join(
    f'<li class="item"><a href="/products/{i}/">Product {i}</a> <span>{i * 1.25:.2f}</span></li>\n'
    for i in range(260)
)
PAGE = f"<!doctype html><html><body><ul>{_ROWS}</ul></body></html>"


@cache_page(3600)
def page(request: HttpRequest) -> HttpResponse:
    """The cached page (about 20 KB)."""
    return HttpResponse(PAGE, content_type="text/html; charset=utf-8")


urlpatterns = [path("page/", page)]
application = get_wsgi_application()
