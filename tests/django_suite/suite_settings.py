"""Django settings for running Django's own ``tests/cache`` suite (see ``run.py``).

Modelled on Django's ``tests/runtests.py`` + ``tests/test_sqlite.py``, trimmed to what the
cache tests need: an in-memory SQLite database (for the ``Poll`` model), contenttypes, auth,
the extracted test package as the ``cache`` app, ``USE_TZ=False`` and a DjangoTemplates engine.
"""

from __future__ import annotations

import copy
import os

from django.utils.log import DEFAULT_LOGGING

# The backend under test; run.py rewrites every LocMemCache reference in the suite to it.
SUITE_BACKEND = os.environ.get("RUSTCACHE_SUITE_BACKEND") or "django_rustcache.RustCache"

SECRET_KEY = "django_tests_secret_key"
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3"}}  # no NAME: in-memory test DB
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "cache"]
MIGRATION_MODULES = {"auth": None, "contenttypes": None}  # syncdb, like runtests.py
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
USE_TZ = False
LANGUAGE_CODE = "en"
STATIC_URL = "static/"
CACHES = {"default": {"BACKEND": SUITE_BACKEND}}
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
            ],
        },
    }
]

# As runtests.py: only errors from the "django" logger (middleware tests log on purpose).
LOGGING = copy.deepcopy(DEFAULT_LOGGING)
LOGGING["loggers"]["django"]["level"] = "ERROR"
