"""A ``torch.utils.data.Dataset`` over one client's rows: decode, resize, augment (seeded).

Only the client's rows are read (the row groups that hold them), and lazily, so the object is
cheap to pickle into a Ray actor or a DataLoader worker. Augmentation parameters come from a
generator seeded by (seed, epoch, row id): the same config gives the same batches whatever the
worker count or order.

Decoding and resizing are deterministic, so their result is kept (``cache_mb``) in a per-process
``PixelCache`` and later epochs, rounds and sweep trials skip them; augmentation, which varies
per epoch, is applied afresh to the kept pixels, so items are bit-identical with the cache on or off.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from torch.utils.data import Dataset

from cxrfl_ray.data.imageio import decode_png
from cxrfl_ray.data.store import StoredDataset, open_dataset

Task = Literal["classification", "segmentation"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Augment:
    """Ranges of the random transforms (each drawn uniformly per sample)."""

    rotate: float = 0.0  # degrees, +-
    scale: tuple[float, float] = (1.0, 1.0)
    shear: float = 0.0  # degrees, +-
    hflip: float = 0.0  # probability
    vflip: float = 0.0
    brightness: float = 0.0  # +- factor around 1
    contrast: float = 0.0


# The paper's augmentations (CXR-FL, Slazyk et al. 2022).
AUGMENTS: dict[str, Augment] = {
    "segmentation": Augment(rotate=90, scale=(1.0, 2.0), hflip=0.5, vflip=0.5, brightness=0.2, contrast=0.2),
    "classification": Augment(rotate=5, scale=(0.95, 1.05), shear=5, hflip=0.5),
}
# Positioning and exposure differences between frontal CXRs, without the flips and 90-degree turns
# no real frontal film has (see the real-segmentation preset for what each set bought).
LIGHT_AUGMENTS: dict[str, Augment] = {
    "segmentation": Augment(rotate=10, scale=(0.9, 1.1), shear=5, brightness=0.2, contrast=0.2),
    "classification": Augment(rotate=10, scale=(0.9, 1.1), shear=5, brightness=0.2, contrast=0.2),
}
NORMALIZATIONS = ("none", "image", "imagenet")


def task_augment(task: str, augment: bool | str) -> Augment | None:
    """A config's ``data.augment`` (true/"paper", "light", false) as the task's ``Augment``."""
    if augment is False or augment is None:
        return None
    table = LIGHT_AUGMENTS if augment == "light" else AUGMENTS
    if augment not in (True, "paper", "light"):
        raise ValueError(f"augment must be true, false, 'paper' or 'light', got {augment!r}")
    return table[task]


class PixelCache:
    """Rows decoded and resized to the training size, shared by every ClientImages of a process
    (a Ray actor plays many clients, and a pooled actor serves many sweep trials) so one budget
    bounds them all. Filled first come, never evicted: an epoch reads every row once, and
    evicting the oldest would miss every time once a pass outgrows the budget. One dataset, size
    and task at a time; a different one replaces the content. Images are kept as the float
    tensors decoding makes, not uint8: resizing lands between 8-bit levels (and 16-bit sources
    have more), so only floats keep items exact."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.key: tuple | None = None
        self.entries: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.nbytes = 0

    def get(self, key: tuple, row: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        return self.entries.get(row) if key == self.key else None

    def put(self, key: tuple, row: int, entry: tuple[torch.Tensor, torch.Tensor | None], budget: int) -> bool:
        """Keep ``entry`` if it fits in ``budget`` bytes; True if kept."""
        if key != self.key:
            self.clear()
            self.key = key
        size = sum(t.nbytes for t in entry if t is not None)
        if self.nbytes + size > budget:
            return False
        self.entries[row] = entry
        self.nbytes += size
        return True


PIXELS = PixelCache()


class ClientImages(Dataset):
    """Images (and labels or masks) of ``row_ids`` of a stored dataset.

    Parameters
    ----------
    dataset : dataset folder or an open StoredDataset.
    row_ids : the rows this client holds (a plan entry).
    task : ``classification`` yields (image, label); ``segmentation`` yields (image, mask).
    size : output side in pixels (images are resized to size x size).
    augment : true or "paper" (the task's paper augmentations), "light", or a custom ``Augment``.
    seed : seed for augmentation; call ``set_epoch`` to vary it per epoch.
    channels : 1, or 3 (grey repeated, as ImageNet-pretrained models expect).
    imagenet_norm : normalise with ImageNet mean/std (else pixels stay in [0, 1]).
    normalize : ``none``, ``image`` (each image to mean 0, std 1) or ``imagenet``; overrides
        ``imagenet_norm`` when given.
    cache_mb : keep decoded, resized pixels in this process's ``PIXELS`` up to this many MiB
        (all ClientImages of the process together); 0 decodes every time.
    """

    def __init__(
        self,
        dataset: str | Path | StoredDataset,
        row_ids: Sequence[int] | np.ndarray,
        *,
        task: Task = "classification",
        size: int = 256,
        augment: bool | str | Augment = False,
        seed: int = 0,
        channels: int = 1,
        imagenet_norm: bool = False,
        cache_mb: float = 0,
        normalize: str | None = None,
    ) -> None:
        if task not in AUGMENTS:
            raise ValueError(f"task must be one of {sorted(AUGMENTS)}, got {task!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.path = dataset.path if isinstance(dataset, StoredDataset) else dataset  # a folder or a URI
        self.row_ids = np.asarray(row_ids, dtype=np.int64)
        self.task = task
        self.size = size
        self.augment = augment if isinstance(augment, Augment) else task_augment(task, augment)
        self.seed = seed
        self.epoch = 0
        self.channels = channels
        self.normalize = normalize or ("imagenet" if imagenet_norm else "none")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        self.cache_mb = cache_mb
        self._rows = None
        self._cache_key: tuple | None = None

    def __len__(self) -> int:
        return int(self.row_ids.size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_rows"] = state["_cache_key"] = None  # re-read lazily where the dataset lands
        return state

    @property
    def rows(self):
        if self._rows is None:
            columns = ["id", "image", "label"] + (["mask"] if self.task == "segmentation" else [])
            ds = open_dataset(self.path)
            rows = ds.take(self.row_ids, columns)
            if self.task == "segmentation":
                missing = rows.column("mask").null_count
                if missing:
                    first = rows.column("id")[rows.column("mask").is_null().index(True).as_py()]
                    raise ValueError(
                        f"{self.path}: {missing} of {rows.num_rows} rows have no lung mask "
                        f"(first: {first}); segmentation needs masks"
                    )
            # The card (creation time, counts) tells a rewritten folder from the one cached.
            card = hash(json.dumps(ds.card, sort_keys=True))
            self._cache_key = (str(self.path), card, self.size, self.task)
            self._rows = rows
        return self._rows

    def _pixels(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The row decoded and resized (float image, uint8 mask): from the cache, or decoded
        and kept there if the budget allows. A kept image is handed out as a copy (a mask always
        leaves as a new float tensor), so a caller writing into it cannot change later epochs."""
        rows = self.rows
        row = int(self.row_ids[index])
        if self.cache_mb:
            kept = PIXELS.get(self._cache_key, row)
            if kept is not None:
                return kept[0].clone(), kept[1]
        image = _to_tensor(decode_png(rows.column("image")[index].as_py()))
        image = F.resize(image, [self.size, self.size], antialias=True)
        mask = None
        if self.task == "segmentation":
            raw = decode_png(rows.column("mask")[index].as_py())
            mask = torch.from_numpy(raw > 127).unsqueeze(0).to(torch.uint8)
            mask = F.resize(mask, [self.size, self.size], interpolation=F.InterpolationMode.NEAREST)
        if self.cache_mb and PIXELS.put(self._cache_key, row, (image, mask), int(self.cache_mb * 2**20)):
            return image.clone(), mask
        return image, mask

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self._pixels(index)
        rows = self.rows
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, self.epoch, int(self.row_ids[index])])
            image, mask = _apply(self.augment, rng, image, mask)
        image = _finish(image, self.channels, self.normalize)
        if mask is not None:
            return image, mask.float()
        return image, torch.tensor(int(rows.column("label")[index].as_py()), dtype=torch.int64)


def model_input(pixels: np.ndarray, size: int, channels: int = 1, normalize: str | bool = "none") -> torch.Tensor:
    """What a model sees for a raw grayscale array: [0, 1], resized, channels, normalisation
    (``normalize``: a config's ``data.normalization``; True means ImageNet's, as ``imagenet_norm``).

    Used for new images at prediction time, so they are prepared exactly as in training.
    """
    image = F.resize(_to_tensor(pixels), [size, size], antialias=True)
    return _finish(image, channels, "imagenet" if normalize is True else (normalize or "none"))


def _finish(image: torch.Tensor, channels: int, normalize: str) -> torch.Tensor:
    if channels == 3:
        image = image.expand(3, -1, -1).contiguous()
    if normalize == "imagenet":
        mean = torch.tensor(IMAGENET_MEAN[:channels]).view(-1, 1, 1)
        std = torch.tensor(IMAGENET_STD[:channels]).view(-1, 1, 1)
        image = (image - mean) / std
    elif normalize == "image":
        # Each image to mean 0, std 1: the scale optimisers and default inits expect, with no
        # statistics that sites would have to share; a flat image (std below 1e-3, float noise) stays 0.
        std = image.std()
        image = (image - image.mean()) / std if std > 1e-3 else image - image.mean()
    return image


def _to_tensor(pixels: np.ndarray) -> torch.Tensor:
    scale = 65535.0 if pixels.dtype == np.uint16 else 255.0
    return torch.from_numpy(pixels.astype(np.float32) / scale).unsqueeze(0)


def _apply(aug: Augment, rng: np.random.Generator, image: torch.Tensor, mask: torch.Tensor | None):
    """Apply one draw of ``aug`` to the image and, identically, to the mask."""
    angle = float(rng.uniform(-aug.rotate, aug.rotate))
    scale = float(rng.uniform(*aug.scale))
    shear = [float(rng.uniform(-aug.shear, aug.shear)), 0.0]
    hflip = rng.random() < aug.hflip
    vflip = rng.random() < aug.vflip
    brightness = float(rng.uniform(1 - aug.brightness, 1 + aug.brightness))
    contrast = float(rng.uniform(1 - aug.contrast, 1 + aug.contrast))

    def geometric(x: torch.Tensor, nearest: bool) -> torch.Tensor:
        mode = F.InterpolationMode.NEAREST if nearest else F.InterpolationMode.BILINEAR
        if angle or scale != 1.0 or shear[0]:
            x = F.affine(x, angle=angle, translate=[0, 0], scale=scale, shear=shear, interpolation=mode)
        if hflip:
            x = F.horizontal_flip(x)
        if vflip:
            x = F.vertical_flip(x)
        return x

    image = geometric(image, nearest=False)
    if brightness != 1.0:
        image = F.adjust_brightness(image, brightness)
    if contrast != 1.0:
        image = F.adjust_contrast(image, contrast)
    if mask is not None:
        mask = geometric(mask, nearest=True)
    return image.clamp(0, 1), mask
