"""Django settings for the project's own pytest suite (pytest-django reads it)."""

SECRET_KEY = "django-rustcache-tests"
USE_TZ = True
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",
    "django_rustcache",
    "tests.testapp",
]
CACHES = {
    "default": {"BACKEND": "django_rustcache.RustCache", "LOCATION": "tests-default"},
    "other": {"BACKEND": "django_rustcache.RustCache", "LOCATION": "tests-other"},
}
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {"context_processors": []},
    }
]
ROOT_URLCONF = "tests.urls"
MIDDLEWARE: list[str] = []
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
LOGGING_CONFIG = None
