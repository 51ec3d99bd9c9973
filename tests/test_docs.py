"""The 'what happens to bad input' tables name tests that exist, so the docs cannot drift from
what is checked."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _named_tests(doc: Path) -> list[tuple[str, str | None]]:
    """``(test file, test name or None)`` for every `tests/...py[::name]` and `::name` in the
    tables; a bare `::name` belongs to the last file named before it."""
    found, current = [], None
    for line in doc.read_text().splitlines():
        if not line.startswith("|"):
            continue
        for ref in re.findall(r"`((?:tests/[\w/]+\.py)?(?:::\w+)?)`", line):
            file, _, name = ref.partition("::")
            current = file or current
            if current and (file or name):
                found.append((current, name or None))
    return found


def _defined(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}


@pytest.mark.parametrize("doc", ["docs/BAD_INPUT.md"])
def test_every_test_the_bad_input_table_names_exists(doc):
    refs = _named_tests(ROOT / doc)
    assert len(refs) > 30
    missing = [f"{f}::{n}" for f, n in refs if not (ROOT / f).is_file() or (n and n not in _defined(ROOT / f))]
    assert missing == []
