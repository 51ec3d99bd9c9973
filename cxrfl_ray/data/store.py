"""Read a dataset folder without loading it: metadata columns for planning, rows by id.

Row ids are positions in the dataset (shards in name order, rows in file order). Reading a
client's rows touches only the Parquet row groups that hold them, through memory maps.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cxrfl_ray.data.schema import METADATA_COLUMNS, SCHEMA_VERSION
from cxrfl_ray.data.writer import CARD_NAME


class DatasetError(ValueError):
    """A folder that is not a readable cxrfl dataset."""


URI_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "abfs", "abfss")


def filesystem_for(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """``(pyarrow filesystem, path inside it)`` for a local path or a ``scheme://`` URI.

    Cloud filesystems are built from the scheme without contacting anyone (credentials and
    region come from the usual environment variables when the first file is read), so a URI can
    be checked offline and every node of a cluster reads the same shared rows.
    """
    text = str(location)
    if "://" not in text:
        return pafs.LocalFileSystem(), str(Path(text).absolute())
    scheme, rest = text.split("://", 1)
    scheme = scheme.lower()
    if scheme not in URI_SCHEMES:
        raise DatasetError(f"{text}: unsupported scheme {scheme!r} (use a local path or one of "
                           f"{', '.join(s + '://' for s in URI_SCHEMES)})")
    if scheme == "s3":
        return pafs.S3FileSystem(), rest.rstrip("/")
    if scheme in ("gs", "gcs"):
        return pafs.GcsFileSystem(), rest.rstrip("/")
    fs, path = pafs.FileSystem.from_uri(text)
    return fs, path.rstrip("/") or "/"


class StoredDataset:
    """A dataset folder opened for reading (cheap: only the card and Parquet footers).

    ``path`` is a local folder or a pyarrow filesystem URI (``file://``, ``s3://``, ``gs://``):
    local shards are memory-mapped, remote ones read by ranges (only the needed row groups).
    """

    def __init__(self, path: str | Path) -> None:
        text = str(path)
        self.path: str | Path = text if "://" in text else Path(text)
        self.fs, root = filesystem_for(text)
        self._local = isinstance(self.fs, pafs.LocalFileSystem)
        card_path = f"{root}/{CARD_NAME}"
        try:
            card_info = self.fs.get_file_info(card_path)
        except OSError as exc:
            raise DatasetError(f"{self.path}: cannot read ({exc})") from None
        if card_info.type != pafs.FileType.File:
            if self.fs.get_file_info(root).type != pafs.FileType.Directory:
                raise DatasetError(f"dataset folder not found: {self.path}")
            raise DatasetError(f"{self.path} is not a cxrfl dataset: {CARD_NAME} is missing")
        with self.fs.open_input_stream(card_path) as fh:
            self.card: dict[str, Any] = json.loads(fh.read())
        version = self.card.get("schema_version")
        if version != SCHEMA_VERSION:
            raise DatasetError(
                f"{self.path}/{CARD_NAME}: schema_version {version} is not supported (expected {SCHEMA_VERSION})"
            )
        if self._local:
            self._files = [pq.ParquetFile(f"{root}/{s}", memory_map=True) for s in self.card["shards"]]
        else:
            self._files = [pq.ParquetFile(self.fs.open_input_file(f"{root}/{s}")) for s in self.card["shards"]]
        # Global row offset of each (shard, row group), for locating a row id.
        starts, locs = [], []
        offset = 0
        for si, f in enumerate(self._files):
            for gi in range(f.metadata.num_row_groups):
                starts.append(offset)
                locs.append((si, gi))
                offset += f.metadata.row_group(gi).num_rows
        self._group_starts = np.asarray(starts + [offset], dtype=np.int64)
        self._group_locs = locs
        self.num_rows = offset
        if offset != self.card["num_rows"]:
            raise DatasetError(
                f"{self.path}: shards hold {offset} rows but {CARD_NAME} says {self.card['num_rows']}"
            )

    @property
    def label_names(self) -> list[str]:
        return list(self.card["label_names"])

    @cached_property
    def metadata(self) -> pa.Table:
        """All rows' metadata columns (no pixels), in row-id order."""
        tables = [f.read(columns=list(METADATA_COLUMNS)) for f in self._files]
        if not tables:
            return pa.table({c: [] for c in METADATA_COLUMNS})
        return pa.concat_tables(tables)

    def take(self, row_ids: Sequence[int] | np.ndarray, columns: Sequence[str] | None = None) -> pa.Table:
        """Rows ``row_ids`` (in that order), reading only the row groups that hold them."""
        ids = np.asarray(row_ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_rows):
            bad = ids[(ids < 0) | (ids >= self.num_rows)][0]
            raise IndexError(f"row id {bad} out of range for {self.path} ({self.num_rows} rows)")
        group_of = np.searchsorted(self._group_starts, ids, side="right") - 1
        groups = np.unique(group_of)
        parts, base = [], {}
        position = 0
        for g in groups:
            si, gi = self._group_locs[g]
            part = self._files[si].read_row_group(gi, columns=list(columns) if columns else None)
            parts.append(part)
            base[int(g)] = position
            position += part.num_rows
        if not parts:
            schema = self._files[0].schema_arrow if self._files else pa.schema([])
            if columns:
                schema = pa.schema([schema.field(c) for c in columns])
            return schema.empty_table()
        table = pa.concat_tables(parts)
        # Position of each requested row inside the concatenated row groups.
        group_base = np.zeros(len(self._group_locs), dtype=np.int64)
        group_base[groups] = np.asarray([base[int(g)] for g in groups], dtype=np.int64)
        local = group_base[group_of] + ids - self._group_starts[group_of]
        return table.take(pa.array(local))


def open_dataset(path: str | Path) -> StoredDataset:
    return StoredDataset(path)
