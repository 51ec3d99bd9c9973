"""The ingestion pipeline shared by every source layout.

A layout module only lists ``Candidate`` rows (paths + labels + metadata) and ``Skip`` entries;
this module decodes, validates, downscales, encodes and writes them, so every layout gets the
same checks: unreadable or empty images, masks of the wrong size, labels outside the label set,
duplicate files. Bad rows are skipped and listed; good rows always land. Rows that land but look
wrong (a constant image, a mask that cannot be a lung mask, which is then dropped) are flagged
in the card with the reason.
"""

from __future__ import annotations

import hashlib
import os
import unicodedata
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


class MaskRejected(ValueError):
    """A mask file that decodes but cannot be a lung mask: the image is kept, the mask dropped
    and the row flagged, so a bad mask is never stored as "no lungs"."""


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
    relative: str | None = None  # the path the id was made from (see ``assign_ids``)


@dataclass
class Skip:
    """A source entry that cannot become a row, with the reason."""

    path: str
    reason: str


@dataclass
class Note:
    """Something about a source file the card should say (e.g. a CSV read as cp1252)."""

    path: str
    note: str


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


def mask_part(arr: np.ndarray, name: str) -> np.ndarray:
    """The lung pixels of one decoded mask file: any two-valued {0, m} mask (0/1, 0/255,
    0/65535, ...), 8- or 16-bit. More levels (soft, anti-aliased or label-coded masks) or a
    nonzero background are ambiguous: MaskRejected rather than a guessed threshold."""
    levels = np.unique(arr)
    if levels.size > 2 or (levels.size == 2 and levels[0] != 0):
        shown = ", ".join(str(int(v)) for v in levels[:5]) + (", ..." if levels.size > 5 else "")
        jpeg = " (JPEG blurs a mask's edges: store masks as PNG)" if Path(name).suffix.lower() in (".jpg", ".jpeg") else ""
        raise MaskRejected(
            f"mask {name} has {levels.size} distinct values ({shown}); a lung mask has 0 and one "
            f"positive value (soft, anti-aliased or label-coded masks are not guessed at){jpeg}"
        )
    return arr == levels[-1] if levels[-1] != 0 else np.zeros(arr.shape, dtype=bool)


def read_mask(paths: Sequence[Path], shape: tuple[int, int] | None, resize: bool) -> np.ndarray:
    """Merge one or more binary mask files into one 0/255 uint8 mask of ``shape``.

    ImageReadError (the row is skipped) for an unreadable mask or one of the wrong size;
    MaskRejected (the mask is dropped, the row flagged) for values that are not a binary mask
    and for a merged mask that is empty or covers the whole image."""
    merged = None
    for path in paths:
        arr = read_image(path)
        if shape is not None and arr.shape != shape:
            if not resize:
                raise ImageReadError(
                    f"mask {path.name} is {arr.shape[1]}x{arr.shape[0]} but the image is "
                    f"{shape[1]}x{shape[0]} (use --resize-masks to resize masks)"
                )
            part = mask_part(arr, path.name)
            from PIL import Image

            img = Image.fromarray(part.astype(np.uint8) * 255).resize(
                (shape[1], shape[0]), Image.Resampling.NEAREST
            )
            part = np.asarray(img) > 127
        else:
            part = mask_part(arr, path.name)
        if merged is not None and merged.shape != part.shape:
            raise ImageReadError(f"mask parts {[p.name for p in paths]} differ in size")
        merged = part if merged is None else (merged | part)
    assert merged is not None
    names = " + ".join(p.name for p in paths)
    if not merged.any():
        raise MaskRejected(f"mask {names} is empty (no lung pixels)")
    if merged.all():
        raise MaskRejected(f"mask {names} covers the whole image (no background)")
    return merged.astype(np.uint8) * np.uint8(255)


def _make_row(c: Candidate, label: int, split: str, source: str,
              opts: IngestOptions) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """The row of one candidate and its flags (rows kept, but the card says what looks wrong)."""
    meta: dict[str, Any] = {}
    flags: list[dict[str, str]] = []
    image = read_image(c.image_path, meta)
    if image.size == 0 or min(image.shape) < 2:
        h, w = image.shape if image.ndim == 2 else (0, 0)
        raise ImageReadError(f"image is {w}x{h} pixels: too small to be a radiograph")
    if image.min() == image.max():
        flags.append({"id": c.id, "path": str(c.image_path),
                      "reason": f"image is constant (every pixel is {int(image.flat[0])}): blank or a failed export"})
    mask = None
    if c.mask_paths:
        try:
            mask = read_mask(c.mask_paths, image.shape, opts.resize_masks)
        except MaskRejected as exc:
            flags.append({"id": c.id, "path": ", ".join(str(p) for p in c.mask_paths),
                          "reason": f"{exc}: mask dropped, image kept"})
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
    }, flags


def infer_label_names(entries: Iterable[Candidate | Skip | Note]) -> list[str]:
    return sorted({e.label_name for e in entries if isinstance(e, Candidate) and e.label_name})


def _file_key(path: Path) -> str:
    """One key per file on disk, however a CSV spells its path (``images/x.png`` or ``x.png``)."""
    return os.path.realpath(path)


