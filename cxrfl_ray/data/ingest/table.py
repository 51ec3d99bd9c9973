"""Reading label CSVs with column names mapped to our canonical fields."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Mapping, Sequence

from cxrfl_ray.data.ingest.pipeline import IngestError

# Spellings seen in public chest X-ray collections, tried in order when no mapping is given.
ALIASES: dict[str, tuple[str, ...]] = {
    "filename": ("filename", "file", "image", "Image Index", "path", "imageid"),
    "label": ("label", "class", "Finding Labels", "finding"),
    "mask_file": ("mask_file", "mask", "mask_path"),
    "patient_id": ("patient_id", "patientid", "patientId", "Patient ID", "subject_id"),
    "site": ("site", "hospital", "center", "centre", "institution"),
    "split": ("split", "fold", "train"),
    "view": ("view", "View Position", "ViewPosition", "projection"),
    "sex": ("sex", "Patient Gender", "gender", "PatientSex"),
    "age": ("age", "Patient Age", "PatientAge"),
}


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise IngestError(f"{what} folder not found: {path}")
    return path


def read_table(
    path: Path,
    required: Sequence[str],
    optional: Sequence[str] = (),
    columns: Mapping[str, str] | None = None,
) -> list[dict[str, str | None]]:
    """Rows of a CSV keyed by canonical field names.

    ``columns`` maps a canonical field to the CSV's own column name (``--column
    patient_id=patientid``); otherwise the first alias present is used. A missing CSV or
    required column stops at once with a message that names it.
    """
    columns = dict(columns or {})
    if not path.is_file():
        raise IngestError(f"label CSV not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        rows = [{(k or "").strip(): v for k, v in r.items()} for r in reader]
    unknown = [f for f in columns if f not in ALIASES]
    if unknown:
        raise IngestError(f"--column names unknown field(s) {unknown}; known: {sorted(ALIASES)}")
    mapping: dict[str, str] = {}
    for field in list(required) + list(optional):
        if field in columns:
            if columns[field] not in header:
                raise IngestError(
                    f"{path}: column {columns[field]!r} (mapped to {field}) not found; "
                    f"columns are {header}"
                )
            mapping[field] = columns[field]
            continue
        lower = {h.lower(): h for h in header}
        hit = next((lower[a.lower()] for a in ALIASES.get(field, (field,)) if a.lower() in lower), None)
        if hit is not None:
            mapping[field] = hit
        elif field in required:
            raise IngestError(
                f"{path}: required column {field!r} not found (columns are {header}); "
                f"map it with --column {field}=NAME"
            )
    return [{f: r.get(col) for f, col in mapping.items()} for r in rows]
