"""Hit ratios of RustCache's eviction policies next to Belady's offline optimum and a perfect LFU.

Every stream is replayed through the real store (a ``RustCache`` per policy and capacity): each
request is a ``get``, and a miss is followed by a ``set`` (a read-through cache). Three references
are computed on the same stream, in pure Python:

- **Belady**: the offline optimum (MIN). It knows the future: on a miss it keeps the entries used
  again soonest, and it does not admit a key whose next use comes after every cached key's (or
  never comes), so no policy, whatever its admission rule, can hit more often.
- **perfect LFU**: learning from the past at its best: it knows the exact count of every key's
  requests so far (evicted keys included) and holds the keys with the highest counts. A miss
  evicts the cached key with the lowest count; on equal counts the least recently used one goes,
  and a newcomer, being the most recent, wins a tie. A newcomer with fewer requests than every
  cached key is not admitted.
- **exact LRU**: a plain least-recently-used list, one eviction per insert (the store's ``"lru"``
  is Django's cull up to 65,536 entries: a third of the entries at once).

Streams are seeded, so a run is repeatable; the store's hashing has a per-process seed, but on a
store of one shard (``MAX_ENTRIES`` up to 65,536) no choice of ``"lru"`` or ``"s3fifo"`` depends on
it. ``"tinylfu"``'s does (its frequency sketch hashes keys with that seed): its figures move by a
few tenths of a point between runs (at most 0.25 on 8 seeds, the full and the CI streams; up to
1.2 while a small sketch had one counter word a key). The CI
rows (``--ci``, the guard) therefore fix that seed (``RUSTCACHE_HASH_SEED``, read by the store as
``PYTHONHASHSEED`` is by Python) and take the mean over four seeds, so the guard compares like
with like on every run and no single seed's luck decides it.

    python benchmarks/hitratio_optimum.py                      # issue 12's table, ~15 s of CPU
    python benchmarks/hitratio_optimum.py --scale 0.2          # the same streams, a fifth the size
    python benchmarks/hitratio_optimum.py --trace FILE --capacity 1000 5000
    python benchmarks/hitratio_optimum.py --write-results      # also into benchmarks/RESULTS.md
    python benchmarks/hitratio_optimum.py --ci --write-baseline  # re-record baselines

A trace file has one key per line (surrounding whitespace is ignored, blank lines are skipped);
keys are renamed ``k0``, ``k1``... in order of first appearance before they reach the store, so any
string is a valid key. Under ``"lru"`` a ``MAX_ENTRIES`` below 3 culls nothing (Django's rule culls
``entries // 3``), so such a store holds up to 3 entries.

``tests/test_hitratio.py`` runs ``--ci`` (the streams at a fifth of their size) and fails if a
policy's hit ratio falls more than one point below ``hitratio_baseline.json``.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import os
import random
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import django
from django.conf import settings

if not settings.configured:
    settings.configure(CACHES={}, USE_TZ=True)
    django.setup()

from django_rustcache import RustCache  # noqa: E402

HERE = Path(__file__).resolve().parent
BASELINE = HERE / "hitratio_baseline.json"
RESULTS = HERE / "RESULTS.md"
#: The section of RESULTS.md this script owns (benchmarks/peers/bench.py keeps it when it rewrites
#: the file).
BEGIN, END = "<!-- hitratio_optimum:begin -->", "<!-- hitratio_optimum:end -->"

#: The store's policies replayed by default (``--policy`` replaces the list).
POLICIES = ("lru", "s3fifo", "tinylfu")
#: The reference columns, computed in pure Python.
REFERENCES = ("exact LRU", "perfect LFU", "Belady")
#: The scale of the CI version (``--ci``) and of its baselines.
CI_SCALE = 0.2
#: A policy may fall this far below its recorded baseline before the CI check fails.
TOLERANCE = 0.01


@dataclass(frozen=True)
class Stream:
    """A named request stream of integer keys, and the capacities it is replayed at."""

    name: str
    keys: list[int]
    capacities: tuple[int, ...]
    #: Whether each request counts towards the hit ratio (empty: all do). One-time scan
    #: requests do not: no cache can hit them.
    counted: tuple[bool, ...] = ()

    def requests_counted(self) -> int:
        return sum(self.counted) if self.counted else len(self.keys)


# Streams ----------------------------------------------------------------------------------------


def zipf_ranks(rng: random.Random, n_keys: int, alpha: float, length: int) -> list[int]:
    """``length`` ranks in ``[0, n_keys)``, rank r drawn with weight 1/(r+1)^alpha."""
    cum = list(itertools.accumulate(1.0 / (r + 1) ** alpha for r in range(n_keys)))
    return rng.choices(range(n_keys), cum_weights=cum, k=length)


def zipf(seed: int, name: str, n_keys: int, alpha: float, length: int) -> list[int]:
    """A Zipf stream whose popularity ranks are spread over the keys by a seeded permutation."""
    rng = random.Random(f"{seed}:{name}")
    perm = list(range(n_keys))
    rng.shuffle(perm)
    return [perm[r] for r in zipf_ranks(rng, n_keys, alpha, length)]


def with_scans(
    base: list[int], n_keys: int, scans: int, scan_len: int
) -> tuple[list[int], tuple[bool, ...]]:
    """``base`` cut into ``scans + 1`` equal parts with a scan between each two: ``scan_len``
    one-time keys (ids from ``n_keys`` up, never requested again). Also returns which requests
    come from ``base``."""
    keys: list[int] = []
    counted: list[bool] = []
    fresh = itertools.count(n_keys)
    bounds = [len(base) * s // (scans + 1) for s in range(scans + 2)]
    for s in range(scans + 1):
        if s:
            keys.extend(itertools.islice(fresh, scan_len))
            counted.extend([False] * scan_len)
        part = base[bounds[s] : bounds[s + 1]]
        keys.extend(part)
        counted.extend([True] * len(part))
    return keys, tuple(counted)


def popularity_shift(seed: int, n_keys: int, alpha: float, length: int) -> list[int]:
    """Zipf traffic whose popularity is dealt out afresh halfway: the hot keys of the first half
    are as cold as any in the second."""
    first = zipf(seed, "shift, first half", n_keys, alpha, length // 2)
    second = zipf(seed, "shift, second half", n_keys, alpha, length - length // 2)
    return first + second


def recency_heavy(seed: int, length: int, p_new: float, mean_age: float) -> list[int]:
    """Requests for recently introduced keys: with probability ``p_new`` a key never seen before,
    else the key introduced ``age`` new keys ago, ``age`` exponential with mean ``mean_age``.
    Keys are used in a burst and then forgotten, so recency predicts reuse and counts do not:
    the workload where LRU is strong and a frequency-based policy is not."""
    rng = random.Random(f"{seed}:recency")
    keys: list[int] = []
    introduced = 0
    for _ in range(length):
        if introduced == 0 or rng.random() < p_new:
            keys.append(introduced)
            introduced += 1
        else:
            age = min(int(rng.expovariate(1.0 / mean_age)), introduced - 1)
            keys.append(introduced - 1 - age)
    return keys


def make_streams(seed: int = 12, scale: float = 1.0) -> list[Stream]:
    """Issue 12's streams (200,000 requests over 100,000 keys at capacities 1,000 and 5,000),
    a popularity shift and a recency-heavy stream; ``scale`` multiplies every size but the
    loop's number of passes and the Zipf exponents."""

    def n(x: int) -> int:
        return max(int(x * scale), 1)

    n_keys, length, small, large = n(100_000), n(200_000), n(1_000), n(5_000)
    both = (small, large)
    streams = []
    for alpha in (0.8, 1.0, 1.2):
        streams.append(
            Stream(f"Zipf {alpha}", zipf(seed, f"zipf {alpha}", n_keys, alpha, length), both)
        )
    base = streams[1].keys  # the Zipf 1.0 stream itself: its figures are the scans row's target
    keys, counted = with_scans(base, n_keys, scans=20, scan_len=n(2_000))
    streams.append(
        Stream("Zipf 1.0 with one-time scans (reusable requests)", keys, (large,), counted)
    )
    loop_keys = n(6_000)
    streams.append(
        Stream(f"loop over {loop_keys:,} keys, 30 times", list(range(loop_keys)) * 30, (large,))
    )
    streams.append(
        Stream(
            "Zipf 1.0, popularity shift halfway", popularity_shift(seed, n_keys, 1.0, length), both
        )
    )
    streams.append(Stream("recency-heavy", recency_heavy(seed, length, 0.3, mean_age=n(500)), both))
    return streams


