"""The ``folders`` layout: one folder per class, such as the COVID-19 Radiography Database.

``<class>/images/*.png`` with optional ``<class>/masks/*.png`` (paired by file name or stem),
or plain ``<class>/*.png``. The label set is the sorted class folder names unless given.
"""

from __future__ import annotations

from pathlib import Path

from cxrfl_ray.data.ingest.lungseg import image_files, mask_key
from cxrfl_ray.data.ingest.pipeline import Candidate, IngestError, Skip, assign_ids, make_id
from cxrfl_ray.data.ingest.table import require_dir


def scan(root: Path, *, source: str) -> list[Candidate | Skip]:
    require_dir(root, "source")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise IngestError(f"no class folders in {root}")
    out: list[Candidate | Skip] = []
    for cls in classes:
        images = cls / "images" if (cls / "images").is_dir() else cls
        masks = cls / "masks" if (cls / "masks").is_dir() else None
        by_key = {mask_key(m): m for m in image_files(masks)} if masks else {}
        files = image_files(images)
        if not files:
            out.append(Skip(str(images), f"class folder {cls.name!r} holds no images"))
        for img in files:
            mask = by_key.get(img.stem) or by_key.get(mask_key(img))
            relative = f"{cls.name}/{img.name}"
            out.append(
                Candidate(
                    id=make_id(source, relative),
                    relative=relative,
                    image_path=img,
                    label_name=cls.name,
                    mask_paths=(mask,) if mask else (),
                )
            )
    return assign_ids(out, source)
