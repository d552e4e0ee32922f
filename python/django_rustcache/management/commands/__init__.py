"""``manage.py rustcache``."""
