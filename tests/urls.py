"""URLs for view-level tests; test modules may add their own with ``@pytest.mark.urls``."""

urlpatterns: list = []
