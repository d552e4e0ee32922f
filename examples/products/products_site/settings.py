"""Settings of the products example: one app, SQLite, and RustCache as the default cache."""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = "products-example-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "testserver"]
INSTALLED_APPS = ["django_rustcache", "shop"]
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "products_site.urls"
TEMPLATES = [{"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True}]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        # run_demo.py points this at a temporary file so every run starts from the seed data.
        "NAME": os.environ.get("PRODUCTS_DB", BASE_DIR / "db.sqlite3"),
    }
}
CACHES = {
    "default": {
        "BACKEND": "django_rustcache.RustCache",
        "LOCATION": "products",
        "KEY_PREFIX": "products",  # tags are namespaced by it too
        "TIMEOUT": 300,
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
USE_TZ = True
