"""Decoded images/s from a Parquet dataset against a folder of PNG files of the same images.

Both sides decode the same PNG bytes and resize to the same size in one process; the Parquet
side reads through the client's row view (memory-mapped row groups), the folder side opens one
file per image as a first implementation would. Also times ingestion (PNG folder -> dataset).
Ratios are measured in one run so they hold on a noisy machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import report, table  # noqa: E402
from cxrfl_ray.data.ingest import LAYOUTS, IngestOptions, ingest  # noqa: E402
from cxrfl_ray.data.synth import write_synthetic_dataset  # noqa: E402
from cxrfl_ray.data.imageio import decode_png  # noqa: E402
from cxrfl_ray.data.store import open_dataset  # noqa: E402
from cxrfl_ray.data.torch_dataset import ClientImages  # noqa: E402


class PngFolder(torch.utils.data.Dataset):
    """The straightforward way: one PNG file per image, opened with PIL each time."""

    def __init__(self, files: list[Path], size: int) -> None:
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        arr = np.asarray(Image.open(self.files[i]).convert("L"), dtype=np.float32) / 255.0
        return F.resize(torch.from_numpy(arr)[None], [self.size, self.size], antialias=True)


def images_per_second(dataset, repeats: int) -> float:
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(len(dataset)):
            dataset[i]
        best = max(best, len(dataset) / (time.perf_counter() - start))
    return best


def run(size: int, n: int, work: Path, repeats: int) -> dict:
    data = work / f"synth-{size}"
    write_synthetic_dataset(data, n=n, sites=4, size=size, seed=0, progress=False)
    ds = open_dataset(data)
    folder = work / f"png-{size}" / "images"
    folder.mkdir(parents=True)
    rows = ds.take(np.arange(ds.num_rows), ["image"]).column("image")
    files = []
    for i in range(ds.num_rows):
        path = folder / f"{i:06d}.png"
        path.write_bytes(rows[i].as_py())
        files.append(path)
    (folder.parent / "labels.csv").write_text("filename,label\n" + "".join(f"{p.name},x\n" for p in files))
    target = min(size, 224)
    parquet = images_per_second(ClientImages(data, np.arange(n), size=target), repeats)
    pngs = images_per_second(PngFolder(files, target), repeats)

    raw_parquet = images_per_second(_RawParquet(data, n), repeats)
    start = time.perf_counter()
    ingest(LAYOUTS["manifest"](folder.parent, source="b"), work / f"ingested-{size}", name="b", source="b",
           options=IngestOptions(progress=False, workers=1))
    ingest_rate = n / (time.perf_counter() - start)
    return {"size": size, "images": n, "parquet_items_per_s": round(parquet, 1),
            "png_folder_items_per_s": round(pngs, 1), "ratio_parquet_over_png": round(parquet / pngs, 3),
            "parquet_decode_only_per_s": round(raw_parquet, 1), "ingest_png_per_s_1_thread": round(ingest_rate, 1)}


class _RawParquet:
    """Row-view read + PNG decode only (no tensor, no resize): the storage layer's ceiling."""

    def __init__(self, path: Path, n: int) -> None:
        self.col = open_dataset(path).take(np.arange(n), ["image"]).column("image")

    def __len__(self) -> int:
        return len(self.col)

    def __getitem__(self, i: int) -> np.ndarray:
        return decode_png(self.col[i].as_py())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="256 px only, few images")
    args = parser.parse_args()
    torch.set_num_threads(1)
    plans = [(256, 300)] if args.quick else [(256, 2000), (1024, 200)]
    with tempfile.TemporaryDirectory() as tmp:
        results = [run(size, n, Path(tmp), repeats=2) for size, n in plans]
    lines = table({"size": "px", "images": "images", "parquet_items_per_s": "Parquet items/s",
                   "png_folder_items_per_s": "PNG folder items/s", "ratio_parquet_over_png": "ratio",
                   "parquet_decode_only_per_s": "decode-only items/s",
                   "ingest_png_per_s_1_thread": "ingest PNG/s (1 thread)"}, results)
    report("data_io" + (" --quick" if args.quick else ""), {"results": results}, lines)


if __name__ == "__main__":
    main()
