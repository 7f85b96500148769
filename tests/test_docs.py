"""The docs name every registered method (guards the methods page against drift)."""

from pathlib import Path

from graft.merge import METHODS

ROOT = Path(__file__).resolve().parents[1]


def test_methods_page_covers_every_method():
    text = (ROOT / "docs" / "methods.md").read_text()
    missing = [m for m in METHODS if f"## `{m}`" not in text]
    assert not missing


def test_readme_quick_start_matches_ci():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash run.sh demo" in readme and "bash run.sh test" in readme
    assert "run.sh test" in ci
