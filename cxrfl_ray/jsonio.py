"""Strict JSON for every file we write: ``NaN``/``Infinity`` are not JSON (``json.dumps`` writes
them anyway, and other tools then refuse the file), so a missing or non-finite number is ``null``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float, at any depth, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` that never writes ``NaN``/``Infinity`` (they become null)."""
    return json.dumps(finite_or_none(value), allow_nan=False, **kwargs)


def write_json(path: str | Path, value: Any, indent: int | None = 2) -> Path:
    """Write ``value`` as strict JSON (and a final newline) to ``path``."""
    path = Path(path)
    path.write_text(dumps(value, indent=indent) + "\n")
    return path
