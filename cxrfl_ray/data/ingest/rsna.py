"""The ``rsna`` layout: RSNA Pneumonia Detection Challenge (stage 2) DICOMs and CSVs.

``stage_2_train_images/<patientId>.dcm``, ``stage_2_detailed_class_info.csv``
(``patientId,class``; several rows per patient, deduplicated) and ``stage_2_train_labels.csv``
(``patientId,x,y,width,height,Target``; the opacity boxes, kept). Labels follow the paper:
0 Normal, 1 No Lung Opacity / Not Normal, 2 Lung Opacity.
"""

from __future__ import annotations

from pathlib import Path

from cxrfl_ray.data.fields import clean
from cxrfl_ray.data.ingest.pipeline import Candidate, Note, Skip, make_id
from cxrfl_ray.data.ingest.table import encoding_note, read_table, require_dir
from cxrfl_ray.data.schema import RSNA_LABELS

LABEL_NAMES = RSNA_LABELS


def _float(value: str | None) -> float | None:
    try:
        return float(value) if clean(value) is not None else None
    except ValueError:
        return None


def scan(
    root: Path,
    *,
    source: str = "rsna",
    images: Path | None = None,
    class_csv: Path | None = None,
    labels_csv: Path | None = None,
) -> list[Candidate | Skip]:
    require_dir(root, "source")
    images = require_dir(images or root / "stage_2_train_images", "RSNA image")
    class_csv = class_csv or root / "stage_2_detailed_class_info.csv"
    labels_csv = labels_csv or root / "stage_2_train_labels.csv"
    class_rows = read_table(class_csv, ("patient_id", "label"))
    box_rows = read_table(labels_csv, ("patient_id", "x", "y", "width", "height", "Target"))
    out: list[Candidate | Skip | Note] = encoding_note(class_csv, class_rows) + encoding_note(labels_csv, box_rows)
    classes: dict[str, str] = {}
    conflicts: set[str] = set()
    for r in class_rows:
        pid, cls = clean(r["patient_id"]), clean(r["label"])
        if pid is None:
            continue
        if pid in classes and classes[pid] != cls:
            conflicts.add(pid)
        classes.setdefault(pid, cls or "")
    boxes: dict[str, list[dict[str, float]]] = {}
    for r in box_rows:
        pid = clean(r["patient_id"])
        coords = [_float(r[k]) for k in ("x", "y", "width", "height")]
        if pid and clean(r["Target"]) == "1" and None not in coords:
            x, y, w, h = coords
            boxes.setdefault(pid, []).append({"x": x, "y": y, "width": w, "height": h})

    found: set[str] = set()
    for dcm in sorted(images.glob("*.dcm")):
        pid = dcm.stem
        found.add(pid)
        if pid in conflicts:
            out.append(Skip(str(dcm), f"patient {pid} has conflicting classes in the class CSV"))
            continue
        if pid not in classes:
            out.append(Skip(str(dcm), f"patient {pid} has no class in the class CSV"))
            continue
        out.append(
            Candidate(
                id=make_id(source, dcm.name),  # the file name: a patientId with dots keeps them
                relative=dcm.name,
                image_path=dcm,
                label_name=classes[pid],
                patient_id=pid,
                boxes=boxes.get(pid, []),
            )
        )
    for pid in sorted(set(classes) - found):
        out.append(Skip(str(images / f"{pid}.dcm"), "listed in the class CSV but the DICOM is missing"))
    return out
