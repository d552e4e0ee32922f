"""Settings of the products example: one app, SQLite, and RustCache as the default cache.

coherence_demo.py (the demo's second part) runs this site under gunicorn with two environment
variables: ``PRODUCTS_CACHE_URL`` (a Redis URL) makes the cache a NearCache there, and
``PRODUCTS_WORKER_DEMO=1`` adds what it measures with: the ``X-Served-By`` (worker pid) and
``X-Page-Source`` headers and the ``POST /products/<pk>/price/`` endpoint. Without them the site
is the read-only one of run_demo.py.
"""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = "products-example-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "testserver"]
INSTALLED_APPS = ["django_rustcache", "shop"]
WORKER_DEMO = os.environ.get("PRODUCTS_WORKER_DEMO") == "1"
MIDDLEWARE: list[str] = ["shop.middleware.served_by"] if WORKER_DEMO else []
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
if os.environ.get("PRODUCTS_CACHE_URL"):
    # One L1 per process over Redis, which every process's listener hears about changes from.
    CACHES["default"] = {
        "BACKEND": "django_rustcache.NearCache",
        "LOCATION": os.environ["PRODUCTS_CACHE_URL"],
        "KEY_PREFIX": "products",
        "TIMEOUT": 300,
    }
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
USE_TZ = True
