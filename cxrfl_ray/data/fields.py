"""Parsing of free-text metadata cells (CSV columns, DICOM header values)."""

from __future__ import annotations

import re
from typing import Any

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([YMWD]?)\s*$", re.IGNORECASE)
_YEARS_PER_UNIT = {"": 1.0, "Y": 1.0, "M": 12.0, "W": 52.1775, "D": 365.25}


def parse_age(value: Any) -> float | None:
    """Age in years from ``57``, ``57.5`` or DICOM-style ``057Y``/``006M``; else None."""
    if value is None:
        return None
    m = _AGE.match(str(value))
    if not m:
        return None
    return float(m.group(1)) / _YEARS_PER_UNIT[m.group(2).upper()]


def clean(value: Any) -> str | None:
    """Strip a cell; empty cells become None."""
    if value is None:
        return None
    text = str(value).strip()
    return text or None
