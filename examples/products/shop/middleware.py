"""For coherence_demo.py: which worker served a response, and where the page came from."""

import os
from collections.abc import Callable

from django.core.cache import cache
from django.http import HttpRequest, HttpResponse

from .views import RENDERS


def served_by(get_response: Callable[[HttpRequest], HttpResponse]) -> Callable:
    """Adds ``X-Served-By`` (this process's pid) and, to a GET, ``X-Page-Source``: ``view`` (the
    view ran), ``redis`` (a NearCache read went to Redis) or ``memory`` (this process's store)."""

    def middleware(request: HttpRequest) -> HttpResponse:
        renders, before = sum(RENDERS.values()), cache.stats()
        response = get_response(request)
        after = cache.stats()
        response["X-Served-By"] = str(os.getpid())
        if request.method == "GET":
            if sum(RENDERS.values()) > renders:
                source = "view"
            elif after.get("l2_hits", 0) > before.get("l2_hits", 0):
                source = "redis"  # NearCache only: RustCache's stats have no l2_hits
            else:
                source = "memory"
            response["X-Page-Source"] = source
        return response

    return middleware
