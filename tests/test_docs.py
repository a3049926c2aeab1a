"""The tables in docs/testing.md say what the committed code and results say (no hand-copied numbers)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTING = (ROOT / "docs" / "testing.md").read_text()


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"mutation_{name}", ROOT / "tests" / "mutation" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_mutation_table_is_the_committed_results() -> None:
    block = re.search(r"<!-- mutation-table -->\n(.*?)<!-- /mutation-table -->", TESTING, re.S)
    assert block, "docs/testing.md lost its <!-- mutation-table --> markers"
    expected = _module("run").results_table()
    assert block.group(1).strip() == expected, "run `python tests/mutation/run.py --table` and paste it"


def test_planted_bug_table_lists_every_bug_with_its_tests() -> None:
    for bug in _module("planted_bugs").BUGS:
        row = next((line for line in TESTING.splitlines() if line.startswith(f"| {bug.name} |")), None)
        assert row, f"docs/testing.md has no row for planted bug {bug.name}"
        assert f"| {bug.file} |" in row
        for test in bug.tests:
            assert f"`{test}`" in row, f"{bug.name}: {test} missing from its row"


def test_every_file_the_architecture_page_names_exists() -> None:
    """docs/architecture.md's maps name real files: a moved or renamed module must move on the page too."""
    page = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`((?:src|tests)/[\w/]+\.py)(?:::\w+)?`", page))
    named |= {f"src/dinov3ds/{path}" for path in re.findall(r"`((?:commands|training|models|data|heads|config|metrics)/[\w/]+\.py)`", page)}
    assert len(named) >= 40, sorted(named)
    assert sorted(path for path in named if not (ROOT / path).is_file()) == []
