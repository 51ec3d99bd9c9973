"""`cxrfl mask`: a segmentation model cuts the lungs out of a dataset, rows and partitions kept."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from cxrfl_ray.cascade import implausible_reasons, zero_outside
from cxrfl_ray.cli import main as cxrfl
from cxrfl_ray.data.imageio import decode_png, encode_png
from cxrfl_ray.data.partition import plan_partition
from cxrfl_ray.data.schema import METADATA_COLUMNS
from cxrfl_ray.data.store import open_dataset
from cxrfl_ray.data.writer import DatasetWriter

# Phantoms whose Lung Opacity images carry a bright square burned in below the lungs (a
# shortcut); 96 px so the square is 2 px wide and a ResNet18 can pick it up in a few steps.
SIZE, N, MARKER = 96, 400, 1.0


def _train(name: str, task: str, model: str, data: Path, size: int, steps: int, lr: float, batch: int,
           out: Path) -> Path:
    from cxrfl_ray.baseline import run_training
    from cxrfl_ray.config import build_config

    cfg = build_config({
        "name": name, "task": task, "seed": 0, "out_dir": str(out),
        "data": {"path": str(data), "size": size, "augment": False},
        "model": {"name": model}, "partition": {"clients": 1},
        "train": {"steps": steps, "batch_size": batch, "lr": lr, "device": "cpu", "eval_batch_size": 64},
    })
    return run_training(cfg, quiet=True) / "best.safetensors"


def cam_pipeline(tmp_path_factory) -> dict[str, Path]:
    """The paper's second half on marked phantoms, built once per test session (both test
    modules use it; the paths are cached on disk under the session's temporary folder):
    a segmentation model trained centrally, the dataset masked with it, and a ResNet18 trained
    centrally on the full and on the masked images."""
    from cxrfl_ray.cascade import mask_dataset
    from cxrfl_ray.data.synth import write_synthetic_dataset

    root = tmp_path_factory.getbasetemp() / "cam-pipeline"
    done = root / "paths.json"
    if done.exists():
        return {k: Path(v) for k, v in json.loads(done.read_text()).items()}
    runs = root / "runs"
    paths = {"full": root / "full", "masked": root / "masked"}
    write_synthetic_dataset(paths["full"], n=N, sites=4, size=SIZE, seed=0, label_marker=MARKER, progress=False)
    # 120 steps of 4: enough for predictions that follow the image, not a lung-shaped prior
    # (median Jaccard 0.86 against the phantoms' own masks).
    paths["seg"] = _train("seg", "segmentation", "unet-resnet18", paths["full"], 64, 120, 3e-3, 4, runs)
    mask_dataset(paths["seg"], paths["full"], paths["masked"], progress=False)
    paths["cls_full"] = _train("full", "classification", "resnet18", paths["full"], SIZE, 70, 1e-3, 16, runs)
    paths["cls_masked"] = _train("masked", "classification", "resnet18", paths["masked"], SIZE, 70, 1e-3, 16, runs)
    done.write_text(json.dumps({k: str(v) for k, v in paths.items()}))
    return paths


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return cam_pipeline(tmp_path_factory)


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_masked_dataset_keeps_every_row_and_zeroes_outside_the_predicted_lungs(pipeline):
    full, masked = open_dataset(pipeline["full"]), open_dataset(pipeline["masked"])
    assert masked.num_rows == full.num_rows == N
    # Every metadata column (ids, labels, sites, splits, patients, sex, age ...) is unchanged.
    assert masked.metadata.select(list(METADATA_COLUMNS)).equals(full.metadata.select(list(METADATA_COLUMNS)))
    card = masked.card
    assert card["mask_source"] == "predicted" and card["num_masks"] == N
    assert card["cascade"]["threshold"] == 0.05
    assert card["cascade"]["checkpoint"] == str(pipeline["seg"].resolve())
    assert card["counts"] == full.card["counts"]

    before = full.take(np.arange(N), ["image", "mask"]).to_pylist()
    after = masked.take(np.arange(N), ["image", "mask"]).to_pylist()
    jaccards, kept = [], []
    for b, a in zip(before, after):
        image, original = decode_png(a["image"]), decode_png(b["image"])
        predicted = decode_png(a["mask"])
        assert set(np.unique(predicted)) <= {0, 255} and predicted.shape == original.shape
        lungs = predicted == 255
        assert not image[~lungs].any()  # zero outside the predicted lungs
        assert np.array_equal(image[lungs], original[lungs])  # untouched inside
        jaccards.append(_jaccard(lungs, decode_png(b["mask"]) > 127))
        kept.append(lungs.mean())
    # The masks are real lung predictions (not everything, not nothing): the model segments the
    # phantoms' lungs; the low threshold (0.05) makes them generous, so Jaccard is moderate.
    assert np.median(jaccards) > 0.6, np.median(jaccards)
    assert 0.1 < np.median(kept) < 0.5, np.median(kept)


def test_partitions_of_full_and_masked_datasets_are_identical(pipeline):
    full, masked = open_dataset(pipeline["full"]), open_dataset(pipeline["masked"])
    for scheme, args in (("iid", {}), ("dirichlet", {"alpha": 0.3})):
        a = plan_partition(full, scheme, 3, seed=7, **args)
        b = plan_partition(masked, scheme, 3, seed=7, **args)
        assert len(a.clients) == 3
        for ca, cb in zip(a.clients, b.clients):
            assert ca.size > 0 and np.array_equal(ca, cb)
        assert a.central.keys() == b.central.keys()
        assert all(np.array_equal(a.central[k], b.central[k]) for k in a.central)


def test_implausible_masks_are_explained():
    mask = np.zeros((100, 100), bool)
    assert implausible_reasons(mask, 0.05, 0.8, 2) == ["lung area 0.000 of the image is below min_area 0.05"]
    mask[10:60, 10:40] = mask[10:60, 60:90] = True  # two lungs, 30 % of the image
    assert implausible_reasons(mask, 0.05, 0.8, 2) == []
    mask[0:2, 98:100] = True  # a speck (0.04 % of the image) is not a lung
    assert implausible_reasons(mask, 0.05, 0.8, 2) == []
    mask[80:90, 80:90] = True  # a third region (1 %) is
    assert implausible_reasons(mask, 0.05, 0.8, 2) == [
        "3 lung regions (each over 0.5% of the image), more than max_components 2"]
    mask[:] = True
    assert implausible_reasons(mask, 0.05, 0.8, 2) == ["lung area 1.000 of the image is above max_area 0.8"]
    corner = np.zeros((10, 10), bool)
    corner[2:5, 2:5] = corner[5:8, 5:8] = True  # diagonal neighbours: one region
    assert implausible_reasons(corner, 0.0, 1.0, 1) == []
    image = np.arange(16, dtype=np.uint16).reshape(4, 4)
    out = zero_outside(image, image % 2 == 0)
    assert out.dtype == np.uint16 and out.tolist() == [[0, 0, 2, 0], [4, 0, 6, 0], [8, 0, 10, 0], [12, 0, 14, 0]]


@pytest.fixture(scope="module")
def doctored(pipeline, tmp_path_factory):
    """The first 40 phantoms, of which 3 are two half-width chests side by side and 3 are 2x2
    mosaics of small chests: four or eight lungs, implausible for one radiograph."""
    full = open_dataset(pipeline["full"])
    rows = full.take(np.arange(40)).to_pylist()
    images = [decode_png(r["image"]) for r in rows]
    for k in range(3):
        rows[k]["image"] = encode_png(np.concatenate([images[k][:, ::2], images[k + 20][:, ::2]], axis=1))
        rows[k + 3]["image"] = encode_png(np.tile(images[k + 3][::2, ::2], (2, 2)))
    out = tmp_path_factory.mktemp("doctored") / "data"
    with DatasetWriter(out, name="doctored", label_names=full.label_names) as w:
        for r in rows:
            w.add(r)
    return out, [r["id"] for r in rows[:6]]


def test_implausible_predictions_are_flagged_and_dropped_on_request(pipeline, doctored, tmp_path, capsys):
    data, implausible = doctored
    assert cxrfl(["mask", str(pipeline["seg"]), str(data), "--out", str(tmp_path / "kept"), "--quiet"]) == 0
    assert "images with implausible lung masks (kept, listed in the card)" in capsys.readouterr().out
    card = open_dataset(tmp_path / "kept").card
    flagged = {f["id"]: f["reason"] for f in card["cascade"]["flagged"]}
    assert card["num_rows"] == 40 and card["cascade"]["num_flagged"] == len(flagged)
    for rid in implausible:
        assert re.fullmatch(r"\d+ lung regions \(each over 0.5% of the image\), more than max_components 2",
                            flagged[rid]), flagged[rid]
        assert int(flagged[rid].split()[0]) >= 3
    assert len(flagged) <= 6 + 2, flagged  # the genuine chests are plausible

    assert cxrfl(["mask", str(pipeline["seg"]), str(data), "--out", str(tmp_path / "dropped"), "--quiet",
                  "--drop-flagged"]) == 0
    dropped = open_dataset(tmp_path / "dropped")
    kept_ids = dropped.metadata.column("id").to_pylist()
    original = open_dataset(data).metadata.column("id").to_pylist()
    assert kept_ids == [rid for rid in original if rid not in flagged]
    assert dropped.card["cascade"]["drop_flagged"] is True
    assert dropped.card["cascade"]["flagged"] == card["cascade"]["flagged"]

    # The area limits reach the rule: with min_area 0.5 every genuine chest (lungs ~20 %) is flagged.
    assert cxrfl(["mask", str(pipeline["seg"]), str(data), "--out", str(tmp_path / "strict"), "--quiet",
                  "--min-area", "0.5", "--max-area", "0.9"]) == 0
    strict = {f["id"]: f["reason"] for f in open_dataset(tmp_path / "strict").card["cascade"]["flagged"]}
    assert set(strict) == set(original)
    assert all(re.match(r"lung area 0\.\d{3} of the image is below min_area 0.5", strict[rid]) for rid in original[6:])


def test_mask_refuses_bad_input_clearly(pipeline, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert cxrfl(["mask", str(pipeline["cls_full"]), str(pipeline["full"]), "--out", out]) == 2
    err = capsys.readouterr().err
    assert "holds a classification model (resnet18), but a segmentation model is needed" in err
    assert cxrfl(["mask", str(pipeline["seg"]), str(tmp_path / "nowhere"), "--out", out]) == 2
    assert f"dataset folder not found: {tmp_path / 'nowhere'}" in capsys.readouterr().err
    assert cxrfl(["mask", str(pipeline["seg"]), str(pipeline["full"]), "--out", str(pipeline["full"])]) == 2
    assert "is the input dataset" in capsys.readouterr().err
    assert cxrfl(["mask", str(pipeline["seg"]), str(pipeline["full"]), "--out", out, "--threshold", "1.5"]) == 2
    assert "threshold must be in (0, 1), got 1.5" in capsys.readouterr().err
    assert not Path(out).exists()


def test_full_vs_segmented_sweep_differs_only_in_the_data():
    from cxrfl_ray.sweep import load_spec, trial_config

    spec = load_spec(Path(__file__).parents[1] / "tune_configs" / "full_vs_segmented.yaml")
    assert spec.preset is None
    paths = spec.space["data.path"]["grid"]
    assert len(paths) == 2 and {"model.name", "partition.clients"} <= set(spec.space)
    full, masked = (trial_config(spec, {"data.path": p, "model.name": "resnet18", "partition.clients": 3})
                    for p in paths)
    assert full.data.path != masked.data.path
    a, b = full.model_dump(), masked.model_dump()
    a["data"].pop("path"), b["data"].pop("path")
    assert a == b  # same seed, partition, model and training: only the pixels differ
