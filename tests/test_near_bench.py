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
