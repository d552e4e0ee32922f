"""Management commands of django_rustcache."""