def read_trace(path: str | Path) -> list[int]:
    """The keys of a trace file (one key per line) as integers, in order of first appearance."""
    ids: dict[str, int] = {}
    keys: list[int] = []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            key = line.strip()
            if key:
                keys.append(ids.setdefault(key, len(ids)))
    if not keys:
        raise ValueError(f"{path}: no keys (the format is one key per line)")
    return keys


# The references ---------------------------------------------------------------------------------


def next_uses(keys: Sequence[int]) -> list[int]:
    """For each request i, the index of the next request of the same key, or ``len(keys) + i``
    if there is none (distinct values, all beyond any real index)."""
    n = len(keys)
    nxt = [0] * n
    last: dict[int, int] = {}
    for i in range(n - 1, -1, -1):
        k = keys[i]
        nxt[i] = last.get(k, n + i)
        last[k] = i
    return nxt


def belady(keys: Sequence[int], capacity: int) -> list[bool]:
    """Hits of Belady's MIN with bypass: the offline optimum, O(n log n).

    The cache maps each key to its next use; a max-heap of next uses (stale entries skipped on
    pop) finds the key needed last. A next use determines its key (``keys[i]``, or
    ``keys[i - n]`` past the end), so the heap holds plain integers."""
    _check_capacity(capacity)
    n = len(keys)
    nxt = next_uses(keys)
    cached: dict[int, int] = {}
    heap: list[int] = []  # negated next uses
    hits = [False] * n
    push, pop = heapq.heappush, heapq.heappop
    for i, key in enumerate(keys):
        nu = nxt[i]
        if key in cached:
            hits[i] = True
        elif nu >= n:
            continue  # never requested again: not worth a slot
        elif len(cached) >= capacity:
            while True:  # the cached key needed last
                far = -heap[0]
                victim = keys[far] if far < n else keys[far - n]
                if cached.get(victim) == far:
                    break
                pop(heap)
            if far < nu:
                continue  # every cached key is needed before this one: bypass
            pop(heap)
            del cached[victim]
        cached[key] = nu
        push(heap, -nu)
    return hits