def ingest(
    entries: Iterable[Candidate | Skip | Note],
    out: str | Path,
    *,
    name: str,
    source: str,
    options: IngestOptions,
    sources: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Decode and write ``entries`` into the dataset folder ``out``; returns its card."""
    entries = list(entries)
    notes = [e for e in entries if isinstance(e, Note)]
    entries = [e for e in entries if not isinstance(e, Note)]
    label_names = list(options.label_names) if options.label_names else infer_label_names(entries)
    label_index = {n: i for i, n in enumerate(label_names)}
    opts = options

    def check(e: Candidate | Skip, pending: dict[str, str], files: dict[str, str]) -> Skip | tuple:
        if isinstance(e, Skip):
            return e
        key = _file_key(e.image_path)
        if e.id in pending:
            why = "the file is listed twice" if pending[e.id] == key else f"{pending[e.id]} has it"
            return Skip(str(e.image_path), f"duplicate id {e.id!r} ({why})")
        if key in files:
            return Skip(str(e.image_path), f"duplicate: the same file as row {files[key]!r} (listed twice)")
        if e.label_name is None:
            label = NO_LABEL
        elif e.label_name in label_index:
            label = label_index[e.label_name]
        else:
            return Skip(str(e.image_path), f"label {e.label_name!r} is not in the label set {label_names}")
        pid = e.patient_id or e.id
        split = e.split or patient_split(pid, opts.seed, opts.val_frac, opts.test_frac)
        pending[e.id] = key
        files[key] = e.id
        return (e, label, split)

    def load(item: Skip | tuple) -> Skip | tuple[dict[str, Any], list[dict[str, str]]]:
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
        for n in notes:
            writer.note(n.path, n.note)
        pending: dict[str, str] = {}
        files: dict[str, str] = {}
        checked = [check(e, pending, files) for e in entries]
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
                    row, flags = result
                    writer.add(row)
                    for f in flags:
                        writer.flag(f["id"], f["path"], f["reason"])
        card = writer.card()
    return card


# Characters an id keeps as they are: ASCII ones ids always had, and Unicode letters, marks and
# digits (so 正常.png and 肺炎.png stay apart). Anything else is normalised to "_" and the id
# gets a hash of the original path, so two names that normalise alike still differ.
_ASCII_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._/-")
HASH_SEP = "~"  # never in a kept name (it is normalised), so a hashed id never equals a plain one


def _id_path(relative: str | Path) -> str:
    """The relative path as ids see it (``./a//b.png`` is ``a/b.png``)."""
    return Path(relative).as_posix()


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:10]


def _kept(ch: str) -> bool:
    return ch in _ASCII_SAFE or unicodedata.category(ch)[0] in "LMN"


def _id_body(text: str, original: str, force_hash: bool = False) -> str:
    """``text`` with each run of other characters as one ``_``; hashed if anything changed."""
    out: list[str] = []
    in_run = False
    for ch in text:
        if _kept(ch):
            out.append(ch)
            in_run = False
        elif not in_run:
            out.append("_")
            in_run = True
    body = "".join(out)
    if body != text or force_hash:
        body += HASH_SEP + _short_hash(original)
    return body


def make_id(source: str, relative: str | Path, keep_suffix: bool = False, force_hash: bool = False) -> str:
    """A stable row id: ``source:relative/path/stem`` (extension dropped unless ``keep_suffix``).

    Names of ASCII letters, digits and ``._-/`` and of Unicode letters/digits are kept as they
    are; a name with anything else (spaces, brackets, ...) is normalised and gets ``~`` and a
    10-hex hash of the original relative path, so ``with space.png`` and ``with_space.png``
    differ. ``assign_ids`` settles what still collides (``x.png`` / ``x.jpg``)."""
    rel = Path(relative)
    path = rel.as_posix()
    stem = path if keep_suffix or not rel.suffix else rel.with_suffix("").as_posix()
    return f"{source}:{_id_body(stem, path, force_hash)}"


def assign_ids(entries: list[Candidate | Skip | Note], source: str) -> list[Candidate | Skip | Note]:
    """Give every distinct file of one source a distinct id (candidates' ``relative``), in place.

    An id made by ``make_id`` that only one relative path has is kept (ids of ordinary names
    never change). A group of distinct paths that share an id keeps the extension
    (``x.png`` -> ``src:x.png``, ``x.jpg`` -> ``src:x.jpg``); where even that is taken, by another
    file or within the group, the path's hash is added. The same path listed twice keeps one
    id: the pipeline skips the second as a duplicate. Depends only on the set of paths."""
    cands = [e for e in entries if isinstance(e, Candidate) and e.relative is not None]
    paths_of: dict[str, set[str]] = {}
    for c in cands:
        paths_of.setdefault(c.id, set()).add(_id_path(c.relative))
    taken = {i for i, paths in paths_of.items() if len(paths) == 1}
    clashing = sorted({p for paths in paths_of.values() if len(paths) > 1 for p in paths})
    if not clashing:
        return entries
    with_suffix = {p: make_id(source, p, keep_suffix=True) for p in clashing}
    uses: dict[str, int] = {}
    for i in with_suffix.values():
        uses[i] = uses.get(i, 0) + 1
    new = {p: (i if i not in taken and uses[i] == 1 else make_id(source, p, keep_suffix=True, force_hash=True))
           for p, i in with_suffix.items()}
    for c in cands:
        c.id = new.get(_id_path(c.relative), c.id)
    return entries
