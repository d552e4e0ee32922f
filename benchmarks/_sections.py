"""One writer for the benchmark scripts' sections of RESULTS.md and README.md.

Each script owns the text between its ``<!-- name:begin -->`` and ``<!-- name:end -->`` markers
and replaces only that, so that scripts run at different times never undo each other's tables
(benchmarks/peers/bench.py carries the sections over when it rewrites RESULTS.md).
"""

from __future__ import annotations

from pathlib import Path


def replace_section(path: Path, section: str, begin: str, end: str) -> None:
    """Put ``section`` (which carries its own markers) between ``begin`` and ``end`` in ``path``,
    or append it when the markers are not there yet."""
    old = path.read_text() if path.exists() else ""
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        tail = rest.split(end, 1)[1]
        new = head + section.rstrip("\n") + tail
    else:
        new = old.rstrip("\n") + "\n\n" + section
    path.write_text(new)
    print(f"wrote {path}")