def perfect_lfu(keys: Sequence[int], capacity: int) -> list[bool]:
    """Hits of a perfect LFU, O(n log n): exact counts of every key's past requests; the cache
    holds the keys with the highest (count, last request) pairs, so a miss evicts the least
    counted key, the least recently used of those on a tie, unless the newcomer counts fewer
    requests than it (then the newcomer is not admitted).

    A min-heap of ``count * n + last request`` (stale entries skipped on pop); the last request's
    index determines the key."""
    _check_capacity(capacity)
    n = len(keys)
    counts: dict[int, int] = {}
    cached: dict[int, int] = {}  # key -> index of its last request
    heap: list[int] = []
    hits = [False] * n
    push, pop = heapq.heappush, heapq.heappop
    for i, key in enumerate(keys):
        c = counts[key] = counts.get(key, 0) + 1
        if key in cached:
            hits[i] = True
        elif len(cached) >= capacity:
            while True:  # the least counted cached key, least recent first
                low_c, low_i = divmod(heap[0], n)
                victim = keys[low_i]
                if cached.get(victim) == low_i:
                    break
                pop(heap)
            if low_c > c:
                continue  # the newcomer counts fewer requests than every cached key
            pop(heap)
            del cached[victim]
        cached[key] = i
        push(heap, c * n + i)
    return hits


