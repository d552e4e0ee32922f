"""The pytest plugin: ``rustcache``, ``assert_invalidates``, and the ``pytest11`` entry point."""

from importlib.metadata import entry_points

import pytest
from django.core.cache import caches

from django_rustcache import RustCache
from django_rustcache.pytest_plugin import assert_invalidates

pytest_plugins = ["pytester"]


def test_registered_as_a_pytest11_entry_point():
    names = {ep.name: ep.value for ep in entry_points(group="pytest11")}
    assert names["django_rustcache"] == "django_rustcache.pytest_plugin"


def test_rustcache_fixture_is_the_empty_default_rustcache(rustcache):
    assert isinstance(rustcache, RustCache)
    assert rustcache is caches["default"]
    assert rustcache.keys() == []


@pytest.mark.rustcache(alias="other")
def test_rustcache_marker_picks_the_alias(rustcache):
    assert rustcache is caches["other"]


def test_assert_invalidates_passes_when_tags_and_keys_go(rustcache, assert_invalidates):
    rustcache.set("k", 1, tags=["t"])
    with assert_invalidates(tags=["t"], keys=["k"]) as record:
        rustcache.invalidate_tags(["t", "u"])
    assert record.tags == ["t", "u"]


def test_assert_invalidates_counts_deleted_keys(rustcache):
    rustcache.set("k", 1)
    with assert_invalidates(keys=["k"]):
        rustcache.delete("k")


def test_assert_invalidates_fails_when_a_tag_is_not_invalidated(rustcache):
    with pytest.raises(pytest.fail.Exception, match=r"tags not invalidated: \['t'\]"):
        with assert_invalidates(tags=["t"]):
            rustcache.invalidate_tags(["other-tag"])


def test_assert_invalidates_fails_when_a_key_survives(rustcache):
    rustcache.set("k", 1)
    with pytest.raises(pytest.fail.Exception, match=r"keys still cached: \['k'\]"):
        with assert_invalidates(keys=["k"]):
            pass


def test_assert_invalidates_needs_the_keys_cached_first(rustcache):
    with pytest.raises(pytest.fail.Exception, match="not cached before the block"):
        with assert_invalidates(keys=["k"]):
            pass


def test_assert_invalidates_watches_one_cache(rustcache):
    with pytest.raises(pytest.fail.Exception, match="tags not invalidated"):
        with assert_invalidates(tags=["t"], cache="default"):
            caches["other"].invalidate_tags(["t"])


@pytest.mark.django_db
def test_assert_invalidates_around_a_save(rustcache, assert_invalidates):
    from tests.testapp.models import Product

    product = Product.objects.create(name="apple", price=1)
    rustcache.set("page", "apple 1", tags=["testapp.product"])
    with assert_invalidates(
        tags=["testapp.product", f"testapp.product:{product.pk}"], keys=["page"]
    ):
        product.save()


def test_plugin_does_not_need_django_settings(pytester, monkeypatch):
    monkeypatch.delenv("DJANGO_SETTINGS_MODULE", raising=False)
    pytester.makepyfile(
        """
        def test_plain():
            assert 1 + 1 == 2

        def test_uses_rustcache(rustcache):
            raise AssertionError("not reached: skipped without settings")
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["plugins:*django-rustcache*", "*needs Django settings*"])


def test_plugin_in_a_django_project(pytester, monkeypatch):
    monkeypatch.setenv("DJANGO_SETTINGS_MODULE", "inner_settings")
    pytester.makepyfile(
        inner_settings="""
        CACHES = {"default": {"BACKEND": "django_rustcache.RustCache", "LOCATION": "inner"}}
        """,
        test_inner="""
        import pytest

        def test_fill(rustcache):
            rustcache.set("left-over", 1)

        def test_empty_again(rustcache):
            assert rustcache.get("left-over") is None

        def test_fails_when_nothing_is_invalidated(rustcache, assert_invalidates):
            with assert_invalidates(tags=["never"]):
                pass
        """,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*assert_invalidates: tags not invalidated: ?'never'?*"])
