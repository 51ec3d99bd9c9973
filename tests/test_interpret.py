"""`cxrfl cam`: Grad-CAM overlays and the lung-focus score, full-image vs lung-masked classifiers."""

from __future__ import annotations

import csv
import re

import numpy as np
import pytest
import torch
from PIL import Image

from cxrfl_ray.cli import main as cxrfl
from cxrfl_ray.data.writer import DatasetWriter
from cxrfl_ray.interpret import focus_score, resolve_layer
from cxrfl_ray.tasks.models import ModelError, create_model
from tests.conftest import make_rows
from tests.test_cascade import cam_pipeline


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return cam_pipeline(tmp_path_factory)


def _read_focus(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def compared(pipeline, tmp_path_factory):
    """`cxrfl cam` of the full-image model on the full images next to the masked-image model on
    the masked images (the same 24 test images); lung masks: the phantoms' exact ones."""
    out = tmp_path_factory.mktemp("cam") / "compare"
    code = cxrfl(["cam", str(pipeline["cls_full"]), str(pipeline["full"]), "--out", str(out), "--n", "24",
                  "--compare", str(pipeline["cls_masked"]), "--compare-dataset", str(pipeline["masked"]),
                  "--seed", "0", "--device", "cpu"])
    assert code == 0
    return out


def test_full_image_classifier_looks_less_at_the_lungs_than_the_masked_one(compared, capsys):
    rows = _read_focus(compared / "focus.csv")
    assert len(rows) == 24
    full = np.array([float(r["score_main"]) for r in rows])
    masked = np.array([float(r["score_compare"]) for r in rows])
    assert np.isfinite(full).all() and np.isfinite(masked).all()
    assert ((0 <= full) & (full <= 1)).all() and ((0 <= masked) & (masked <= 1)).all()
    # The shortcut below the lungs draws the full-image model's attention out of them.
    assert full.mean() < masked.mean(), (full.mean(), masked.mean())
    report = (compared / "cam_report.md").read_text()
    stated = dict(re.findall(r"Overall mean lung-focus score of (\w+): ([0-9.]+)", report))
    assert float(stated["main"]) == pytest.approx(full.mean(), abs=5e-4)
    assert float(stated["compare"]) == pytest.approx(masked.mean(), abs=5e-4)
    assert "mask column of" in report and "(ground truth)" in report
    # Per-class means in the table are those of the CSV.
    lung_opacity = [r for r in rows if r["label"] == "Lung Opacity"]
    if lung_opacity:
        row = next(line for line in report.splitlines() if line.startswith("| main |"))
        mean = np.mean([float(r["score_main"]) for r in lung_opacity])
        assert f"{mean:.3f}" in [cell.strip() for cell in row.split("|")]


def test_cam_writes_overlays_and_a_side_by_side_grid_for_the_same_ids(compared, pipeline):
    rows = _read_focus(compared / "focus.csv")
    ids = [r["id"] for r in rows]
    overlays = sorted(p.name for p in (compared / "overlays").glob("*.png"))
    assert len(overlays) == 48
    assert {f"{rid.replace(':', '_')}_{m}.png" for rid in ids for m in ("main", "compare")} == set(overlays)
    first = Image.open(compared / "overlays" / overlays[0])
    assert first.mode == "RGB" and first.size == (96, 96)
    grid = Image.open(compared / "grid.png")
    assert grid.size[0] > 3 * 150 and grid.size[1] > 24 * 150  # 24 rows of image, main, compare
    # The picks are test images, seeded: the same seed gives the same ids, another seed others.
    from cxrfl_ray.data.store import open_dataset
    from cxrfl_ray.interpret import pick_rows

    ds = open_dataset(pipeline["full"])
    meta = ds.metadata.to_pydict()
    assert [meta["id"][i] for i in pick_rows(ds, "test", 24, 0)] == ids
    assert all(meta["split"][meta["id"].index(rid)] == "test" for rid in ids)
    assert list(pick_rows(ds, "test", 24, 1)) != list(pick_rows(ds, "test", 24, 0))


def test_focus_score_is_the_share_of_cam_energy_inside_the_mask():
    cam = np.zeros((4, 4), np.float32)
    cam[0, 0], cam[3, 3] = 3.0, 1.0
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    assert focus_score(cam, mask) == pytest.approx(0.75)
    assert focus_score(cam, ~mask) == pytest.approx(0.25)
    assert np.isnan(focus_score(np.zeros((4, 4)), mask))
    # A mask stored at another size is resized (nearest) onto the map.
    assert focus_score(cam, np.kron(mask, np.ones((2, 2), bool))) == pytest.approx(0.75)


def test_layers_resolve_from_dotted_paths():
    model = create_model("resnet18", "classification", 1, 3)
    assert resolve_layer(model, "layer4.-1") is model.layer4[-1]
    assert resolve_layer(model, "layer4[-1]") is model.layer4[1]
    assert resolve_layer(model, "layer3.0.conv1") is model.layer3[0].conv1
    with pytest.raises(ModelError, match=r"'layer9' does not exist in resnet18: no 'layer9' in resnet18; "
                                         r"valid names there: conv1, bn1, act1, maxpool, layer1"):
        resolve_layer(model, "layer9", "resnet18")
    with pytest.raises(ModelError, match=r"layer4 has 2 children, no index 5"):
        resolve_layer(model, "layer4.5", "resnet18")
    dense = create_model("densenet121", "classification", 1, 3)
    assert isinstance(resolve_layer(dense, "features[-1]"), torch.nn.Module)


@pytest.fixture()
def unmasked(tmp_path):
    """A small dataset without lung masks (like RSNA before `cxrfl mask`)."""
    out = tmp_path / "nomask"
    with DatasetWriter(out, name="nomask", label_names=["Normal", "No Lung Opacity / Not Normal", "Lung Opacity"]) as w:
        for row in make_rows(20, masks=False, size=48):
            w.add(row)
    return out


def test_cam_refuses_bad_input_clearly(pipeline, unmasked, tmp_path, capsys):
    args = ["cam", str(pipeline["cls_full"]), str(unmasked), "--out", str(tmp_path / "o"), "--n", "2"]
    assert cxrfl(args) == 2
    assert f"dataset {unmasked} has no lung masks; pass --masks or --seg" in capsys.readouterr().err
    bad_layer = ["cam", str(pipeline["cls_full"]), str(pipeline["full"]), "--out", str(tmp_path / "o"), "--n", "2",
                 "--layer", "layer4.9"]
    assert cxrfl(bad_layer) == 2
    err = capsys.readouterr().err
    assert "layer 'layer4.9' does not exist in resnet18: resnet18.layer4 has 2 children, no index 9" in err
    assert cxrfl([*bad_layer[:-1], "head.missing"]) == 2
    err = capsys.readouterr().err
    assert "layer 'head.missing' does not exist in resnet18" in err and "valid names there" in err
    assert cxrfl(["cam", str(pipeline["seg"]), str(pipeline["full"]), "--out", str(tmp_path / "o")]) == 2
    assert "holds a segmentation model (unet-resnet18), but a classification model is needed" in capsys.readouterr().err
    assert cxrfl(["cam", str(pipeline["cls_full"]), str(pipeline["full"]), "--out", str(tmp_path / "o"),
                  "--split", "holdout"]) == 2
    assert "has no rows in split 'holdout'" in capsys.readouterr().err


def test_masks_for_the_score_can_come_from_a_segmentation_model_or_another_dataset(pipeline, unmasked, tmp_path):
    out = tmp_path / "seg"
    assert cxrfl(["cam", str(pipeline["cls_full"]), str(unmasked), "--out", str(out), "--n", "3",
                  "--seg", str(pipeline["seg"])]) == 0
    report = (out / "cam_report.md").read_text()
    assert f"predicted by {pipeline['seg']} (--seg, threshold 0.05)" in report
    assert len(_read_focus(out / "focus.csv")) == 3
    # The masked dataset's predicted masks, matched by id, for the full images.
    out = tmp_path / "masks"
    assert cxrfl(["cam", str(pipeline["cls_full"]), str(pipeline["full"]), "--out", str(out), "--n", "3",
                  "--masks", str(pipeline["masked"])]) == 0
    assert f"mask column of {pipeline['masked']} (--masks; predicted)" in (out / "cam_report.md").read_text()