def exact_lru(keys: Iterable[int], capacity: int) -> list[bool]:
    """Hits of a plain LRU that evicts exactly the least recently used key per insert."""
    _check_capacity(capacity)
    cache: OrderedDict[int, None] = OrderedDict()
    hits = []
    for key in keys:
        if key in cache:
            cache.move_to_end(key)
            hits.append(True)
        else:
            if len(cache) >= capacity:
                cache.popitem(last=False)
            cache[key] = None
            hits.append(False)
    return hits


def _check_capacity(capacity: int) -> None:
    if capacity < 1:
        raise ValueError(f"capacity must be at least 1, not {capacity}")


REFERENCE_FUNCS: dict[str, Callable[[Sequence[int], int], list[bool]]] = {
    "exact LRU": exact_lru,
    "perfect LFU": perfect_lfu,
    "Belady": belady,
}


# The store --------------------------------------------------------------------------------------


def replay(policy: str, capacity: int, names: Sequence[str]) -> list[bool]:
    """Hits of a read-through replay of ``names`` (``get``, ``set`` on a miss) through a fresh
    RustCache of ``MAX_ENTRIES=capacity`` under ``policy``."""
    cache = RustCache(
        f"hitratio-optimum-{policy}-{capacity}-{time.monotonic_ns()}",
        {"TIMEOUT": None, "OPTIONS": {"MAX_ENTRIES": capacity, "EVICTION_POLICY": policy}},
    )
    cache.clear()
    missing = object()
    get, set_ = cache.get, cache.set
    hits = []
    for name in names:
        if get(name, missing) is missing:
            set_(name, 1)
            hits.append(False)
        else:
            hits.append(True)
    cache.clear()  # the store lives on (one per LOCATION per process): free its entries
    return hits


def ratio(hits: Sequence[bool], counted: Sequence[bool]) -> float:
    """The share of counted requests that hit."""
    if not counted:
        return sum(hits) / len(hits)
    total = sum(counted)
    return sum(h for h, c in zip(hits, counted, strict=True) if c) / total


Row = tuple[str, int, int, dict[str, float]]  # stream, capacity, requests counted, column -> ratio


def measure(
    streams: Sequence[Stream], policies: Sequence[str], references: Sequence[str] = REFERENCES
) -> list[Row]:
    """Every stream at each of its capacities: each policy's hit ratio and each reference's."""
    rows: list[Row] = []
    for stream in streams:
        names = [f"k{k}" for k in stream.keys]
        for capacity in stream.capacities:
            cells: dict[str, float] = {}
            for policy in policies:
                cells[policy] = ratio(replay(policy, capacity, names), stream.counted)
            for ref in references:
                cells[ref] = ratio(REFERENCE_FUNCS[ref](stream.keys, capacity), stream.counted)
            rows.append((stream.name, capacity, stream.requests_counted(), cells))
    return rows


