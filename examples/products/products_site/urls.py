"""``/`` lists the products, ``/products/<pk>/`` shows one; with ``PRODUCTS_WORKER_DEMO=1``,
``POST /products/<pk>/price/`` changes a price (coherence_demo.py's write through one worker)."""

from django.conf import settings
from django.urls import path
from shop import views

urlpatterns = [
    path("", views.product_list, name="product_list"),
    path("products/<int:pk>/", views.product_detail, name="product_detail"),
]
if settings.WORKER_DEMO:
    # No authentication: a demo's endpoint, off unless the demo's variable asks for it.
    urlpatterns.append(path("products/<int:pk>/price/", views.set_price, name="set_price"))
