"""The WSGI application, for gunicorn (``gunicorn products_site.wsgi:application``)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "products_site.settings")
application = get_wsgi_application()
