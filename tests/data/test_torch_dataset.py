"""The per-client torch Dataset: decoding, resizing, seeded paired augmentation."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cxrfl_ray.data.imageio import encode_png
from cxrfl_ray.data.torch_dataset import PIXELS, ClientImages
from cxrfl_ray.data.writer import DatasetWriter
from tests.conftest import make_rows


def test_classification_items_match_rows(small_dataset):
    rows = [5, 17, 90]
    data = ClientImages(small_dataset, rows, size=48)
    assert len(data) == 3
    image, label = data[1]
    assert image.shape == (1, 48, 48) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1
    assert label.item() == (17 // 2) % 3  # make_rows: label cycles per patient of 2 images
    three = ClientImages(small_dataset, rows, size=48, channels=3, imagenet_norm=True)[1][0]
    assert three.shape == (3, 48, 48)
    assert torch.allclose(three[0] * 0.229 + 0.485, image[0], atol=1e-5)


def test_segmentation_augmentation_moves_image_and_mask_together(tmp_path):
    # An image that *is* its mask: after any paired transform they must still coincide.
    rows = make_rows(4, size=64)
    for r in rows:
        mask = np.zeros((64, 64), np.uint8)
        mask[10:40, 5:30] = 255
        r["image"] = encode_png(mask)
        r["mask"] = encode_png(mask)
    with DatasetWriter(tmp_path / "d", name="d", label_names=["a", "b", "c"]) as w:
        for r in rows:
            w.add(r)
    data = ClientImages(tmp_path / "d", range(4), task="segmentation", size=64, augment=True, seed=0)
    moved = 0
    for i in range(4):
        image, mask = data[i]
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        agree = ((image > 0.5).float() == mask).float().mean().item()
        assert agree > 0.97
        moved += not torch.equal(mask[0, 10:40, 5:30], torch.ones(30, 25))
    assert moved >= 3  # the paper's +-90 degree / 1-2x affine really moves things


def test_augmentation_is_seeded_by_seed_epoch_and_row(small_dataset):
    a = ClientImages(small_dataset, range(6), size=32, augment=True, seed=1)
    b = ClientImages(small_dataset, range(6), size=32, augment=True, seed=1)
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(6))
    c = ClientImages(small_dataset, range(6), size=32, augment=True, seed=2)
    assert not all(torch.equal(a[i][0], c[i][0]) for i in range(6))
    b.set_epoch(1)
    assert not all(torch.equal(a[i][0], b[i][0]) for i in range(6))
    # Worker processes give the same batches as the main process.
    plain = torch.cat([x for x, _ in DataLoader(a, batch_size=3)])
    workers = torch.cat([x for x, _ in DataLoader(a, batch_size=3, num_workers=2)])
    assert torch.equal(plain, workers)


def test_pickles_without_pixels(small_dataset):
    data = ClientImages(small_dataset, range(120), size=32)
    data[0]
    assert len(pickle.dumps(data)) < 5000
    assert torch.equal(pickle.loads(pickle.dumps(data))[7][0], data[7][0])


def test_segmentation_without_masks_names_the_row(tmp_path):
    with DatasetWriter(tmp_path / "d", name="d", label_names=["a", "b", "c"]) as w:
        for r in make_rows(3, masks=False):
            w.add(r)
    with pytest.raises(ValueError, match=r"3 of 3 rows have no lung mask \(first: t:00000\)"):
        ClientImages(tmp_path / "d", range(3), task="segmentation")[0]


@pytest.mark.parametrize("task, augment", [("segmentation", True), ("classification", True),
                                           ("classification", False)])
@pytest.mark.parametrize("cache_mb", [64, 1])
def test_pixel_cache_gives_the_same_items_as_decoding(phantoms, task, augment, cache_mb):
    # 30 phantoms at 128 px: 80 KiB per kept row, so 1 MiB keeps only some of them.
    data = phantoms(n=30, size=160)
    kwargs = dict(task=task, size=128, augment=augment, seed=3)
    plain = ClientImages(data, range(30), **kwargs)
    cached = ClientImages(data, range(30), cache_mb=cache_mb, **kwargs)
    for epoch in range(2):
        plain.set_epoch(epoch)
        cached.set_epoch(epoch)
        for i in range(30):
            (a, y), (b, z) = plain[i], cached[i]
            assert torch.equal(a, b) and torch.equal(y, z) and y.dtype == z.dtype
            b.mul_(0)  # a caller writing into an item must not change the next epoch
            z.mul_(0)
    assert PIXELS.nbytes <= cache_mb * 2**20
    assert len(PIXELS.entries) == (30 if cache_mb == 64 else 1 * 2**20 // (128 * 128 * (4 + (task == "segmentation"))))
    assert len(pickle.dumps(cached)) < 5000  # the kept pixels stay in the process
