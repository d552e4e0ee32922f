"""What a new user meets following the README: a setting that cannot take effect is loud (a
warning from the backend without the app, a system check with it), and each model invalidation
logs one line.
"""

from __future__ import annotations

import logging
import uuid
import warnings

import pytest
from django.core import checks

from django_rustcache import RustCache
from django_rustcache.checks import RustCacheSettingWarning, check_auto_invalidate
from tests.testapp.models import Product

WITHOUT_APP = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",
    "tests.testapp",
]


def _made_warnings() -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        RustCache(f"newcomer-{uuid.uuid4().hex}", {})
    return [w for w in caught if issubclass(w.category, RustCacheSettingWarning)]


def test_auto_invalidate_without_the_app_installed_warns_when_a_cache_is_made(settings):
    settings.INSTALLED_APPS = WITHOUT_APP
    settings.RUSTCACHE_AUTO_INVALIDATE = True
    (warning,) = _made_warnings()
    assert "RUSTCACHE_AUTO_INVALIDATE" in str(warning.message)
    assert "INSTALLED_APPS" in str(warning.message)


def test_the_exclude_list_alone_without_the_app_warns_too(settings):
    settings.INSTALLED_APPS = WITHOUT_APP
    settings.RUSTCACHE_AUTO_INVALIDATE_EXCLUDE = ["sessions"]
    assert len(_made_warnings()) == 1


def test_no_warning_with_the_app_installed_or_without_the_setting(settings):
    settings.RUSTCACHE_AUTO_INVALIDATE = True
    assert _made_warnings() == []
    settings.INSTALLED_APPS = WITHOUT_APP
    settings.RUSTCACHE_AUTO_INVALIDATE = False
    assert _made_warnings() == []


def test_the_system_check_is_registered_and_silent_on_a_sound_configuration(settings):
    settings.RUSTCACHE_AUTO_INVALIDATE = True
    settings.RUSTCACHE_AUTO_INVALIDATE_EXCLUDE = ["sessions", "testapp.Product"]
    assert check_auto_invalidate in checks.registry.registry.get_checks()
    assert checks.run_checks() == []


@pytest.mark.parametrize(
    ("config", "check_id"),
    [
        ({"RUSTCACHE_AUTO_INVALIDATE": 1}, "django_rustcache.E001"),
        ({"RUSTCACHE_AUTO_INVALIDATE": "nowhere"}, "django_rustcache.E002"),
        ({"RUSTCACHE_AUTO_INVALIDATE": "locmem"}, "django_rustcache.E003"),
        (
            {"RUSTCACHE_AUTO_INVALIDATE": True, "RUSTCACHE_AUTO_INVALIDATE_EXCLUDE": "sessions"},
            "django_rustcache.E004",
        ),
        ({"RUSTCACHE_AUTO_INVALIDATE_EXCLUDE": ["sessions"]}, "django_rustcache.W001"),
        (
            {"RUSTCACHE_AUTO_INVALIDATE": True, "RUSTCACHE_AUTO_INVALIDATE_EXCLUDE": ["sesions"]},
            "django_rustcache.W002",
        ),
        (
            {
                "RUSTCACHE_AUTO_INVALIDATE": True,
                "RUSTCACHE_AUTO_INVALIDATE_EXCLUDE": ["testapp.NoSuchModel"],
            },
            "django_rustcache.W002",
        ),
    ],
)
def test_a_setting_that_cannot_take_effect_fails_the_system_check(settings, config, check_id):
    settings.CACHES = {
        **settings.CACHES,
        "locmem": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    }
    for name, value in config.items():
        setattr(settings, name, value)
    assert [m.id for m in checks.run_checks()] == [check_id]


@pytest.mark.django_db
def test_a_model_invalidation_logs_one_line_per_event(caplog):
    caplog.set_level(logging.DEBUG, logger="django_rustcache")
    product = Product.objects.create(name="pear", price=1)
    caplog.clear()
    product.save()
    # Product has two rules: one on "default", one on "other" (see testapp/apps.py).
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert all(line.startswith("invalidated tags=[") for line in lines)
    assert sorted(line.split(" cache=")[1].split()[0] for line in lines) == ["default", "other"]


def test_a_direct_invalidate_tags_call_still_logs_its_line(caplog):
    caplog.set_level(logging.DEBUG, logger="django_rustcache")
    from django.core.cache import cache

    cache.invalidate_tags(["menu"])
    assert [r.getMessage() for r in caplog.records] == [
        "invalidated tags menu in 'tests-default': 0 entries"
    ]
