"""The product pages, cached for 300 s with tags so a change to a product shows at once."""

from collections import Counter

from django import forms
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, render
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from django_rustcache.decorators import cache_page_tagged

from .models import Product

#: How many times each view really ran (the rest were served from the cache).
RENDERS: Counter = Counter()


@cache_page_tagged(300, tags="shop.product")
def product_list(request):
    RENDERS["product_list"] += 1
    return render(request, "shop/product_list.html", {"products": Product.objects.all()})


@cache_page_tagged(300, tags="shop.product:{pk}")
def product_detail(request, pk):
    RENDERS["product_detail"] += 1
    product = get_object_or_404(Product, pk=pk)
    return render(request, "shop/product_detail.html", {"product": product})


class PriceForm(forms.ModelForm):
    """The price, validated as the model field says (a decimal, 8 digits, 2 places)."""

    class Meta:
        model = Product
        fields = ["price"]


@csrf_exempt  # the demo posts without a session; only mounted with PRODUCTS_WORKER_DEMO=1
@require_POST
def set_price(request: HttpRequest, pk: int) -> HttpResponse:
    """Saves a new price (``price=1.50``): post_save then invalidates the product's pages."""
    form = PriceForm(request.POST, instance=get_object_or_404(Product, pk=pk))
    if not form.is_valid():
        return HttpResponse(form.errors.as_text(), status=400, content_type="text/plain")
    product = form.save()
    return HttpResponse(f"{product.name}: {product.price}\n", content_type="text/plain")
