"""Make a RustCache setting that cannot take effect loud, instead of silently doing nothing.

``RUSTCACHE_AUTO_INVALIDATE`` is applied by the ``django_rustcache`` app: without the app in
INSTALLED_APPS the backend warns (``warn_if_app_missing``); with it, Django's system checks
(``check_auto_invalidate``, registered in ``AppConfig.ready``) report values that cannot work.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

from django.apps import apps
from django.conf import settings
from django.core import checks
from django.utils.module_loading import import_string

#: The settings that only the ``django_rustcache`` app applies.
APP_SETTINGS = ("RUSTCACHE_AUTO_INVALIDATE", "RUSTCACHE_AUTO_INVALIDATE_EXCLUDE")


class RustCacheSettingWarning(RuntimeWarning):
    """A RustCache setting is set but cannot take effect."""


def warn_if_app_missing() -> None:
    """Warn when an app-only setting is set but ``django_rustcache`` is not in INSTALLED_APPS.

    Called when a backend is made; silent while the app registry is not ready (it cannot tell).
    """
    if not apps.ready:
        return
    named = [name for name in APP_SETTINGS if getattr(settings, name, None)]
    if named and not apps.is_installed("django_rustcache"):
        warnings.warn(
            f"{named[0]} is set but does nothing: add 'django_rustcache' to INSTALLED_APPS "
            "(it also provides {% load rustcache %}).",
            RustCacheSettingWarning,
            stacklevel=3,
        )


def check_auto_invalidate(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """System check: RUSTCACHE_AUTO_INVALIDATE names a RustCache alias; its exclude list is a
    list of installed app labels or ``app_label.Model`` names, and is set only with it."""
    errors: list[checks.CheckMessage] = []
    alias = getattr(settings, "RUSTCACHE_AUTO_INVALIDATE", False)
    exclude = getattr(settings, "RUSTCACHE_AUTO_INVALIDATE_EXCLUDE", ())
    if alias is not False and alias is not True and not isinstance(alias, str) and alias:
        errors.append(
            checks.Error(
                "RUSTCACHE_AUTO_INVALIDATE must be True, False or a cache alias (a str), "
                f"not {type(alias).__name__} {alias!r}.",
                id="django_rustcache.E001",
            )
        )
    elif alias:
        name = "default" if alias is True else alias
        backend = settings.CACHES.get(name, {}).get("BACKEND")
        if backend is None:
            errors.append(
                checks.Error(
                    f"RUSTCACHE_AUTO_INVALIDATE names the cache alias {name!r}, "
                    "which is not in CACHES.",
                    id="django_rustcache.E002",
                )
            )
        elif not hasattr(_backend_class(backend), "invalidate_tags"):
            errors.append(
                checks.Error(
                    f"RUSTCACHE_AUTO_INVALIDATE names the cache alias {name!r}, whose BACKEND "
                    f"{backend!r} has no tags to invalidate; use django_rustcache.RustCache.",
                    id="django_rustcache.E003",
                )
            )
    if isinstance(exclude, str) or not (
        isinstance(exclude, Iterable) and all(isinstance(label, str) for label in exclude)
    ):
        errors.append(
            checks.Error(
                "RUSTCACHE_AUTO_INVALIDATE_EXCLUDE must be a list of app labels or "
                f"'app_label.Model' names, not {exclude!r}.",
                id="django_rustcache.E004",
            )
        )
        return errors
    if exclude and not alias:
        errors.append(
            checks.Warning(
                "RUSTCACHE_AUTO_INVALIDATE_EXCLUDE is set but does nothing without "
                "RUSTCACHE_AUTO_INVALIDATE.",
                id="django_rustcache.W001",
            )
        )
    for label in exclude:
        if not _names_installed(label):
            errors.append(
                checks.Warning(
                    f"RUSTCACHE_AUTO_INVALIDATE_EXCLUDE names {label!r}, which is no installed "
                    "app label or model: it excludes nothing.",
                    id="django_rustcache.W002",
                )
            )
    return errors


def _names_installed(label: str) -> bool:
    """Whether ``label`` is an installed app label or an ``app_label.Model`` (case-insensitive)."""
    app_label, _, model = label.lower().partition(".")
    for config in apps.get_app_configs():
        if config.label.lower() == app_label:
            return not model or any(m._meta.model_name == model for m in config.get_models())
    return False


def _backend_class(path: str) -> Any:
    """The BACKEND class, or None if it does not import (Django reports that itself)."""
    try:
        return import_string(path)
    except ImportError:
        return None