def table(rows: Sequence[Row], columns: Sequence[str]) -> str:
    """A Markdown table of the rows (ratios to three decimals)."""
    head = ["stream", "capacity", "requests counted"]
    head += [c if c in REFERENCES else f'`"{c}"`' for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|---:|" + "---:|" * len(columns)]
    for name, capacity, counted, cells in rows:
        vals = " | ".join(f"{cells[c]:.3f}" for c in columns)
        lines.append(f"| {name} | {capacity:,} | {counted:,} | {vals} |")
    return "\n".join(lines)


def row_key(name: str, capacity: int) -> str:
    return f"{name} @ {capacity}"


# The CI guard -----------------------------------------------------------------------------------


#: The store's hash seeds for the CI rows: each row is the mean over stores hashing with these, so
#: the figures are reproducible, and a change that merely re-rolls the hashing (a new key layout,
#: a new hash input) moves the mean by a fraction of what it moves one seed's figure (one seed's
#: ``"tinylfu"`` row moved by up to 1.2 points on the small Zipf 0.8 row from hashing alone while
#: a small sketch had one counter word a key, by at most 0.25 since it has four).
CI_HASH_SEEDS = ("20261207", "7919", "15838", "23757")


def ci_rows(
    policies: Sequence[str] = POLICIES, references: Sequence[str] = (), seed: int = 12
) -> list[Row]:
    """The CI version: the default streams at ``CI_SCALE``, through the store's policies, each
    ratio the mean over stores whose key hashing has the fixed seeds ``CI_HASH_SEEDS`` (so no run
    is luckier, and no single seed decides)."""
    before = os.environ.get("RUSTCACHE_HASH_SEED")
    streams = make_streams(seed, CI_SCALE)
    runs: list[list[Row]] = []
    try:
        for i, hash_seed in enumerate(CI_HASH_SEEDS):
            os.environ["RUSTCACHE_HASH_SEED"] = hash_seed
            # The references do not hash: measured once.
            runs.append(measure(streams, policies, references if i == 0 else ()))
    finally:
        if before is None:
            del os.environ["RUSTCACHE_HASH_SEED"]
        else:
            os.environ["RUSTCACHE_HASH_SEED"] = before
    out: list[Row] = []
    for k, (name, cap, counted, cells) in enumerate(runs[0]):
        mean = {p: sum(run[k][3][p] for run in runs) / len(runs) for p in policies}
        out.append((name, cap, counted, {**cells, **mean}))
    return out


def regressions(rows: Sequence[Row], baseline: dict[str, dict[str, float]]) -> list[str]:
    """One line per policy and row of ``baseline`` whose measured ratio is more than
    ``TOLERANCE`` below the recorded one, or which was not measured at all."""
    measured = {row_key(name, cap): cells for name, cap, _, cells in rows}
    problems = []
    for key, recorded in baseline.items():
        for policy, expected in recorded.items():
            got = measured.get(key, {}).get(policy)
            if got is None:
                problems.append(f"{key}: {policy} not measured (recorded {expected:.4f})")
            elif got < expected - TOLERANCE:
                problems.append(
                    f"{key}: {policy} hit ratio {got:.4f}, recorded {expected:.4f} "
                    f"({100 * (expected - got):.2f} points lower)"
                )
    return problems


def rerun(policies: Sequence[str]) -> list[Row]:
    """The CI rows measured again in a new process (a new seed for the store's hashing)."""
    import subprocess

    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import hitratio_optimum as h; "
        "print(json.dumps(h.ci_rows(sys.argv[2:])))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(HERE), *policies],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [tuple(r) for r in json.loads(out.strip().splitlines()[-1])]  # type: ignore[misc]


def lowest(a: Sequence[Row], b: Sequence[Row]) -> list[Row]:
    """Rows of ``a`` with each ratio the lower of ``a``'s and ``b``'s (same rows, same order)."""
    out: list[Row] = []
    for (name, cap, counted, cells), (name_b, cap_b, _, cells_b) in zip(a, b, strict=True):
        assert (name, cap) == (name_b, cap_b)
        out.append((name, cap, counted, {c: min(v, cells_b.get(c, v)) for c, v in cells.items()}))
    return out


def load_baseline(path: Path = BASELINE) -> dict[str, dict[str, float]]:
    data = json.loads(path.read_text())
    if data.get("scale") != CI_SCALE:
        raise ValueError(f"{path} was recorded at scale {data.get('scale')}, not {CI_SCALE}")
    ratios: dict[str, dict[str, float]] = data["ratios"]
    return ratios


def write_baseline(rows: Sequence[Row], policies: Sequence[str], path: Path = BASELINE) -> None:
    data = {
        "about": "Hit ratios of the store's policies on benchmarks/hitratio_optimum.py --ci; "
        "tests/test_hitratio.py fails if one falls more than `tolerance` below. Re-record with "
        "`python benchmarks/hitratio_optimum.py --ci --write-baseline` when a change is "
        "meant (the CI rows are means over four fixed hash seeds of the store, so they are "
        "reproducible).",
        "scale": CI_SCALE,
        "tolerance": TOLERANCE,
        "ratios": {
            row_key(name, cap): {p: round(cells[p], 4) for p in policies}
            for name, cap, _, cells in rows
        },
    }
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_results(text: str, path: Path = RESULTS) -> None:
    """Puts ``text`` between this script's markers in RESULTS.md (appended the first time)."""
    old = path.read_text() if path.exists() else ""
    block = f"{BEGIN}\n{text.rstrip()}\n{END}"
    if BEGIN in old and END in old:
        start, end = old.index(BEGIN), old.index(END) + len(END)
        new = old[:start] + block + old[end:]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(new)


LEGEND = """\
`"lru"`, `"s3fifo"`, `"tinylfu"`: the store (`MAX_ENTRIES` = capacity; one shard up to 65,536;
`"lru"` culls as Django does; `"tinylfu"`'s figures move by a few tenths of a point between
processes (at most 0.25 on 8 hash seeds), its sketch hashing keys with the store's
per-process seed). exact LRU: one least recently
used key evicted per insert. perfect LFU: exact past counts of every key, the least counted evicted
(the least recent of equals), a newcomer counted less than every cached key not admitted. Belady:
the offline optimum (MIN, which may decline to admit). Zipf streams: 100,000 keys (x scale),
popularity spread by a seeded permutation. One-time scans: the Zipf 1.0 stream itself with 20 scans
of 2,000 never-repeated keys (x scale) spread through it; only its own requests count. Popularity
shift: a new permutation for the second half. Recency-heavy: 30% of requests a new key, the rest the
key introduced n new keys ago, n exponential with mean 500 (x scale)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--trace", help="replay this file (one key per line) instead of the streams"
    )
    parser.add_argument(
        "--capacity",
        type=int,
        nargs="+",
        default=[1_000],
        help="capacities of --trace (MAX_ENTRIES)",
    )
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the streams' sizes")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument(
        "--policy",
        action="append",
        help=f"a store policy to replay (repeatable; default {', '.join(POLICIES)})",
    )
    parser.add_argument(
        "--ci",
        action="store_true",
        help=f"the CI version (scale {CI_SCALE}), checked against the baselines",
    )
    parser.add_argument(
        "--write-baseline", action="store_true", help="with --ci: record the baselines"
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=1,
        help="with --write-baseline: record each policy's lowest ratio over this many runs "
        "(each in a new process: the store's hashing is seeded per process)",
    )
    parser.add_argument(
        "--write-results",
        action="store_true",
        help="also write the table into benchmarks/RESULTS.md",
    )
    args = parser.parse_args(argv)
    policies = tuple(args.policy or POLICIES)
    started = time.monotonic()

    if args.trace:
        keys = read_trace(args.trace)
        streams = [Stream(f"trace {Path(args.trace).name}", keys, tuple(args.capacity))]
        what = f"Trace {args.trace}: {len(keys):,} requests, {len(set(keys)):,} distinct keys."
    else:
        scale = CI_SCALE if args.ci else args.scale
        streams = make_streams(args.seed, scale)
        what = f"Seed {args.seed}, scale {scale:g}."
    # --ci measures as the guard does (the store's hash seed fixed), so that the baselines it
    # records are the figures the guard will find.
    rows = ci_rows(policies, REFERENCES, args.seed) if args.ci else measure(streams, policies)
    columns = [*policies, *REFERENCES]
    text = (
        f"{what} Hit ratio of the requests counted (a `get`, and a `set` on a miss).\n\n"
        + table(rows, columns)
    )
    if not args.trace:
        text += "\n\n" + LEGEND
    print(text)
    print(f"\n({time.monotonic() - started:.0f} s)", file=sys.stderr)

    status = 0
    if args.ci:
        if args.write_baseline:
            for _ in range(args.runs - 1):
                rows = lowest(rows, rerun(policies))
            write_baseline(rows, policies)
            print(f"\nwrote {BASELINE}")
        else:
            problems = regressions(rows, load_baseline())
            for p in problems:
                print(f"FAIL: {p}")
            print(
                "\nPASS: no policy more than one point below its baseline" if not problems else ""
            )
            status = 1 if problems else 0
    if args.write_results:
        command = "python benchmarks/hitratio_optimum.py " + " ".join(
            argv if argv is not None else sys.argv[1:]
        )
        write_results(
            f"## Hit ratios against the optimum (issue 12)\n\n    {command.strip()}\n\n{text}"
        )
    return status


if __name__ == "__main__":
    sys.exit(main())
