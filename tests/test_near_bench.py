"""benchmarks/near.py's section of benchmarks/RESULTS.md: replaced in place, and kept when
benchmarks/peers/bench.py rewrites the file."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str, path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_near_section_is_replaced_in_place_and_survives_a_peers_rewrite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    near = _load("near_bench", BENCHMARKS / "near.py", monkeypatch)
    results = tmp_path / "RESULTS.md"
    hit_ratio = "<!-- hitratio_optimum:begin -->\n## Hit ratios\n<!-- hitratio_optimum:end -->\n"
    results.write_text("# Peers\n\nold tables\n\n" + hit_ratio)

    def section(body: str) -> str:
        return f"{near.SECTION_BEGIN}\n## NearCache\n\n{body}\n{near.SECTION_END}\n"

    near.write_results(section("first"), results)
    near.write_results(section("second"), results)
    text = results.read_text()
    assert text.startswith("# Peers\n\nold tables\n\n" + hit_ratio)
    assert text.count(near.SECTION_BEGIN) == 1 and "second" in text and "first" not in text

    bench = _load("peers_bench", BENCHMARKS / "peers" / "bench.py", monkeypatch)
    rewritten = bench.keep_hitratio_section(results, "# Peers\n\nnew tables\n")
    assert rewritten.startswith("# Peers\n\nnew tables\n\n" + hit_ratio)
    assert rewritten.endswith(section("second"))
    assert "old tables" not in rewritten


def test_the_e2e_section_reports_the_paired_ratio_and_is_replaced_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    e2e = _load("e2e_bench", BENCHMARKS / "e2e.py", monkeypatch)
    which = {
        "near": ("NearCache", {}),
        "redis": ("RedisCache", {}),
        "locmem": ("LocMemCache", {}),
    }
    # Paired rounds: the ratio is the median of the per-round ratios (4x, 2x, 3.5x), not the
    # ratio of the medians (the rounds ran under different load).
    rps = {"near": [400.0, 100.0, 700.0], "redis": [100.0, 50.0, 200.0], "locmem": [1.0] * 3}
    bad = {k: [0, 0, 0] for k in rps}
    args = e2e.argparse.Namespace(quick=False, procs=2, threads=4)
    monkeypatch.setattr(sys, "argv", ["e2e.py", "--rounds", "3", "--write-results"])
    lines = e2e.report(which, rps, bad, [], args, 3, 5.0, (1.0,) * 3, (2.0,) * 3, 10.0)
    text = "\n".join(lines)
    assert "| 3.50x | ≥ 3x | PASS |" in text
    assert "range 2.00x-4.00x" in text
    assert "    python benchmarks/e2e.py --rounds 3\n" in text
    assert "| LocMemCache | 1 | 1, 1, 1 | 0.01x |" in text
    rps["near"] = [250.0, 100.0, 500.0]  # 2.5x, 2x, 2.5x
    assert "| 2.50x | ≥ 3x | **FAIL** |" in "\n".join(
        e2e.report(which, rps, bad, [], args, 3, 5.0, (1.0,) * 3, (2.0,) * 3, 10.0)
    )

    results = tmp_path / "RESULTS.md"
    results.write_text("# Peers\n\nold tables\n")
    e2e.write_results(text + "\n", results)
    e2e.write_results(text.replace("3.50x", "9.99x") + "\n", results)
    out = results.read_text()
    assert out.startswith("# Peers\n\nold tables\n\n" + e2e.SECTION_BEGIN)
    assert out.count(e2e.SECTION_BEGIN) == 1 and "9.99x" in out and "3.50x" not in out

    bench = _load("peers_bench", BENCHMARKS / "peers" / "bench.py", monkeypatch)
    rewritten = bench.keep_hitratio_section(results, "# Peers\n\nnew tables\n")
    assert rewritten.rstrip("\n").endswith(e2e.SECTION_END) and "9.99x" in rewritten
