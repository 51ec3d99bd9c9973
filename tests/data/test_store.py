"""Reading a dataset folder: rows by id across shards and row groups, card checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cxrfl_ray.data.imageio import decode_png
from cxrfl_ray.data.store import DatasetError, open_dataset
from tests.conftest import gradient


def test_take_returns_requested_rows_in_order_across_shards(small_dataset):
    ds = open_dataset(small_dataset)
    assert ds.num_rows == 120 and len(ds.card["shards"]) == 3
    ids = [119, 3, 64, 50, 49, 3]
    table = ds.take(ids, ["id", "image"])
    assert table.column("id").to_pylist() == [f"t:{i:05d}" for i in ids]
    np.testing.assert_array_equal(decode_png(table.column("image")[0].as_py()), gradient(32, 32, seed=119))
    assert ds.take([], ["id"]).num_rows == 0


def test_metadata_has_no_pixels_and_matches_the_card(small_dataset):
    ds = open_dataset(small_dataset)
    meta = ds.metadata
    assert "image" not in meta.column_names and meta.num_rows == 120
    assert ds.card["counts"]["site"] == {"A": 60, "B": 60}
    assert ds.card["counts"]["split"] == {"train": 72, "val": 24, "test": 24}


def test_out_of_range_row_and_bad_folders(small_dataset, tmp_path):
    ds = open_dataset(small_dataset)
    with pytest.raises(IndexError, match="row id 120 out of range"):
        ds.take([0, 120])
    with pytest.raises(DatasetError, match="dataset folder not found"):
        open_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="dataset.json is missing"):
        open_dataset(tmp_path / "empty")
    card = json.loads((small_dataset / "dataset.json").read_text())
    card["schema_version"] = 99
    (small_dataset / "dataset.json").write_text(json.dumps(card))
    with pytest.raises(DatasetError, match="schema_version 99 is not supported"):
        open_dataset(small_dataset)
