"""The product pages, cached for 300 s with tags so a change to a product shows at once."""

from collections import Counter

from django.shortcuts import get_object_or_404, render

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
