"""NearCache ``STAMPEDE_LOCK``: 8 processes missing one key at once, with and without the lock.

    python benchmarks/near_stampede.py [--rounds N] [--procs N] [--compute SECONDS]

Needs Django, django-rustcache, redis-py and a ``redis-server`` on PATH; the script starts its
own server on a free loopback port (``tests/servers.py``) and stops it by PID.

Worker processes (forked once, reused for every round) each call ``get_or_set`` of a fresh key
at the same moment; ``default`` INCRs a counter and sleeps ``--compute`` seconds. Per round:

* ``calls``: how many times ``default`` ran (1 is the goal; without the lock, about one per
  process).
* ``lag``: from the end of the holder's ``default()`` to the last process returning (the
  holder's ``SET NX`` and release, then the waiters noticing and reading the value), on
  CLOCK_MONOTONIC, which every process shares.
* ``cmds``: Redis commands served during the round (``INFO commandstats``), the cost of waiting.

Configurations, interleaved round by round so they see the same machine state: no lock; the lock
with the Rust listener (the release's invalidation wakes the waiters); the lock with no listener
(waiters only poll: 5 ms doubling to 100 ms). Prints medians and the ratios between them.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import servers  # noqa: E402  (tests/servers.py: our own redis-server, stopped by PID)

CONFIGS = {
    "no lock": ({}, "rust"),
    "lock, listener wakes": ({"STAMPEDE_LOCK": 30}, "rust"),
    "lock, polling only": ({"STAMPEDE_LOCK": 30}, "none"),
}


def setup_django() -> None:
    import django
    from django.conf import settings

    if not settings.configured:
        settings.configure(SECRET_KEY="bench", USE_TZ=True)
        django.setup()


def worker(url: str, compute: float, jobs: Any, out: Any) -> None:
    """Run rounds until told to stop: ``(config, key, counter)`` -> ``(pid, returned ns, end of
    this process's default() in ns or None, calls seen)``."""
    setup_django()
    import redis

    from django_rustcache import near as near_mod

    r = redis.Redis.from_url(url)
    caches: dict[str, Any] = {}
    real_factory = near_mod.LISTENER_FACTORY
    for name, (options, listener) in CONFIGS.items():
        if listener == "none":
            near_mod.LISTENER_FACTORY = lambda *a, **k: near_mod._NoListener()
        else:
            near_mod.LISTENER_FACTORY = real_factory
        prefix = f"b{list(CONFIGS).index(name)}"
        caches[name] = near_mod.NearCache(url, {"KEY_PREFIX": prefix, "OPTIONS": options})
        caches[name].get("warm")  # connect; start the listener
    near_mod.LISTENER_FACTORY = real_factory
    out.put(("ready", os.getpid()))
    while True:
        job = jobs.get()
        if job is None:
            return
        name, key, counter, start_ns = job
        ended: list[int] = []

        def default(counter: str = counter, ended: list[int] = ended) -> int:
            r.incr(counter)
            time.sleep(compute)
            ended.append(time.monotonic_ns())
            return os.getpid()

        while time.monotonic_ns() < start_ns:
            time.sleep(0.0005)
        caches[name].get_or_set(key, default, 60)
        out.put((os.getpid(), time.monotonic_ns(), ended[0] if ended else None))


def commands(client: Any) -> int:
    return sum(v["calls"] for k, v in client.info("commandstats").items())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--procs", type=int, default=8)
    ap.add_argument("--compute", type=float, default=0.2)
    args = ap.parse_args()
    warnings.filterwarnings("ignore", "This process .* is multi-threaded", DeprecationWarning)
    import redis

    server = servers.start("redis")
    ctx = multiprocessing.get_context("fork")
    jobs = [ctx.Queue() for _ in range(args.procs)]
    out = ctx.Queue()
    procs = [
        ctx.Process(target=worker, args=(server.url, args.compute, q, out), daemon=True)
        for q in jobs
    ]
    results: dict[str, dict[str, list[float]]] = {
        n: {"calls": [], "lag": [], "cmds": []} for n in CONFIGS
    }
    client = redis.Redis.from_url(server.url)
    try:
        for p in procs:
            p.start()
        for _ in procs:
            out.get(timeout=120)
        names = list(CONFIGS)
        for i in range(args.rounds):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                key, counter = f"k{uuid.uuid4().hex}", f"calls:{uuid.uuid4().hex}"
                before = commands(client)
                start_ns = time.monotonic_ns() + 50_000_000
                for q in jobs:
                    q.put((name, key, counter, start_ns))
                got = [out.get(timeout=120) for _ in procs]
                cmds = commands(client) - before - 1  # INFO itself
                ends = [e for _, _, e in got if e is not None]
                last = max(t for _, t, _ in got)
                results[name]["calls"].append(int(client.get(counter) or 0))
                results[name]["lag"].append((last - min(ends)) / 1e6)
                results[name]["cmds"].append(cmds)
        for q in jobs:
            q.put(None)
        for p in procs:
            p.join(10)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        client.close()
        server.cleanup()
    print(
        f"{args.procs} processes, default() {args.compute * 1000:.0f} ms, {args.rounds} rounds "
        f"each (medians; lag: end of the first default() to the last process returning)"
    )
    print(f"{'configuration':<24}{'calls':>8}{'max calls':>10}{'lag ms':>10}{'max lag':>10}"
          f"{'Redis cmds':>12}")  # fmt: skip
    med: dict[str, dict[str, float]] = {}
    for name, r in results.items():
        med[name] = {k: statistics.median(v) for k, v in r.items()}
        print(
            f"{name:<24}{med[name]['calls']:>8.0f}{max(r['calls']):>10}"
            f"{med[name]['lag']:>10.1f}{max(r['lag']):>10.1f}{med[name]['cmds']:>12.0f}"
        )
    nl, lw, po = (med[n] for n in CONFIGS)
    print(
        f"default() runs, no lock / lock: {nl['calls'] / lw['calls']:.1f}x; "
        f"lag, polling only / listener wakes: {po['lag'] / max(lw['lag'], 1e-9):.2f}x; "
        f"Redis commands, lock / no lock: {lw['cmds'] / max(nl['cmds'], 1):.2f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
