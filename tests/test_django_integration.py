"""RustCache under Django's own users of the cache: cache_page, the cache middleware, the
``{% cache %}`` tag, the cached session backend, and counters built on add/incr."""

from __future__ import annotations

import itertools

import pytest
from django.contrib.sessions.backends.cache import SessionStore
from django.core.cache import cache
from django.http import HttpRequest, HttpResponse
from django.template import engines
from django.test import RequestFactory, override_settings
from django.urls import path
from django.views.decorators.cache import cache_page

calls = itertools.count()


@cache_page(60)
def counted_view(request: HttpRequest) -> HttpResponse:
    return HttpResponse(f"call {next(calls)}")


def uncached_view(request: HttpRequest) -> HttpResponse:
    return HttpResponse(f"call {next(calls)}")


urlpatterns = [path("cached/", counted_view), path("plain/", uncached_view)]


@pytest.mark.urls(__name__)
def test_cache_page_serves_the_stored_response(client):
    first = client.get("/cached/").content
    assert client.get("/cached/").content == first
    assert client.get("/cached/?page=2").content != first
    cache.clear()
    assert client.get("/cached/").content != first


@pytest.mark.urls(__name__)
@override_settings(
    MIDDLEWARE=[
        "django.middleware.cache.UpdateCacheMiddleware",
        "django.middleware.common.CommonMiddleware",
        "django.middleware.cache.FetchFromCacheMiddleware",
    ],
    CACHE_MIDDLEWARE_SECONDS=30,
    CACHE_MIDDLEWARE_KEY_PREFIX="site",
)
def test_site_wide_cache_middleware(client):
    first = client.get("/plain/")
    assert first.has_header("Expires")
    again = client.get("/plain/")
    assert again.content == first.content
    assert client.post("/plain/").content != first.content  # only GET/HEAD are cached


def test_template_fragment_cache_tag():
    template = engines["django"].from_string(
        "{% load cache %}{% cache 60 frag who %}{{ value }}{% endcache %}"
    )
    assert template.render({"value": "one", "who": "a"}) == "one"
    assert template.render({"value": "two", "who": "a"}) == "one"
    assert template.render({"value": "two", "who": "b"}) == "two"


@override_settings(SESSION_ENGINE="django.contrib.sessions.backends.cache")
def test_cached_session_backend_round_trip():
    session = SessionStore()
    session["cart"] = [1, 2]
    session.save()
    loaded = SessionStore(session_key=session.session_key)
    assert loaded["cart"] == [1, 2]
    loaded.flush()
    assert SessionStore(session_key=session.session_key).get("cart") is None


@pytest.mark.urls(__name__)
@override_settings(SESSION_ENGINE="django.contrib.sessions.backends.cache")
def test_session_middleware_with_cache_engine(rf: RequestFactory):
    from django.contrib.sessions.middleware import SessionMiddleware

    def view(request: HttpRequest) -> HttpResponse:
        request.session["n"] = request.session.get("n", 0) + 1
        return HttpResponse(str(request.session["n"]))

    middleware = SessionMiddleware(view)
    response = middleware(rf.get("/"))
    cookie = response.cookies["sessionid"].value
    request = rf.get("/")
    request.COOKIES["sessionid"] = cookie
    assert middleware(request).content == b"2"


def allow(ip: str, limit: int = 5) -> bool:
    """A fixed-window rate limiter as sites write it: add the counter, then incr it."""
    key = f"rate:{ip}"
    if cache.add(key, 1, timeout=60):
        return True
    return cache.incr(key) <= limit


def test_rate_limiting_counter_under_threads():
    import threading

    allowed = []
    lock = threading.Lock()

    def hit() -> None:
        for _ in range(50):
            ok = allow("10.0.0.1", limit=100)
            with lock:
                allowed.append(ok)

    threads = [threading.Thread(target=hit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert allowed.count(True) == 100
    assert cache.get("rate:10.0.0.1") == 400
    assert 0 < cache.ttl("rate:10.0.0.1") <= 60
