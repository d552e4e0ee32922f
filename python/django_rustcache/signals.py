"""Django signals sent by django-rustcache, for anyone who wants to count or audit invalidations."""

from django.dispatch import Signal

#: Sent after ``RustCache.invalidate_tags``: ``sender`` is the backend class, with keyword
#: arguments ``cache`` (the backend instance), ``tags`` (tuple of str) and ``count`` (entries
#: removed).
tags_invalidated = Signal()
