"""Template tag libraries of django-rustcache: ``{% load rustcache %}``."""
