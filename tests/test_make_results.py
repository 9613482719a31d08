"""README's results tables: every committed results file with a section renders one, and README holds
what `make_results.py` would write now."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


@pytest.fixture(scope="module")
def make_results():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("make_results", ROOT / "benchmarks" / "make_results.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.mark.parametrize("name", ["detector.json", "detector-fast-cpu.json", "ablation.json", "incremental.json",
                                  "protocol.json", "serve.json", "memory.json", "scale.json"])
def test_each_committed_results_file_renders_a_titled_table(make_results, name: str) -> None:
    fn = dict(make_results.SECTIONS)[name]
    text = fn(make_results._load(RESULTS / name))
    assert isinstance(text, str) and text.startswith("### "), f"{name} renders no section"
    assert "|---|" in text, f"{name}'s section has no table"


def test_readme_holds_the_tables_the_results_give(make_results) -> None:
    readme = (ROOT / "README.md").read_text()
    start, end = readme.index(make_results.START), readme.index(make_results.END)
    assert readme[start + len(make_results.START):end].strip() == make_results.build(RESULTS).strip(), \
        "README's results section is stale: run python benchmarks/make_results.py --write README.md"
