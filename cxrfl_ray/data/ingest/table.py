"""Reading label CSVs with column names mapped to our canonical fields."""

from __future__ import annotations

import codecs
import csv
import io
from pathlib import Path
from typing import Mapping, Sequence

from cxrfl_ray.data.ingest.pipeline import IngestError, Note

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


# Tried in order: UTF-8 (with or without a BOM), then the Windows and ISO Latin code pages that
# hospital and spreadsheet exports use; latin-1 maps every byte, so it is the last resort.
FALLBACK_ENCODINGS = ("cp1252", "latin-1")


class Rows(list):
    """A CSV's rows, and the encoding it was read with (``utf-8`` unless it had to fall back)."""

    encoding = "utf-8"


def decode_csv(path: Path) -> tuple[str, str]:
    """``(text, encoding)`` of a CSV file; IngestError naming the file where it is not text."""
    data = path.read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        text, encoding = data.decode("utf-16"), "utf-16"
    else:
        try:
            text, encoding = data.decode("utf-8-sig"), "utf-8"
        except UnicodeDecodeError:
            for encoding in FALLBACK_ENCODINGS:
                try:
                    text = data.decode(encoding)
                    break
                except UnicodeDecodeError:
                    continue
    if "\x00" in text:
        raise IngestError(
            f"{path}: not a text CSV (it holds NUL bytes: a spreadsheet or another binary file?); "
            f"save it as CSV, UTF-8"
        )
    return text, encoding


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
    text, encoding = decode_csv(path)
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        header = [h.strip() for h in (reader.fieldnames or [])]
        rows = [{(k or "").strip(): v for k, v in r.items()} for r in reader]
    except csv.Error as exc:
        raise IngestError(f"{path}: not a readable CSV ({exc})") from None
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
    out = Rows({f: r.get(col) for f, col in mapping.items()} for r in rows)
    out.encoding = encoding
    return out


def encoding_note(path: Path, rows: Rows) -> list[Note]:
    """A card note where a CSV was not UTF-8 (its text was decoded with a fallback code page)."""
    if rows.encoding == "utf-8":
        return []
    return [Note(str(path), f"not UTF-8: decoded as {rows.encoding}")]
