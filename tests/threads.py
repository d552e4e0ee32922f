"""Running one callable in many threads at once, for the concurrency tests."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


def run_threads(n: int, target: Callable[[], Any]) -> list[tuple[str, Any]]:
    """Start ``n`` threads together on ``target``; each gets ``("ok", result)`` or
    ``("error", exc)``. Fails the test if a thread still runs after 30 s (a caller stuck waiting).
    """
    barrier = threading.Barrier(n)
    out: list[Any] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = ("ok", target())
        except Exception as exc:  # noqa: BLE001 - the test inspects what each thread got
            out[i] = ("error", exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive(), "a get_or_set caller is stuck"
    return out
