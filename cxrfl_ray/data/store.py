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
        self.card: dict[str, Any] = self._read_card(card_path)
        self._shard_paths = [f"{root}/{s}" for s in self.card["shards"]]
        self._files = [self._open_shard(p) for p in self._shard_paths]
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

    def _read_card(self, card_path: str) -> dict[str, Any]:
        """The card, checked enough that later reads cannot fail on its shape."""
        where = f"{self.path}/{CARD_NAME}"
        try:
            with self.fs.open_input_stream(card_path) as fh:
                card = json.loads(fh.read())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DatasetError(f"{where}: not valid JSON ({exc}); re-create the dataset") from None
        except OSError as exc:
            raise DatasetError(f"{where}: cannot read ({exc})") from None
        if not isinstance(card, dict):
            raise DatasetError(f"{where}: holds a JSON {type(card).__name__}, not a dataset card (an object)")
        version = card.get("schema_version")
        if version != SCHEMA_VERSION:
            raise DatasetError(f"{where}: schema_version {version} is not supported (expected {SCHEMA_VERSION})")
        for key, kind, what in (("name", str, "a name"), ("counts", dict, "an object of counts"),
                                ("shards", list, "a list of shard file names"),
                                ("num_rows", int, "a row count"),
                                ("label_names", list, "a list of label names")):
            if not isinstance(card.get(key), kind) or isinstance(card.get(key), bool):
                found = "missing" if key not in card else f"{card[key]!r} is not {what}"
                raise DatasetError(f"{where}: {key!r} {found}; re-create the dataset")
        if not all(isinstance(s, str) for s in card["shards"]):
            raise DatasetError(f"{where}: 'shards' {card['shards']!r} is not a list of shard file names")
        return card

    def _open_shard(self, path: str) -> pq.ParquetFile:
        """A shard's footer; DatasetError naming the file where it is missing, truncated or not Parquet."""
        try:
            if self._local:
                return pq.ParquetFile(path, memory_map=True)
            return pq.ParquetFile(self.fs.open_input_file(path))
        except FileNotFoundError:
            raise DatasetError(f"{path}: shard listed in {CARD_NAME} is missing") from None
        except (OSError, pa.ArrowException) as exc:
            raise DatasetError(f"{path}: not a readable Parquet shard (truncated or corrupt: {exc})") from None

    def _read(self, si: int, read, what: str) -> pa.Table:
        """One read of shard ``si``; corrupt pages become a DatasetError naming the shard."""
        try:
            return read()
        except (OSError, pa.ArrowException) as exc:
            raise DatasetError(f"{self._shard_paths[si]}: cannot read {what} (corrupt shard: {exc})") from None

    @property
    def label_names(self) -> list[str]:
        return list(self.card["label_names"])

    @cached_property
    def metadata(self) -> pa.Table:
        """All rows' metadata columns (no pixels), in row-id order."""
        tables = [self._read(si, lambda f=f: f.read(columns=list(METADATA_COLUMNS)), "the metadata")
                  for si, f in enumerate(self._files)]
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
            part = self._read(si, lambda si=si, gi=gi: self._files[si].read_row_group(
                gi, columns=list(columns) if columns else None), f"row group {gi}")
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
