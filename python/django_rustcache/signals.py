"""Django signals sent by django-rustcache, for anyone who wants to count or audit invalidations."""

from django.dispatch import Signal

#: Sent after ``RustCache.invalidate_tags`` and ``NearCache.invalidate_tags``: ``sender`` is the
#: backend class, with keyword arguments ``cache`` (the backend instance), ``tags`` (tuple of str)
#: and ``count`` (RustCache: entries removed; NearCache: distinct tags bumped, since entries in
#: other processes cannot be counted).
tags_invalidated = Signal()
