"""The ``lungseg`` layout: lung segmentation collections, images paired with masks by stem.

Handles three shapes seen in public collections:
- an image folder and a mask folder paired by file stem, masks possibly suffixed ``_mask`` or
  ``-mask`` (e.g. ``1.jpg`` + ``1-mask.png``);
- Montgomery-style ``leftMask/`` + ``rightMask/`` folders, merged into one lung mask;
- the CXR-FL layout: ``images/*.jpeg``, ``masks/*.png`` and ``labels.csv`` with
  ``filename,class,train``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from cxrfl_ray.data.fields import clean
from cxrfl_ray.data.ingest.manifest import UNLABELED, row_candidate
from cxrfl_ray.data.ingest.pipeline import Candidate, IngestError, Note, Skip, assign_ids
from cxrfl_ray.data.ingest.table import encoding_note, read_table, require_dir

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm"}
IMAGE_DIRS = ("images", "image", "CXR_png", "imgs", "img")
MASK_DIRS = ("masks", "mask", "ManualMask")
_MASK_SUFFIX = re.compile(r"([_\-\s]?(mask|seg|lungs?))$", re.IGNORECASE)


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def mask_key(path: Path) -> str:
    """The image stem a mask belongs to: ``1-mask.png`` -> ``1``."""
    return _MASK_SUFFIX.sub("", path.stem)


def _first_dir(root: Path, names: Sequence[str]) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def _left_right(root: Path, masks: Path | None) -> tuple[Path, Path] | None:
    for base in filter(None, (masks, root / "ManualMask", root)):
        left, right = base / "leftMask", base / "rightMask"
        if left.is_dir() and right.is_dir():
            return left, right
    return None


def scan(
    root: Path,
    *,
    source: str,
    images: Path | None = None,
    masks: Path | None = None,
    csv: Path | None = None,
    columns: dict[str, str] | None = None,
    unlabeled: Sequence[str] = UNLABELED,
) -> list[Candidate | Skip]:
    require_dir(root, "source")
    images = images or _first_dir(root, IMAGE_DIRS)
    if images is None:
        raise IngestError(f"no image folder in {root} (looked for {', '.join(IMAGE_DIRS)}); pass --images")
    require_dir(images, "images")
    pairs = _left_right(root, masks)
    if pairs is None:
        masks = masks or _first_dir(root, MASK_DIRS)
        if masks is None:
            raise IngestError(f"no mask folder in {root} (looked for {', '.join(MASK_DIRS)}); pass --masks")
        require_dir(masks, "masks")
        by_key: dict[str, list[Path]] = {}
        for m in image_files(masks):
            by_key.setdefault(mask_key(m), []).append(m)
    labels_csv = csv or root / "labels.csv"
    rows = {}
    out: list[Candidate | Skip | Note] = []
    if labels_csv.is_file():
        table = read_table(labels_csv, ("filename",), ("label", "split", "patient_id", "site", "view", "sex", "age"), columns)
        rows = {Path(clean(r["filename"]) or "").name: r for r in table}
        out += encoding_note(labels_csv, table)

    used: set[Path] = set()
    for img in image_files(images):
        if pairs is not None:
            found = [side / img.name for side in pairs]
            missing = [str(p) for p in found if not p.is_file()]
            if missing:
                out.append(Skip(str(img), f"no lung mask: missing {', '.join(missing)}"))
                continue
        else:
            found = by_key.get(img.stem, [])
            if len(found) != 1:
                why = "no mask with the same stem" if not found else f"several masks match: {[m.name for m in found]}"
                out.append(Skip(str(img), why))
                continue
        used.update(found)
        row = dict(rows.get(img.name, {}))
        row["filename"] = img.name
        entry = row_candidate(row, source=source, images=images, masks=None, unlabeled=unlabeled)
        if isinstance(entry, Candidate):
            entry.mask_paths = tuple(found)
        out.append(entry)
    if pairs is None:
        out += [Skip(str(m), "mask without a matching image") for m in image_files(masks) if m not in used]
    return assign_ids(out, source)
