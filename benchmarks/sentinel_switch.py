"""How long a NearCache process keeps writing to a master that failed over alive.

Per trial: a fresh Sentinel group (tests/servers.py: master, replica, three sentinels); the old
master is kept a master (an ACL denies it REPLICAOF, so the sentinels never convert it: as
behind a partition, and as during the ~10 s before they do). ``SENTINEL FAILOVER``; this process
writes a new key every ~2 ms for 4 s; afterwards, which of them the new master holds. Prints the
time from the first sentinel's ``+switch-master`` to the first write from which on every write
reached the new master ("never": they all stayed on the old one, as before the listener heard
``+switch-master``).

    python benchmarks/sentinel_switch.py [--trials 3]

No peers to compare: a measurement of one window, printed per trial (machines are noisy).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

import django  # noqa: E402

django.setup()

import redis  # noqa: E402

from django_rustcache import NearCache  # noqa: E402
from tests import servers  # noqa: E402


def _first_event(port: int, events: list[float]) -> None:
    """Append when the sentinel at ``port`` publishes its first ``+switch-master``."""
    pubsub = redis.Redis(port=port).pubsub()
    pubsub.subscribe("+switch-master")
    for message in pubsub.listen():
        if message["type"] == "message":
            events.append(time.monotonic())
            return


def trial(n: int, seconds: float = 4.0) -> str:
    """One failover; the line to print."""
    group = servers.start_sentinel_group()
    try:
        old = group.master.port
        servers.command(old, "ACL", "SETUSER", "default", "-replicaof", "-slaveof")
        cache = NearCache(group.location(), {"KEY_PREFIX": f"sw{n}", "OPTIONS": {"LEASE": 0.5}})
        cache.set("k", 0)
        cache.get("k")
        if not cache._near.wait_fresh(10):
            return f"trial {n}: the listener never got fresh"
        events: list[float] = []
        for s in group.sentinels:
            threading.Thread(target=_first_event, args=(s.port, events), daemon=True).start()
        time.sleep(0.3)
        start = time.monotonic()
        group._ask(group.sentinels[0], "FAILOVER", group.service)
        sent: list[float | None] = []
        while time.monotonic() - start < seconds:
            try:
                cache.set(f"x{len(sent)}", 1)
                sent.append(time.monotonic())
            except redis.exceptions.ConnectionError:
                sent.append(None)
            time.sleep(0.002)
        new = redis.Redis(port=group.wait_failover(old))
        on_new = [t is not None and new.exists(cache.make_key(f"x{i}")) for i, t in enumerate(sent)]
        last_off = max((i for i, ok in enumerate(on_new) if not ok), default=-1)
        landed = sent[last_off + 1] if last_off + 1 < len(sent) else None
        if not events:
            return f"trial {n}: no +switch-master within {seconds} s"
        first = min(events)
        after = "never" if landed is None else f"{(landed - first) * 1000:.1f} ms"
        return (
            f"trial {n}: +switch-master {first - start:.2f} s after FAILOVER (the last sentinel "
            f"{(max(events) - first) * 1000:.0f} ms later); every write on the new master from "
            f"{after} after the first"
        )
    finally:
        group.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    for n in range(args.trials):
        print(trial(n), flush=True)


if __name__ == "__main__":
    main()
