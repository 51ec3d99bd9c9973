"""The ``manifest`` layout: ``images/``, optional ``masks/``, and a CSV of ``filename,label``.

Optional columns ``mask_file, patient_id, site, split, view, sex, age``; other column names are
mapped with ``--column field=name``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from cxrfl_ray.data.fields import clean, parse_age
from cxrfl_ray.data.ingest.pipeline import Candidate, Note, Skip, assign_ids, make_id
from cxrfl_ray.data.ingest.table import encoding_note, read_table, require_dir
from cxrfl_ray.data.splits import normalise_split

OPTIONAL = ("mask_file", "patient_id", "site", "split", "view", "sex", "age")
UNLABELED = ("", "unknown", "none", "nan")


def row_candidate(
    row: Mapping[str, str | None],
    *,
    source: str,
    images: Path,
    masks: Path | None,
    unlabeled: Sequence[str],
    root: Path | None = None,
) -> Candidate | Skip:
    """One CSV row as a Candidate, or a Skip naming the file that is missing.

    A path that is missing under ``images`` (or ``masks``) but exists under ``root`` is taken from
    there: many CSVs name files relative to their own folder (``images/x.png``)."""
    filename = clean(row.get("filename"))
    if filename is None:
        return Skip(str(images), "CSV row with an empty filename")
    image_path = _find(images, root, filename)
    if not image_path.is_file():
        return Skip(str(image_path), "file listed in the CSV is missing")
    mask_paths: tuple[Path, ...] = ()
    mask_file = clean(row.get("mask_file"))
    if mask_file:
        mask_path = _find(masks or images, root, mask_file)
        if not mask_path.is_file():
            return Skip(str(mask_path), f"mask listed in the CSV for {filename} is missing")
        mask_paths = (mask_path,)
    split = None
    raw_split = clean(row.get("split"))
    if raw_split is not None:
        split = normalise_split(raw_split)
        if split is None:
            return Skip(str(image_path), f"split value {raw_split!r} is not train/val/test")
    label = clean(row.get("label"))
    if label is not None and label.lower() in {u.lower() for u in unlabeled}:
        label = None
    return Candidate(
        id=make_id(source, filename),
        relative=filename,
        image_path=image_path,
        label_name=label,
        mask_paths=mask_paths,
        patient_id=clean(row.get("patient_id")),
        site=clean(row.get("site")),
        split=split,
        view=clean(row.get("view")),
        sex=clean(row.get("sex")),
        age=parse_age(row.get("age")),
    )


def _find(folder: Path, root: Path | None, name: str) -> Path:
    """``folder/name``, else ``root/name`` where that exists. For a missing file, the path it
    was meant to have: ``root/images/x.png`` for ``images/x.png`` (not ``images/images/x.png``)."""
    path = folder / name
    if path.is_file() or root is None:
        return path
    there = root / name
    if there.is_file() or (not path.parent.is_dir() and there.parent.is_dir()):
        return there
    return path


def scan(
    root: Path,
    *,
    source: str,
    csv: Path | None = None,
    images: Path | None = None,
    masks: Path | None = None,
    columns: Mapping[str, str] | None = None,
    unlabeled: Sequence[str] = UNLABELED,
) -> list[Candidate | Skip]:
    require_dir(root, "source")
    images = require_dir(images or root / "images", "images")
    masks = masks or (root / "masks")
    csv_path = csv or root / "labels.csv"
    rows = read_table(csv_path, ("filename", "label"), OPTIONAL, columns)
    out: list[Candidate | Skip | Note] = encoding_note(csv_path, rows)
    out += [
        row_candidate(r, source=source, images=images, masks=masks if masks.is_dir() else None,
                      unlabeled=unlabeled, root=root)
        for r in rows
    ]
    return assign_ids(out, source)
