"""The ingestion pipeline shared by every source layout.

A layout module only lists ``Candidate`` rows (paths + labels + metadata) and ``Skip`` entries;
this module decodes, validates, downscales, encodes and writes them, so every layout gets the
same checks: unreadable or empty images, masks of the wrong size, labels outside the label set,
duplicate ids. Bad rows are skipped and listed; good rows always land.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from tqdm import tqdm

from cxrfl_ray.data.imageio import ImageReadError, downscale, encode_png, read_image
from cxrfl_ray.data.schema import NO_LABEL
from cxrfl_ray.data.splits import patient_split
from cxrfl_ray.data.writer import DatasetWriter


class IngestError(ValueError):
    """Bad input that stops ingestion at once (missing folder, CSV, column; or --strict)."""


@dataclass
class Candidate:
    """One image a layout found, before it is decoded."""

    id: str
    image_path: Path
    label_name: str | None = None  # None: the image has no label
    mask_paths: tuple[Path, ...] = ()  # several are merged (e.g. left + right lung)
    patient_id: str | None = None
    site: str | None = None
    split: str | None = None
    view: str | None = None
    sex: str | None = None
    age: float | None = None
    boxes: list[dict[str, float]] | None = None
    source: str | None = None  # the source folder's name when one dataset joins several


@dataclass
class Skip:
    """A source entry that cannot become a row, with the reason."""

    path: str
    reason: str


@dataclass
class IngestOptions:
    """How rows are made; shared by every layout.

    Parameters
    ----------
    label_names : the label set (index = label); None infers the sorted set of seen labels.
    max_size : downscale so the longer side is at most this (aspect kept; masks nearest).
    strict : any skipped file is an error.
    val_frac, test_frac, seed : patient-level split for rows whose layout gives none.
    resize_masks : resize masks whose size differs from the image (else the row is skipped).
    workers : decoding threads (Pillow and zlib release the GIL).
    """

    label_names: Sequence[str] | None = None
    max_size: int | None = None
    strict: bool = False
    val_frac: float = 0.1
    test_frac: float = 0.2
    seed: int = 0
    resize_masks: bool = False
    workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))
    progress: bool = True


def read_mask(paths: Sequence[Path], shape: tuple[int, int] | None, resize: bool) -> np.ndarray:
    """Merge one or more binary mask files into one 0/255 uint8 mask of ``shape``."""
    merged = None
    for path in paths:
        arr = read_image(path)
        if arr.dtype != np.uint8:
            arr = (arr >> 8).astype(np.uint8)
        part = arr > 127
        if shape is not None and part.shape != shape:
            if not resize:
                raise ImageReadError(
                    f"mask {path.name} is {part.shape[1]}x{part.shape[0]} but the image is "
                    f"{shape[1]}x{shape[0]} (use --resize-masks to resize masks)"
                )
            from PIL import Image

            img = Image.fromarray(part.astype(np.uint8) * 255).resize(
                (shape[1], shape[0]), Image.Resampling.NEAREST
            )
            part = np.asarray(img) > 127
        merged = part if merged is None else (merged | part)
        if merged.shape != part.shape:
            raise ImageReadError(f"mask parts {[p.name for p in paths]} differ in size")
    assert merged is not None
    return (merged.astype(np.uint8) * 255)


def _make_row(c: Candidate, label: int, split: str, source: str, opts: IngestOptions) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    image = read_image(c.image_path, meta)
    if image.size == 0 or min(image.shape) < 2:
        raise ImageReadError(f"image has no pixels (shape {image.shape})")
    mask = read_mask(c.mask_paths, image.shape, opts.resize_masks) if c.mask_paths else None
    boxes = c.boxes
    if opts.max_size and max(image.shape) > opts.max_size:
        h0, w0 = image.shape
        image = downscale(image, opts.max_size)
        if mask is not None:
            mask = downscale(mask, opts.max_size, nearest=True)
        if boxes:
            sy, sx = image.shape[0] / h0, image.shape[1] / w0
            boxes = [
                {"x": b["x"] * sx, "y": b["y"] * sy, "width": b["width"] * sx, "height": b["height"] * sy}
                for b in boxes
            ]
    source = c.source or source
    return {
        "id": c.id,
        "source": source,
        "site": c.site or source,
        "patient_id": c.patient_id or meta.get("patient_id") or c.id,
        "split": split,
        "label": label,
        "label_name": c.label_name,
        "image": encode_png(image),
        "height": int(image.shape[0]),
        "width": int(image.shape[1]),
        "bit_depth": 16 if image.dtype == np.uint16 else 8,
        "mask": encode_png(mask) if mask is not None else None,
        "view": c.view or meta.get("view"),
        "sex": c.sex or meta.get("sex"),
        "age": c.age if c.age is not None else meta.get("age"),
        "original_path": str(c.image_path),
        "boxes": boxes,
    }


def infer_label_names(entries: Iterable[Candidate | Skip]) -> list[str]:
    return sorted({e.label_name for e in entries if isinstance(e, Candidate) and e.label_name})


def ingest(
    entries: Iterable[Candidate | Skip],
    out: str | Path,
    *,
    name: str,
    source: str,
    options: IngestOptions,
    sources: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Decode and write ``entries`` into the dataset folder ``out``; returns its card."""
    entries = list(entries)
    label_names = list(options.label_names) if options.label_names else infer_label_names(entries)
    label_index = {n: i for i, n in enumerate(label_names)}
    opts = options

    def check(e: Candidate | Skip, writer: DatasetWriter, pending: set[str]) -> Skip | tuple:
        if isinstance(e, Skip):
            return e
        if writer.has_id(e.id) or e.id in pending:
            return Skip(str(e.image_path), f"duplicate id {e.id!r}")
        if e.label_name is None:
            label = NO_LABEL
        elif e.label_name in label_index:
            label = label_index[e.label_name]
        else:
            return Skip(str(e.image_path), f"label {e.label_name!r} is not in the label set {label_names}")
        pid = e.patient_id or e.id
        split = e.split or patient_split(pid, opts.seed, opts.val_frac, opts.test_frac)
        pending.add(e.id)
        return (e, label, split)

    def load(item: Skip | tuple) -> Skip | dict[str, Any]:
        if isinstance(item, Skip):
            return item
        e, label, split = item
        try:
            return _make_row(e, label, split, source, opts)
        except ImageReadError as exc:
            return Skip(str(e.image_path), str(exc))

    extra = {"ingest": {"max_size": opts.max_size, "seed": opts.seed, "val_frac": opts.val_frac,
                        "test_frac": opts.test_frac}}
    with DatasetWriter(out, name=name, label_names=label_names, sources=sources, extra=extra) as writer:
        pending: set[str] = set()
        checked = [check(e, writer, pending) for e in entries]
        with ThreadPoolExecutor(max(1, opts.workers)) as pool:
            results = pool.map(load, checked)
            bar = tqdm(results, total=len(checked), desc=f"ingest {name}", unit="img",
                       disable=not opts.progress, leave=False)
            for result in bar:
                if isinstance(result, Skip):
                    if opts.strict:
                        raise IngestError(f"--strict: {result.path}: {result.reason}")
                    writer.skip(result.path, result.reason)
                else:
                    writer.add(result)
        card = writer.card()
    return card


_SAFE = re.compile(r"[^A-Za-z0-9._/\-]+")


def make_id(source: str, relative: str | Path) -> str:
    """A stable row id: ``source:relative/path/stem`` (extension dropped)."""
    rel = Path(relative)
    stem = rel.with_suffix("").as_posix() if rel.suffix else rel.as_posix()
    return f"{source}:{_SAFE.sub('_', stem)}"
