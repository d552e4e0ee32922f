"""The seeds' products: apple 1.2, banana 0.5, cherry 2.5."""

from decimal import Decimal

from django.db import migrations

PRODUCTS = {"apple": Decimal("1.20"), "banana": Decimal("0.50"), "cherry": Decimal("2.50")}


def seed(apps, schema_editor):
    Product = apps.get_model("shop", "Product")
    Product.objects.bulk_create(Product(name=n, price=p) for n, p in PRODUCTS.items())


class Migration(migrations.Migration):
    dependencies = [("shop", "0001_initial")]

    operations = [migrations.RunPython(seed, migrations.RunPython.noop)]
