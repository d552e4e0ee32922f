"""Values the benchmarks share: a product-API page of records (a JSON-like dict) of a given
pickled size, and the words its text is made of."""

from __future__ import annotations

import pickle
import random
from typing import Any

WORDS = (
    "apple banana cherry delivery shipping discount organic fresh premium basket order customer "
    "review rating stock warehouse price quantity category brand seasonal local imported frozen "
    "bakery dairy kitchen garden snack drink"
).split()


def json_dict(size: int = 100_000, seed: int = 2) -> dict[str, Any]:
    """An API page of records whose pickle is about ``size`` bytes."""
    rnd = random.Random(seed)
    items: list[dict[str, Any]] = []
    out: dict[str, Any] = {"count": 0, "next": "/api/products/?page=2", "results": items}
    while len(pickle.dumps(out, pickle.HIGHEST_PROTOCOL)) < size:
        items.append(
            {
                "id": rnd.randint(1, 10**6),
                "sku": f"SKU-{rnd.getrandbits(32):08X}",
                "name": " ".join(rnd.choice(WORDS) for _ in range(3)).title(),
                "price": round(rnd.uniform(0.5, 500), 2),
                "in_stock": rnd.random() < 0.8,
                "tags": rnd.sample(WORDS, 3),
                "description": " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(10, 30))),
                "dimensions": {"w": rnd.randint(1, 100), "h": rnd.randint(1, 100), "unit": "cm"},
            }
        )
        out["count"] = len(items)
    return out
