"""Write a dataset folder (Parquet shards + dataset.json card + skipped.csv) atomically.

Everything goes to a hidden temporary sibling folder first and is renamed into place only when
the card is written, so a crash never leaves a half dataset that looks whole, and re-running
into the same output replaces the old dataset in one step.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cxrfl_ray.data.schema import SCHEMA, SCHEMA_VERSION, SPLITS
from cxrfl_ray.jsonio import write_json

CARD_NAME = "dataset.json"
SKIPPED_NAME = "skipped.csv"
PAYLOAD_COLUMNS = ("image", "mask")


class DatasetWriter:
    """Collects rows, writes them as Parquet shards, and finishes with the dataset card.

    Use as a context manager: the dataset appears at ``out`` only if the block ends cleanly.

    Parameters
    ----------
    out : folder the dataset is published to (replaced atomically if it exists).
    name : dataset name for the card.
    label_names : names of labels 0..K-1.
    sources : free-form description of where the rows came from (paths, generator args).
    shard_rows : rows per Parquet file.
    row_group_rows : rows per Parquet row group, the unit a client reads.
    """

    def __init__(
        self,
        out: str | Path,
        name: str,
        label_names: tuple[str, ...] | list[str],
        sources: list[dict[str, Any]] | None = None,
        shard_rows: int = 4096,
        row_group_rows: int = 128,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.out = Path(out)
        self.name = name
        self.label_names = list(label_names)
        self.sources = sources or []
        self.shard_rows = shard_rows
        self.row_group_rows = row_group_rows
        self.extra = extra or {}
        self.skipped: list[dict[str, str]] = []
        self.flagged: list[dict[str, str]] = []
        self.notes: list[dict[str, str]] = []
        self._rows: list[dict[str, Any]] = []
        self._shards: list[str] = []
        self._ids: set[str] = set()
        self._stats: dict[str, list] = {"site": [], "split": [], "label": [], "h": [], "w": [], "bits": [], "mask": []}
        self._tmp: Path | None = None
        self._started = 0.0

    # -- context management -------------------------------------------------------------
    def __enter__(self) -> "DatasetWriter":
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        self._started = time.time()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._tmp is not None
        if exc_type is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            return
        try:
            self._flush()
            self._write_card()
            _publish(self._tmp, self.out)
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise

    # -- rows ---------------------------------------------------------------------------
    def has_id(self, row_id: str) -> bool:
        return row_id in self._ids

    def add(self, row: dict[str, Any]) -> None:
        """Add one row (a dict with the schema's fields; missing optional fields are null)."""
        if row["id"] in self._ids:
            raise ValueError(f"duplicate id {row['id']!r}")
        if row["split"] not in SPLITS:
            raise ValueError(f"split {row['split']!r} of {row['id']!r} is not one of {SPLITS}")
        self._ids.add(row["id"])
        self._rows.append(row)
        s = self._stats
        s["site"].append(row["site"])
        s["split"].append(row["split"])
        s["label"].append(row["label"])
        s["h"].append(row["height"])
        s["w"].append(row["width"])
        s["bits"].append(row["bit_depth"])
        s["mask"].append(row.get("mask") is not None)
        if len(self._rows) >= self.shard_rows:
            self._flush()

    def skip(self, path: str | Path, reason: str) -> None:
        """Record a source file that was not ingested, with the reason."""
        self.skipped.append({"path": str(path), "reason": reason})

    def flag(self, row_id: str, path: str | Path, reason: str) -> None:
        """Record a row that was kept but looks wrong (constant image, mask dropped), with why."""
        self.flagged.append({"id": row_id, "path": str(path), "reason": reason})

    def note(self, path: str | Path, note: str) -> None:
        """Record how a source file was read where it matters (e.g. a CSV decoded as cp1252)."""
        self.notes.append({"path": str(path), "note": note})

    @property
    def num_rows(self) -> int:
        return len(self._ids)

    # -- internals ----------------------------------------------------------------------
    def _flush(self) -> None:
        if not self._rows:
            return
        assert self._tmp is not None
        table = pa.Table.from_pylist(self._rows, schema=SCHEMA)
        name = f"part-{len(self._shards):05d}.parquet"
        pq.write_table(
            table,
            self._tmp / name,
            row_group_size=self.row_group_rows,
            # PNG payloads are already compressed: store them plain so reads are cheap.
            compression={f.name: ("none" if f.name in PAYLOAD_COLUMNS else "zstd") for f in SCHEMA},
            use_dictionary=[f.name for f in SCHEMA if f.name not in PAYLOAD_COLUMNS],
            write_statistics=[f.name for f in SCHEMA if f.name not in PAYLOAD_COLUMNS],
        )
        self._shards.append(name)
        self._rows = []

    def card(self) -> dict[str, Any]:
        s = self._stats
        labels = Counter(int(x) for x in s["label"])
        label_counts = {
            (self.label_names[k] if 0 <= k < len(self.label_names) else "none"): labels[k]
            for k in sorted(labels)
        }
        by_site: dict[str, dict[str, dict[str, int]]] = {}
        for site, split, label in zip(s["site"], s["split"], s["label"]):
            name = self.label_names[label] if 0 <= label < len(self.label_names) else "none"
            cell = by_site.setdefault(site, {}).setdefault(split, {})
            cell[name] = cell.get(name, 0) + 1
        return {
            "name": self.name,
            "schema_version": SCHEMA_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "sources": self.sources,
            "label_names": self.label_names,
            "num_rows": self.num_rows,
            "num_masks": int(sum(s["mask"])),
            "counts": {
                "site": dict(sorted(Counter(s["site"]).items())),
                "split": {k: v for k, v in ((sp, s["split"].count(sp)) for sp in SPLITS) if v},
                "label": label_counts,
                "site_split_label": dict(sorted(by_site.items())),
            },
            "image_size": _size_stats(s["h"], s["w"], s["bits"]),
            "shards": self._shards,
            "num_skipped": len(self.skipped),
            "skipped": self.skipped,
            "num_flagged": len(self.flagged),
            "flagged": self.flagged,
            "notes": self.notes,
            **self.extra,
        }

    def _write_card(self) -> None:
        assert self._tmp is not None
        with open(self._tmp / SKIPPED_NAME, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["path", "reason"])
            writer.writeheader()
            writer.writerows(self.skipped)
        card = self.card()
        card["build_seconds"] = round(time.time() - self._started, 3)
        write_json(self._tmp / CARD_NAME, card)


def card_lines(card: dict[str, Any], limit: int = 10) -> list[str]:
    """Summary lines for a card's flagged rows and notes (``cxrfl card``, ``cxrfl ingest``)."""
    lines = [f"  note {n['path']}: {n['note']}" for n in card.get("notes", [])]
    flagged = card.get("flagged", [])
    if flagged:
        lines.append(f"  {len(flagged)} flagged (kept; see the card's 'flagged'):")
        lines += [f"  flagged {f['id']} ({f['path']}): {f['reason']}" for f in flagged[:limit]]
        if len(flagged) > limit:
            lines.append(f"  ... {len(flagged) - limit} more flagged in dataset.json")
    return lines


def _size_stats(h: list[int], w: list[int], bits: list[int]) -> dict[str, Any]:
    if not h:
        return {}
    ha, wa = np.asarray(h), np.asarray(w)
    return {
        "height": {"min": int(ha.min()), "median": float(np.median(ha)), "max": int(ha.max())},
        "width": {"min": int(wa.min()), "median": float(np.median(wa)), "max": int(wa.max())},
        "bit_depth": {str(k): v for k, v in sorted(Counter(int(b) for b in bits).items())},
    }


def _publish(tmp: Path, out: Path) -> None:
    """Swap the finished temporary folder into place; an old dataset is removed after."""
    old = None
    if out.exists():
        if out.is_dir() and not (out / CARD_NAME).exists() and any(out.iterdir()):
            raise FileExistsError(
                f"{out} exists and is not a cxrfl dataset (no {CARD_NAME}); refusing to replace it"
            )
        old = out.parent / f".{out.name}.old-{os.getpid()}-{time.time_ns()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
