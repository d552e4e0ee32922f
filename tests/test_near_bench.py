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


def test_the_compress_sections_are_replaced_in_place_and_survive_a_peers_rewrite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bench = _load("compress_bench", BENCHMARKS / "compress.py", monkeypatch)
    titles = {"near": "NearCache", "near_zstd": "NearCache zstd"}
    res = {
        name: {
            "bytes": {"near": 1000, "near_zstd": 250},
            "miss": {"near": 40_000.0, "near_zstd": 42_000.0},
            "set": {"near": 50_000.0, "near_zstd": 70_000.0},
            "pickle": 990,
            "loads": 1000.0,
            "fill": 500.0,
        }
        for name in ("page", "dict")
    }
    args = bench.argparse.Namespace(quick=True)
    text = "\n".join(bench.report(res, titles, args, 5, (1.0,) * 3, 3.0, "versions")) + "\n"
    assert "| NearCache zstd | 250 | 25% | 42.0 µs | 70.0 µs |" in text
    assert "    python benchmarks/compress.py --quick\n" in text
    results = tmp_path / "RESULTS.md"
    results.write_text("# Peers\n\nold tables\n")
    bench.write_results(text, results)
    bench.write_results(text.replace("42.0 µs", "43.0 µs"), results)
    out = results.read_text()
    assert out.count(bench.SECTION_BEGIN) == 1 and "43.0 µs" in out and "42.0 µs" not in out
    peers = _load("peers_bench", BENCHMARKS / "peers" / "bench.py", monkeypatch)
    rewritten = peers.keep_hitratio_section(results, "# Peers\n\nnew tables\n")
    assert rewritten.rstrip("\n").endswith(bench.SECTION_END) and "43.0 µs" in rewritten

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{bench.README_BEGIN}\n{bench.README_END}\nrest\n")
    table = "\n".join(bench.readme_table(res, titles)) + "\n"
    bench.write_results(table, readme, bench.README_BEGIN, bench.README_END)
    bench.write_results(table, readme, bench.README_BEGIN, bench.README_END)
    out = readme.read_text()
    assert out.startswith("intro\n") and out.endswith("\nrest\n")
    assert out.count("| NearCache zstd | 250 | 42.0 µs | 250 | 42.0 µs |") == 1
    # The payloads are what the README says they are.
    assert 19_000 <= len(bench.html_page()) <= 20_000
    assert 100_000 <= len(bench.pickle.dumps(bench.json_dict(), 5)) <= 101_000
