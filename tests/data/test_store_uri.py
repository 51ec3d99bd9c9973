"""Datasets addressed by pyarrow filesystem URIs: ``file://`` reads the same rows as a local path,
and cloud URIs are parsed into their filesystem without any network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch

from cxrfl_ray.config import build_config
from cxrfl_ray.data.store import DatasetError, filesystem_for, open_dataset
from cxrfl_ray.data.torch_dataset import ClientImages
from cxrfl_ray.experiment import prepare


def test_a_file_uri_reads_the_same_rows_as_the_local_path(phantoms):
    local = phantoms(n=60, size=32)
    uri = local.resolve().as_uri()
    assert uri.startswith("file:///")
    a, b = open_dataset(local), open_dataset(uri)
    assert b.path == uri and a.num_rows == b.num_rows == 60
    assert a.metadata.equals(b.metadata)
    ids = [59, 3, 17]
    assert a.take(ids).equals(b.take(ids))
    x_local = ClientImages(a, ids, task="segmentation", size=32)
    x_uri = ClientImages(uri, ids, task="segmentation", size=32)
    for i in range(3):
        for t_local, t_uri in zip(x_local[i], x_uri[i]):
            assert torch.equal(t_local, t_uri)
    # A whole experiment plans the same clients from either address.
    cfg = {"task": "segmentation", "model": {"name": "tiny-conv-seg"}, "partition": {"clients": 3}}
    p_local = prepare(build_config({**cfg, "data": {"path": str(local)}}))
    p_uri = prepare(build_config({**cfg, "data": {"path": uri}}))
    assert all(np.array_equal(u, v) for u, v in zip(p_local.plan.clients, p_uri.plan.clients))


@pytest.mark.parametrize("uri, kind, inner", [
    ("s3://bucket/datasets/rsna/", pafs.S3FileSystem, "bucket/datasets/rsna"),
    ("gs://bucket/datasets/lungseg", pafs.GcsFileSystem, "bucket/datasets/lungseg"),
    ("file:///data/rsna", pafs.LocalFileSystem, "/data/rsna"),
    ("relative/folder", pafs.LocalFileSystem, None),
])
def test_uris_are_parsed_without_network(uri, kind, inner):
    fs, path = filesystem_for(uri)  # builds the filesystem object only: CI has no network
    assert isinstance(fs, kind)
    assert path == (inner if inner is not None else str(Path(uri).absolute()))


def test_bad_addresses_name_the_problem(tmp_path):
    with pytest.raises(DatasetError, match=r"ftp://host/x: unsupported scheme 'ftp'"):
        open_dataset("ftp://host/x")
    with pytest.raises(DatasetError, match="dataset folder not found"):
        open_dataset((tmp_path / "absent").as_uri())
    with pytest.raises(DatasetError, match="is not a cxrfl dataset: dataset.json is missing"):
        open_dataset(tmp_path.as_uri())
