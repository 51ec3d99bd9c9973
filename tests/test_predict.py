"""`cxrfl predict` on new images: masks at the input size, probabilities in a CSV."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from cxrfl_ray.cli import main as cxrfl
from cxrfl_ray.data.imageio import read_image
from tests.conftest import gradient, write_dicom, write_png


@pytest.fixture(scope="module")
def checkpoints(tiny_runs):
    return {task: run / "best.safetensors" for task, run in tiny_runs.items()}


@pytest.fixture()
def image_folder(tmp_path):
    folder = tmp_path / "new"
    write_png(folder / "a.png", gradient(90, 70))
    write_png(folder / "sub" / "b.jpg", np.dstack([gradient(50, 60)] * 3))
    write_dicom(folder / "c.dcm", gradient(40, 40).astype(np.uint16) * 8, bits=12)
    (folder / "broken.png").write_bytes(b"nope")
    return folder


def test_segmentation_masks_come_back_at_input_size(checkpoints, image_folder, tmp_path, capsys):
    out = tmp_path / "masks"
    assert cxrfl(["predict", str(checkpoints["segmentation"]), str(image_folder), "--out", str(out)]) == 0
    assert "3 images" in capsys.readouterr().out
    shapes = {p.name: read_image(p).shape for p in out.glob("*_mask.png")}
    assert shapes == {"a_mask.png": (90, 70), "sub__b_mask.png": (50, 60), "c_mask.png": (40, 40)}
    for p in out.glob("*_mask.png"):
        assert set(np.unique(read_image(p))) <= {0, 255}
    with open(out / "skipped.csv") as fh:
        assert [r["path"].endswith("broken.png") for r in csv.DictReader(fh)] == [True]


def test_overlay_draws_the_predicted_outlines_of_seeded_inputs(checkpoints, image_folder, tmp_path, phantoms, capsys):
    from cxrfl_ray.predict import predict

    seg = checkpoints["segmentation"]
    out = tmp_path / "all"
    assert cxrfl(["predict", str(seg), str(image_folder), "--out", str(out), "--overlay"]) == 0
    assert "3 images drawn" in capsys.readouterr().out  # 16 asked, 3 readable inputs
    assert 0 < (out / "overlays.png").stat().st_size <= 300 * 1024
    drawn = [predict(seg, image_folder, tmp_path / f"two{k}", overlay=2)["overlays"]["images"] for k in range(2)]
    assert drawn[0] == drawn[1] and len(drawn[0]) == 2  # the checkpoint's seed: the same two every time
    assert {d["id"] for d in drawn[0]} < {"a.png", "c.dcm", "sub/b.jpg"}
    assert all(d["jaccard"] is None for d in drawn[0])  # no ground truth for new images
    # A dataset with masks: the true outline too, each image's Jaccard, worst first.
    images = predict(seg, phantoms(n=120, size=64), tmp_path / "ds", overlay=5)["overlays"]["images"]
    scores = [d["jaccard"] for d in images if d["jaccard"] is not None]
    assert len(images) == 5 and len(scores) >= 4 and scores == sorted(scores)
    assert (tmp_path / "ds" / "overlays.png").is_file()
    assert predict(seg, image_folder, tmp_path / "none").get("overlays") is None  # only when asked
    assert not (tmp_path / "none" / "overlays.png").exists()


def test_classification_writes_probabilities(checkpoints, image_folder, tmp_path, phantoms):
    out = tmp_path / "cls"
    assert cxrfl(["predict", str(checkpoints["classification"]), str(image_folder), "--out", str(out)]) == 0
    with open(out / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["image"] for r in rows] == ["a.png", "c.dcm", "sub/b.jpg"]
    names = ["Normal", "No Lung Opacity / Not Normal", "Lung Opacity"]
    for r in rows:
        probs = [float(r[f"p_{n}"]) for n in names]
        assert abs(sum(probs) - 1) < 1e-4 and r["predicted"] == names[int(np.argmax(probs))]
    # A dataset folder works too: one row per dataset row, named by id.
    data = phantoms(n=120, size=64)
    assert cxrfl(["predict", str(checkpoints["classification"]), str(data), "--out", str(tmp_path / "ds")]) == 0
    with open(tmp_path / "ds" / "predictions.csv") as fh:
        ids = [r["image"] for r in csv.DictReader(fh)]
    assert len(ids) == 120 and ids[0] == "synth:000000"


def test_sample_images_segment_at_their_size(checkpoints, samples, tmp_path):
    out = tmp_path / "real"
    assert cxrfl(["predict", str(checkpoints["segmentation"]), str(samples / "siim_pneumothorax_dicom" / "images"),
                  "--out", str(out)]) == 0
    (mask,) = out.glob("*_mask.png")
    assert read_image(mask).shape == (1024, 1024)


def test_bad_checkpoint_and_input_fail_clearly(checkpoints, tmp_path, capsys):
    (tmp_path / "x.safetensors").write_bytes(b"garbage")
    assert cxrfl(["predict", str(tmp_path / "x.safetensors"), str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not a safetensors checkpoint" in capsys.readouterr().err
    assert cxrfl(["predict", str(checkpoints["segmentation"]), str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"cxrfl predict: error: input not found: {tmp_path / 'none'}\n"
    assert not (tmp_path / "o").exists()  # no output folder for an input that is not there
    assert cxrfl(["predict", str(checkpoints["segmentation"]), str(tmp_path), "--out", str(tmp_path / "o"),
                  "--overlay", "17"]) == 2
    assert "--overlay 17: the number of images to draw must be 0 to 16" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_train_refuses_bad_configs_before_starting(tmp_path, phantoms, capsys):
    data = phantoms(n=120, size=64)
    assert cxrfl(["train", "--set", f"data.path={data}", "--set", "train.lr=-1", "--set", "train.batch_size=0"]) == 2
    err = capsys.readouterr().err
    assert "train.lr: Input should be greater than 0" in err and "train.batch_size" in err
    assert cxrfl(["train", "--set", f"data.path={data}", "--set", "model.name=resnet51", "--set", f"out_dir={tmp_path}"]) == 2
    assert "unknown model 'resnet51'" in capsys.readouterr().err
    assert not list(tmp_path.glob("*-central-*"))  # nothing started
    from cxrfl_ray.data.writer import DatasetWriter
    from tests.conftest import make_rows

    with DatasetWriter(tmp_path / "nomask", name="n", label_names=["a", "b", "c"]) as w:
        for r in make_rows(20, masks=False):
            w.add(r)
    assert cxrfl(["train", "--set", f"data.path={tmp_path / 'nomask'}", "--set", "task=segmentation",
                  "--set", "model.name=tiny-conv-seg"]) == 2
    assert "needs lung masks" in capsys.readouterr().err
