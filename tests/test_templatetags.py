"""``{% cache_tagged %}``: Django's ``{% cache %}`` plus tags."""

from decimal import Decimal

import pytest
from django.core.cache import cache, caches
from django.core.cache.utils import make_template_fragment_key
from django.template import Context, Template, TemplateSyntaxError

from tests.testapp.models import Product


def render(source, **context):
    return Template("{% load rustcache %}" + source).render(Context(context))


def counter():
    """A context value counting how often the fragment body really rendered."""
    count = {"n": 0}

    def bump():
        count["n"] += 1
        return count["n"]

    return bump


LIST = (
    '{% cache_tagged 300 products tags="testapp.product,menu" %}'
    "{% for p in products %}{{ p.name }} {{ p.price }};{% endfor %}"
    "{% endcache_tagged %}"
)


@pytest.mark.django_db
def test_renders_fresh_output_after_a_change():
    Product.objects.create(name="apple", price=Decimal("1.20"))
    banana = Product.objects.create(name="banana", price=Decimal("0.50"))
    assert render(LIST, products=Product.objects.all()) == "apple 1.20;banana 0.50;"
    banana.price = Decimal("0.60")
    # Until the save, the fragment is served from the cache, query and all.
    assert render(LIST, products=Product.objects.all()) == "apple 1.20;banana 0.50;"
    banana.save()
    assert render(LIST, products=Product.objects.all()) == "apple 1.20;banana 0.60;"


def test_caches_like_the_cache_tag_with_the_same_key():
    bump = counter()
    source = "{% cache_tagged 300 frag a b tags='t' %}{{ bump }}{% endcache_tagged %}"
    assert render(source, bump=bump, a=1, b=2) == "1"
    assert render(source, bump=bump, a=1, b=2) == "1"
    assert render(source, bump=bump, a=1, b=3) == "2"  # vary_on makes another entry
    assert cache.get(make_template_fragment_key("frag", [1, 2])) == "1"
    assert 290 < cache.ttl(make_template_fragment_key("frag", [1, 2])) <= 300


def test_tags_from_a_variable_and_a_literal_list():
    bump = counter()
    source = "{% cache_tagged 300 f tags=fragment_tags %}{{ bump }}{% endcache_tagged %}"
    assert render(source, bump=bump, fragment_tags=["x", "y"]) == "1"
    cache.invalidate_tags(["y"])
    assert render(source, bump=bump, fragment_tags=["x", "y"]) == "2"
    source = '{% cache_tagged 300 g tags="a, b" %}{{ bump }}{% endcache_tagged %}'
    assert render(source, bump=bump) == "3"
    cache.invalidate_tags(["b"])
    assert render(source, bump=bump) == "4"
    cache.invalidate_tags(["x", "c"])
    assert render(source, bump=bump) == "4"


def test_using_another_cache_and_no_timeout():
    bump = counter()
    source = '{% cache_tagged None f using="other" tags="t" %}{{ bump }}{% endcache_tagged %}'
    assert render(source, bump=bump) == "1"
    key = make_template_fragment_key("f")
    assert caches["other"].get(key) == "1" and cache.get(key) is None
    assert caches["other"].ttl(key) is None
    cache.invalidate_tags(["t"])  # tags are per cache
    assert render(source, bump=bump) == "1"
    caches["other"].invalidate_tags(["t"])
    assert render(source, bump=bump) == "2"


def test_without_tags_it_is_the_cache_tag():
    bump = counter()
    source = "{% cache_tagged 300 plain %}{{ bump }}{% endcache_tagged %}"
    assert render(source, bump=bump) == render(source, bump=bump) == "1"


def test_fragment_rendered_during_an_invalidation_is_not_stored():
    bump = counter()

    def write():
        cache.invalidate_tags(["t"])
        return ""

    source = '{% cache_tagged 300 f tags="t" %}{{ write }}{{ bump }}{% endcache_tagged %}'
    assert render(source, bump=bump, write=write) == "1"
    assert cache.get(make_template_fragment_key("f")) is None
    assert render(source, bump=bump, write=write) == "2"


@pytest.mark.parametrize(
    "source, message",
    [
        ("{% cache_tagged 300 %}{% endcache_tagged %}", "at least 2 arguments"),
        ("{% cache_tagged 'x' f %}{% endcache_tagged %}", "non-integer timeout"),
        (
            "{% cache_tagged missing f %}{% endcache_tagged %}",
            "non-integer timeout",
        ),  # as {% cache %}
        ('{% cache_tagged 1 f using="nope" %}{% endcache_tagged %}', "Invalid cache name"),
        ('{% cache_tagged 1 f tags="a" tags="b" %}{% endcache_tagged %}', "twice"),
    ],
)
def test_errors_match_the_cache_tag(source, message):
    with pytest.raises(TemplateSyntaxError, match=message):
        render(source)
