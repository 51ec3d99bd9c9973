"""The per-client torch Dataset: decoding, resizing, seeded paired augmentation."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cxrfl_ray.data.imageio import decode_png, encode_png
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


def _images_that_are_their_masks(path, n: int):
    """A dataset of ``n`` rows whose image *is* its mask: after any paired transform they coincide."""
    rows = make_rows(n, size=64)
    for r in rows:
        mask = np.zeros((64, 64), np.uint8)
        mask[10:40, 5:30] = 255
        r["image"] = encode_png(mask)
        r["mask"] = encode_png(mask)
    with DatasetWriter(path, name="d", label_names=["a", "b", "c"]) as w:
        for r in rows:
            w.add(r)
    return path


def test_segmentation_augmentation_moves_image_and_mask_together(tmp_path):
    # An image that *is* its mask: after any paired transform they must still coincide.
    _images_that_are_their_masks(tmp_path / "d", 4)
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


# -- data.normalize ---------------------------------------------------------------------------

def test_image_normalisation_standardises_each_item_and_keeps_blank_images_finite(phantoms):
    from cxrfl_ray.data.torch_dataset import model_input

    data = phantoms(n=30, size=64)
    plain = ClientImages(data, range(6), size=32)
    for channels in (1, 3):
        normed = ClientImages(data, range(6), size=32, channels=channels, normalize="image")
        assert normed.normalize == "image"
        for i in range(6):
            x, raw = normed[i][0], plain[i][0]
            assert x.shape == (channels, 32, 32)
            assert abs(x.mean().item()) < 1e-5 and abs(x.std().item() - 1) < 1e-4
            # The same picture, only shifted and scaled: (raw - mean) / std.
            ref = raw.expand(channels, -1, -1)
            torch.testing.assert_close(x, (ref - ref.mean()) / ref.std())
    assert plain[0][0].min() >= 0 and plain[0][0].std() < 0.5  # [0, 1] pixels are not standardised
    blank = model_input(np.zeros((40, 40), np.uint8), 32, normalize="image")  # std 0: stays 0, not NaN
    assert torch.isfinite(blank).all() and torch.equal(blank, torch.zeros(1, 32, 32))
    with pytest.raises(ValueError, match="normalize must be one of"):
        ClientImages(data, range(2), size=32, normalize="minmax")


def test_imagenet_normalisation_is_exactly_the_old_imagenet_norm(phantoms):
    from cxrfl_ray.data.torch_dataset import IMAGENET_MEAN, IMAGENET_STD, model_input
    from cxrfl_ray.data.store import open_dataset

    data = phantoms(n=30, size=64)
    old = ClientImages(data, range(4), size=32, channels=3, imagenet_norm=True)
    new = ClientImages(data, range(4), size=32, channels=3, normalize="imagenet")
    plain = ClientImages(data, range(4), size=32, channels=3)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for i in range(4):
        assert torch.equal(old[i][0], new[i][0])
        assert torch.equal(new[i][0], (plain[i][0] - mean) / std)
    # normalize overrides imagenet_norm; "none" keeps [0, 1]
    assert torch.equal(ClientImages(data, range(4), size=32, channels=3, imagenet_norm=True, normalize="none")[0][0],
                       plain[0][0])
    pixels = decode_png(open_dataset(data).take(np.array([0]), ["image"]).column("image")[0].as_py())
    assert torch.equal(model_input(pixels, 32, 3, True), model_input(pixels, 32, 3, "imagenet"))
    assert torch.equal(model_input(pixels, 32, 3, "imagenet"), (model_input(pixels, 32, 3) - mean) / std)


def test_prepared_images_follow_the_config_normalisation_and_augmentation(phantoms):
    from cxrfl_ray.config import build_config
    from cxrfl_ray.data.torch_dataset import AUGMENTS, LIGHT_AUGMENTS
    from cxrfl_ray.experiment import prepare

    data = phantoms(n=30, size=64)
    for augment, expected in (("light", LIGHT_AUGMENTS), ("paper", AUGMENTS), (True, AUGMENTS)):
        prep = prepare(build_config({"task": "segmentation", "data": {"path": str(data), "size": 32,
                                     "augment": augment, "normalize": "image"}, "partition": {"clients": 2},
                                     "model": {"name": "tiny-conv-seg"}}))
        train = prep.images(prep.plan.clients[0], train=True)
        assert train.augment == expected["segmentation"], augment
        assert prep.images(prep.plan.clients[0], train=False).augment is None
        assert train.normalize == "image"
    prep = prepare(build_config({"data": {"path": str(data), "size": 32, "augment": False, "imagenet_norm": True,
                                          "channels": 3}, "partition": {"clients": 2}}))
    assert prep.images(prep.plan.clients[0], train=True).augment is None
    assert prep.images(prep.plan.clients[0], train=True).normalize == "imagenet"


# -- data.augment: light ----------------------------------------------------------------------

def test_task_augment_maps_config_values_to_the_tasks_sets():
    from cxrfl_ray.data.torch_dataset import AUGMENTS, LIGHT_AUGMENTS, task_augment

    for task in ("segmentation", "classification"):
        assert task_augment(task, True) == task_augment(task, "paper") == AUGMENTS[task]
        assert task_augment(task, "light") == LIGHT_AUGMENTS[task]
        assert task_augment(task, False) is None
        light = LIGHT_AUGMENTS[task]
        assert light.hflip == light.vflip == 0 and 0 < light.rotate <= 10  # no flips, small turns
    assert AUGMENTS["segmentation"].rotate == 90 and AUGMENTS["segmentation"].vflip == 0.5
    with pytest.raises(ValueError, match="augment must be true, false, 'paper' or 'light', got 'heavy'"):
        task_augment("segmentation", "heavy")


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_light_augmentation_is_seeded_per_epoch_and_differs_from_none_and_paper(phantoms, task):
    data = phantoms(n=30, size=64)
    rows = range(6)
    light = ClientImages(data, rows, task=task, size=32, augment="light", seed=1)
    again = ClientImages(data, rows, task=task, size=32, augment="light", seed=1)
    none = ClientImages(data, rows, task=task, size=32, augment=False, seed=1)
    paper = ClientImages(data, rows, task=task, size=32, augment="paper", seed=1)
    for i in range(6):
        assert not torch.equal(light[i][0], none[i][0])
        assert not torch.equal(light[i][0], paper[i][0])
        assert torch.equal(light[i][0], again[i][0]) and torch.equal(light[i][1], again[i][1])
    again.set_epoch(1)
    assert all(not torch.equal(light[i][0], again[i][0]) for i in range(6))
    light.set_epoch(1)
    assert all(torch.equal(light[i][0], again[i][0]) for i in range(6))


def test_light_augmentation_moves_the_mask_with_the_image(tmp_path):
    _images_that_are_their_masks(tmp_path / "d", 6)
    data = ClientImages(tmp_path / "d", range(6), task="segmentation", size=64, augment="light", seed=0)
    original = torch.zeros(1, 64, 64)
    original[0, 10:40, 5:30] = 1
    moved = 0
    for i in range(6):
        image, mask = data[i]
        assert set(mask.unique().tolist()) == {0.0, 1.0}  # still a binary mask
        assert ((image > 0.5).float() == mask).float().mean().item() > 0.97
        changed = (mask != original).float().mean().item()
        assert changed < 0.15  # light: a few degrees and percent, not the paper's 90-degree turns
        moved += changed > 0.005
    assert moved >= 5
