"""The products demo: cached pages, a price change, and proof that no stale page was served.

Migrates a fresh SQLite database (in a temporary directory), requests the product pages with
Django's test client, changes prices through the ORM, and prints what came from the cache, the
store's hit/miss counters and the fresh page. Every response is checked against the database at
the moment it was served; the exit status is 1 if any page was stale (or nothing was cached).

    python run_demo.py        (or examples/products/run.sh from a fresh clone)
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ["DJANGO_SETTINGS_MODULE"] = "products_site.settings"
LINE = re.compile(r"<li>(\w+): ([\d.]+)</li>")


class Demo:
    """Requests pages, keeps score, and checks each page against the database."""

    def __init__(self) -> None:
        from django.core.cache import cache
        from django.test import Client
        from shop.views import RENDERS

        self.cache, self.client, self.renders = cache, Client(), RENDERS
        self.stale = self.from_cache = self.rendered = 0

    def truth(self, path: str) -> list[tuple[str, str]]:
        """What the page should list right now, read from the database."""
        from shop.models import Product

        products = Product.objects.all()
        if path != "/":
            products = products.filter(pk=int(path.split("/")[2]))
        return [(p.name, f"{p.price:.2f}") for p in products]

    def get(self, path: str) -> str:
        before, renders = self.cache.stats(), sum(self.renders.values())
        page = self.client.get(path).content.decode()
        after = self.cache.stats()
        ran = sum(self.renders.values()) > renders
        self.rendered += ran
        self.from_cache += not ran
        fresh = LINE.findall(page) == self.truth(path)
        self.stale += not fresh
        print(
            f"  GET {path:<14} {'rendered by the view' if ran else 'served from the cache':<22}"
            f" store hits +{after['hits'] - before['hits']} misses +"
            f"{after['misses'] - before['misses']}"
            f"  {'fresh' if fresh else 'STALE'}: {', '.join(map(': '.join, LINE.findall(page)))}"
        )
        return page


def main() -> int:
    import django
    from django.core.management import call_command

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["PRODUCTS_DB"] = str(Path(tmp) / "db.sqlite3")
        django.setup()
        call_command("migrate", verbosity=0)
        return run()


def run() -> int:
    from shop.models import Product

    demo = Demo()
    apple, banana = Product.objects.get(name="apple"), Product.objects.get(name="banana")
    pages = ["/", f"/products/{apple.pk}/", f"/products/{banana.pk}/"]
    print("django-rustcache products demo: pages cached 300 s with tags 'shop.product[:<pk>]'\n")

    print("1. First visits fill the cache, second visits are served from it:")
    for path in pages + pages:
        demo.get(path)
    ttl = demo.cache.ttl(demo.cache.keys("*cache_page*")[0])
    print(f"   a cached page expires in {ttl:.0f} s\n")

    print(
        "2. apple.price = 1.50; apple.save()  -> post_save invalidates shop.product, shop.product:1"
    )
    apple.price = Decimal("1.50")
    apple.save()
    for path in pages:
        demo.get(path)

    print(
        "\n3. Product.objects.filter(name='cherry').update(price=2.75)  -> the manager invalidates"
    )
    Product.objects.filter(name="cherry").update(price=Decimal("2.75"))
    page = demo.get("/")
    demo.get("/")

    stats = demo.cache.stats()
    print(f"\nThe fresh product list:\n{page.strip()}\n")
    print(
        f"pages served from the cache: {demo.from_cache}, rendered: {demo.rendered}; "
        f"store hits: {stats['hits']}, misses: {stats['misses']}, "
        f"invalidations: {stats['invalidations']}"
    )
    print(f"stale pages served: {demo.stale}")
    if demo.stale or not demo.from_cache:
        print("FAILED: a stale page was served or nothing came from the cache", file=sys.stderr)
        return 1
    print("OK: every page matched the database when it was served")
    return 0


if __name__ == "__main__":
    sys.exit(main())
