"""Apply a trained checkpoint to new images: masks as PNGs at the input size, one distinct file
per input, listed in ``masks.csv`` (segmentation), or class probabilities in a CSV
(classification). Inputs: a dataset folder, a folder of PNG/JPEG/DICOM files, or one file.
``overlay`` draws some of the masks on their images (``overlays.png``), to see what was predicted."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as nnf

from cxrfl_ray.data.imageio import ImageReadError, decode_png, encode_png, read_image
from cxrfl_ray.data.ingest.lungseg import IMAGE_SUFFIXES
from cxrfl_ray.data.store import open_dataset
from cxrfl_ray.data.torch_dataset import ClientImages, model_input
from cxrfl_ray.data.writer import CARD_NAME
from cxrfl_ray.pictures import MAX_PANELS
from cxrfl_ray.tasks.checkpoint import load_checkpoint
from cxrfl_ray.tasks.training import select_device


def iter_inputs(source: Path, skipped: list[dict]) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, pixels)`` for each image of a dataset, a folder or a file; unreadable files are
    appended to ``skipped``."""
    if (source / CARD_NAME).is_file():
        ds = open_dataset(source)
        for start in range(0, ds.num_rows, 256):
            table = ds.take(np.arange(start, min(ds.num_rows, start + 256)), ["id", "image"])
            for rid, data in zip(table.column("id").to_pylist(), table.column("image").to_pylist()):
                yield rid, decode_png(data)
        return
    if source.is_file():
        files = [source]
    elif source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        raise FileNotFoundError(f"input not found: {source}")
    for path in files:
        try:
            yield str(path.relative_to(source) if source.is_dir() else path.name), read_image(path)
        except ImageReadError as exc:
            skipped.append({"path": str(path), "reason": str(exc)})


def _mask_name(name: str) -> str:
    return name.replace(":", "_").replace("/", "__").rsplit(".", 1)[0] + "_mask.png"


def unique_mask_name(name: str, used: set[str]) -> str:
    """The mask file for input ``name``, distinct from every name in ``used`` (then added to it).

    Flattening folders and dropping the extension maps ``x.png`` and ``x.jpg``, or ``sub/b.png``
    and ``sub__b.png``, to one file; the later one gets a short hash of its own name, so the same
    inputs always give the same files and none overwrites another."""
    candidate = _mask_name(name)
    if candidate in used:
        stem = candidate[: -len("_mask.png")]
        digest = hashlib.sha1(name.encode()).hexdigest()
        candidate = f"{stem}-{digest[:8]}_mask.png"
        n = 1
        while candidate in used:  # only a crafted name can take a hashed one first
            candidate, n = f"{stem}-{digest[:8]}-{n}_mask.png", n + 1
    used.add(candidate)
    return candidate


def write_overlays(model, cfg, source: Path, out: Path, rows: list[list], n: int, device) -> list | None:
    """``overlays.png``: the written masks' outlines on ``n`` of the inputs, drawn from the
    checkpoint's seed. A dataset whose every row has a lung mask is scored as the task scores it
    instead (the model's own input size, ``pictures.segmentation_panels``): the true outline too, each
    image's Jaccard, worst first. Returns the panels in drawn order; None where matplotlib is
    missing (said in the log)."""
    from cxrfl_ray import pictures

    if pictures.pyplot() is None:
        return None
    picked = pictures.choose(np.arange(len(rows)), n, cfg.seed)  # dataset inputs: index = row
    dataset = open_dataset(source) if (source / CARD_NAME).is_file() else None
    if dataset is not None and dataset.card.get("num_masks", 0) == dataset.num_rows:
        images = ClientImages(dataset, picked, task="segmentation", size=cfg.data.size, channels=cfg.data.channels,
                              normalize=cfg.data.normalization)
        panels = pictures.segmentation_panels(model, images, device)
    else:
        if dataset is not None:
            pixels = [decode_png(b) for b in dataset.take(picked, ["image"]).column("image").to_pylist()]
        else:
            pixels = [read_image(source / rows[i][0] if source.is_dir() else source) for i in picked]
        side = pictures.MAX_SIDE  # inputs may be 3000 px a side: kept at the size drawn
        panels = pictures.overlay_panels([rows[i][0] for i in picked], [pictures.fit(p, side) for p in pixels],
                                         [pictures.fit(read_image(out / rows[i][1]) > 127, side) for i in picked])
    pictures.draw_overlays(out / "overlays.png", panels, f"{source.name}: {len(panels)} of {len(rows)} images")
    return panels


@torch.no_grad()
def predict(checkpoint: str | Path, source: str | Path, out: str | Path, batch_size: int = 16,
            threshold: float = 0.5, device: str = "auto", overlay: int = 0) -> dict:
    """Run the checkpoint over ``source``; returns a small summary (counts, paths).

    ``overlay``: also draw ``overlays.png`` of this many seeded inputs (segmentation only)."""
    source = Path(source)
    if not source.exists():  # before --out is made: a typo leaves nothing behind
        raise FileNotFoundError(f"input not found: {source}")
    if not 0 <= overlay <= MAX_PANELS:
        raise ValueError(f"--overlay {overlay}: the number of images to draw must be 0 to {MAX_PANELS}")
    dev = select_device(device)
    model, cfg, meta = load_checkpoint(checkpoint, device=dev)
    model.eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = json.loads(meta["label_names"])
    skipped: list[dict] = []
    rows: list[list] = []
    used: set[str] = set()
    count = 0
    batch: list[tuple[str, np.ndarray]] = []

    def flush() -> None:
        nonlocal count
        x = torch.stack([model_input(p, cfg.data.size, cfg.data.channels, cfg.data.normalization) for _, p in batch])
        logits = model(x.to(dev)).float()
        if cfg.task == "segmentation":
            for (name, pixels), logit in zip(batch, logits):
                prob = nnf.interpolate(logit[None].sigmoid(), size=pixels.shape, mode="bilinear", align_corners=False)
                mask = (prob[0, 0] > threshold).cpu().numpy().astype(np.uint8) * 255
                file = unique_mask_name(name, used)
                (out / file).write_bytes(encode_png(mask))
                rows.append([name, file])
        else:
            for (name, _), p in zip(batch, logits.softmax(dim=1).cpu().numpy()):
                rows.append([name, *[f"{v:.6f}" for v in p], labels[int(p.argmax())] if labels else int(p.argmax())])
        count += len(batch)
        batch.clear()

    for item in iter_inputs(source, skipped):
        batch.append(item)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    result = {"task": cfg.task, "images": count, "skipped": skipped, "out": str(out)}
    if cfg.task == "classification":
        names = labels or [str(i) for i in range(int(meta["num_classes"]))]
        with open(out / "predictions.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["image", *[f"p_{n}" for n in names], "predicted"])
            writer.writerows(rows)
        result["csv"] = str(out / "predictions.csv")
    else:  # which input each mask belongs to (names are flattened, and made unique)
        with open(out / "masks.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["image", "mask"])
            writer.writerows(rows)
        result["csv"] = str(out / "masks.csv")
        panels = write_overlays(model, cfg, source, out, rows, overlay, dev) if overlay and rows else None
        if panels is not None:
            result["overlays"] = {"path": str(out / "overlays.png"),
                                  "images": [{"id": p.id, "jaccard": p.jaccard} for p in panels]}
    if skipped:
        with open(out / "skipped.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["path", "reason"])
            writer.writeheader()
            writer.writerows(skipped)
    return result
