"""``{% cache_tagged timeout name [vary_on ...] tags="a,b" [using="alias"] %}``.

Django's ``{% cache %}`` plus tags: the fragment is stored with the tags (a comma-separated string
or a list, from a literal or a variable), and is not stored if one of them was invalidated while
it rendered. A miss renders through the cache's ``get_or_set``, so concurrent misses of one
fragment render it once (across processes too, with NearCache's ``STAMPEDE_LOCK``).
"""

from __future__ import annotations

import functools
from typing import Any

from django.core.cache import InvalidCacheBackendError, caches
from django.core.cache.utils import make_template_fragment_key
from django.template import (
    Context,
    Library,
    Node,
    NodeList,
    TemplateSyntaxError,
    VariableDoesNotExist,
)
from django.template.base import FilterExpression, Parser, Token

register = Library()


def _split_tags(value: Any) -> list[str]:
    """``"a, b"`` or ``["a", "b"]`` (or None) as a list of tags."""
    if not value:
        return []
    if isinstance(value, str):
        value = value.split(",")
    return [tag for tag in (str(t).strip() for t in value) if tag]


class TaggedCacheNode(Node):
    """Renders its contents once per timeout and vary-on values, storing them with tags."""

    def __init__(
        self,
        nodelist: NodeList,
        expire_time: FilterExpression,
        fragment_name: str,
        vary_on: list[FilterExpression],
        tags: FilterExpression | None,
        cache_name: FilterExpression | None,
    ) -> None:
        self.nodelist, self.expire_time, self.fragment_name = nodelist, expire_time, fragment_name
        self.vary_on, self.tags, self.cache_name = vary_on, tags, cache_name

    def _resolve(self, var: FilterExpression, context: Context) -> Any:
        try:
            return var.resolve(context)
        except VariableDoesNotExist:
            raise TemplateSyntaxError(
                f'"cache_tagged" tag got an unknown variable: {var.var!r}'
            ) from None

    def _timeout(self, context: Context) -> int | None:
        expire_time = self._resolve(self.expire_time, context)
        if expire_time is None:
            return None
        try:
            return int(expire_time)
        except (ValueError, TypeError):
            raise TemplateSyntaxError(
                f'"cache_tagged" tag got a non-integer timeout value: {expire_time!r}'
            ) from None

    def _cache(self, context: Context) -> Any:
        if self.cache_name is None:
            try:
                return caches["template_fragments"]
            except InvalidCacheBackendError:
                return caches["default"]
        name = self._resolve(self.cache_name, context)
        try:
            return caches[name]
        except InvalidCacheBackendError:
            raise TemplateSyntaxError(
                f"Invalid cache name specified for cache_tagged tag: {name!r}"
            ) from None

    def render(self, context: Context) -> str:
        timeout = self._timeout(context)
        cache = self._cache(context)
        vary_on = [var.resolve(context) for var in self.vary_on]
        key = make_template_fragment_key(self.fragment_name, vary_on)
        value = cache.get(key)
        if value is None:
            # A miss renders through get_or_set, as @cached fills: one render per process at a
            # time (single-flight), one across processes with NearCache's STAMPEDE_LOCK, and the
            # tags snapshotted before rendering (a fragment rendered while one of them was
            # invalidated is returned but not stored).
            tags = _split_tags(self._resolve(self.tags, context)) if self.tags else []
            render = functools.partial(self.nodelist.render, context)
            if tags:
                return cache.get_or_set(key, render, timeout, tags=tags)
            return cache.get_or_set(key, render, timeout)
        return value


@register.tag("cache_tagged")
def do_cache_tagged(parser: Parser, token: Token) -> TaggedCacheNode:
    """Cache a fragment like ``{% cache %}``, with ``tags="a,b"`` (and optional ``using=``)::

    {% load rustcache %}
    {% cache_tagged 300 sidebar request.user.pk tags="shop.product,menu" %}
        .. expensive ..
    {% endcache_tagged %}
    """
    nodelist = parser.parse(("endcache_tagged",))
    parser.delete_first_token()
    bits = token.split_contents()
    options: dict[str, FilterExpression] = {}
    while len(bits) > 3 and bits[-1].startswith(("tags=", "using=")):
        name, _, value = bits.pop().partition("=")
        if name in options:
            raise TemplateSyntaxError(f"'cache_tagged' tag received {name}= twice.")
        options[name] = parser.compile_filter(value)
    if len(bits) < 3:
        raise TemplateSyntaxError(f"'{bits[0]}' tag requires at least 2 arguments.")
    return TaggedCacheNode(
        nodelist,
        parser.compile_filter(bits[1]),
        bits[2],  # the fragment name is not a variable, as in {% cache %}
        [parser.compile_filter(bit) for bit in bits[3:]],
        options.get("tags"),
        options.get("using"),
    )
