"""Shared fixtures: small real files written into temporary folders."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr_samples"


@pytest.fixture(scope="session")
def samples() -> Path:
    """The real chest X-ray samples shipped beside the repo (skipped where absent)."""
    if not SAMPLES.is_dir():
        pytest.skip(f"real CXR samples not found at {SAMPLES} (they live outside the repo)")
    return SAMPLES


def write_png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def gradient(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A distinct 8-bit test picture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    return ((x * 3 + y * 5 + rng.integers(0, 40, (h, w))) % 256).astype(np.uint8)


def write_dicom(path: Path, pixels: np.ndarray | None, *, photometric: str = "MONOCHROME2",
                bits: int = 12, slope: float | None = None, intercept: float | None = None,
                window: tuple[float, float] | None = None, **header) -> Path:
    """An uncompressed single-frame DICOM written with pydicom."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    for key, value in header.items():
        setattr(ds, key, value)
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = 16 if bits > 8 else 8
        ds.BitsStored = bits
        ds.HighBit = bits - 1
        ds.PixelRepresentation = 0
        if slope is not None:
            ds.RescaleSlope = slope
            ds.RescaleIntercept = intercept or 0
        if window is not None:
            ds.WindowCenter, ds.WindowWidth = window
        dtype = np.uint16 if bits > 8 else np.uint8
        ds.PixelData = pixels.astype(dtype).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_rows(n: int, *, sites=("A", "B"), labels=(0, 1, 2), size=32, masks=True,
              patients_per_image: int = 1, split_cycle=("train", "train", "train", "val", "test")):
    """Rows in the dataset schema with real PNG payloads, for writer/partition/torch tests."""
    from cxrfl_ray.data.imageio import encode_png

    rows = []
    for i in range(n):
        img = gradient(size, size, seed=i)
        mask = np.zeros((size, size), np.uint8)
        mask[size // 4: 3 * size // 4, size // 8: size // 2] = 255
        pid = f"P{i // patients_per_image:05d}"
        rows.append({
            "id": f"t:{i:05d}", "source": "test", "site": sites[i % len(sites)], "patient_id": pid,
            "split": split_cycle[(i // patients_per_image) % len(split_cycle)],
            "label": labels[(i // patients_per_image) % len(labels)], "label_name": None,
            "image": encode_png(img), "height": size, "width": size, "bit_depth": 8,
            "mask": encode_png(mask) if masks else None, "view": "PA", "sex": "F", "age": 50.0,
            "original_path": f"/x/{i}.png", "boxes": None,
        })
    return rows


@pytest.fixture()
def small_dataset(tmp_path):
    """A 120-row dataset over 3 shards, 2 sites, 3 labels, 2 images per patient."""
    from cxrfl_ray.data.writer import DatasetWriter

    out = tmp_path / "small"
    with DatasetWriter(out, name="small", label_names=["a", "b", "c"], shard_rows=50, row_group_rows=16) as w:
        for row in make_rows(120, patients_per_image=2):
            w.add(row)
    return out


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, phantoms):
    """One cheap `cxrfl train` run folder per task (one-conv models, 2 steps at 64 px), shared by
    the tests that need a finished run or its checkpoint (predict, pictures)."""
    from cxrfl_ray.cli import main as cxrfl

    data = phantoms(n=120, size=64)
    out = tmp_path_factory.mktemp("tiny-runs")
    found = {}
    for task, model in (("segmentation", "tiny-conv-seg"), ("classification", "tiny-conv")):
        assert cxrfl(["train", "--set", f"data.path={data}", "--set", f"task={task}", "--set", f"model.name={model}",
                      "--set", "data.size=64", "--set", "train.steps=2", "--set", "train.epochs=1",
                      "--set", "tracking.wandb=disabled", "--set", f"out_dir={out}", "--set", f"name={task}",
                      "--quiet"]) == 0
        (found[task],) = out.glob(f"{task}-central-*")
    return found


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory):
    """Factory of phantom datasets, cached per (n, size, seed) for the whole session."""
    from cxrfl_ray.data.synth import write_synthetic_dataset

    cache: dict = {}

    def make(n: int = 200, size: int = 64, seed: int = 0, sites: int = 4) -> Path:
        key = (n, size, seed, sites)
        if key not in cache:
            out = tmp_path_factory.mktemp("phantoms") / f"p{n}-{size}-{seed}-{sites}"
            write_synthetic_dataset(out, n=n, sites=sites, size=size, seed=seed, progress=False)
            cache[key] = out
        return cache[key]

    return make


@pytest.fixture(scope="session")
def ray_session():
    """One small local Ray for the whole test session (the engine reuses a running Ray and
    leaves it up), shut down at the end with the client actors kept for reuse."""
    import ray

    from cxrfl_ray.fl.backend import release_idle_actors
    from cxrfl_ray.fl.engine import start_ray

    start_ray(num_cpus=2, object_store_memory=100 * 1024**2)
    yield ray
    release_idle_actors()
    ray.shutdown()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """All processes below ``pid`` (Ray's GCS, raylet and workers of a killed driver)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_process_tree(proc) -> None:
    """SIGKILL a subprocess started with ``start_new_session=True`` and everything below it (as a
    crash or an OOM kill would), then reap it."""
    import signal

    os.killpg(proc.pid, signal.SIGSTOP)  # frozen at once: finding the tree below takes a moment
    victims = _descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
