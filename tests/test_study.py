"""`cxrfl study`: the whole real-hospital study on real X-rays (a small subset of Montgomery and
Shenzhen, read in place from ../shared/data/lungseg_mc_sz; nothing is copied)."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cxrfl_ray.cli import main as cxrfl
from cxrfl_ray.config import ConfigError, load_config
from cxrfl_ray.data.imageio import decode_png
from cxrfl_ray.data.store import open_dataset
from cxrfl_ray.experiment import prepare

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "lungseg_mc_sz"
SITES = ("montgomery", "shenzhen")
PER_LABEL = 12  # per site and label: 24 images a site
SPEC = Path(__file__).resolve().parents[1] / "tune_configs" / "real_hospitals.yaml"
# Tiny on purpose: 64 px stored, 32 px segmented, 2 rounds, one strategy, 8 CAM images, one torch thread.
# Classification at 64 px: ResNet18's last block then has 2x2 cells (a 1x1 map has no CAM).
TINY = ["ingest.max_size=64", "set.data.size=32", "set.data.augment=false", "set.data.cache_mb=64",
        "set.tracking.wandb=disabled", "set.fl.rounds=2", "set.train.device=cpu", "set.train.num_threads=1",
        "set.train.lr=0.003", "set.train.batch_size=4", "set.train.steps=4", "set.train.eval_batch_size=64",
        "segmentation.strategies=[{name: fedavg}]",
        # GroupNorm: 8 steps of 4 images are too few for BatchNorm's running statistics (mask IoU 0.47 vs 0.5+).
        "segmentation.set.model.norm=group", "classification.set.data.size=64", "mask.threshold=0.5",
        "cam.n=8", "ingest.workers=2"]


@pytest.fixture(scope="module")
def real() -> Path:
    if not REAL.is_dir():
        pytest.skip(f"real hospital X-rays not found: {REAL} absent (../shared/data/lungseg_mc_sz beside the repo)")
    return REAL


def _rows(site: Path) -> list[dict[str, str]]:
    with open(site / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [r for label in ("normal", "tuberculosis") for r in [r for r in rows if r["label"] == label][:PER_LABEL]]


def _write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


@pytest.fixture(scope="module")
def subset(real, tmp_path_factory) -> dict[str, Path]:
    """One folder per site: a labels.csv of 24 of its rows and links to the shared images/masks."""
    root = tmp_path_factory.mktemp("hospitals")
    folders = {}
    for site in SITES:
        folder = root / site
        _write_csv(folder / "labels.csv", _rows(real / site))
        for sub in ("images", "masks"):
            (folder / sub).symlink_to(real / site / sub, target_is_directory=True)
        folders[site] = folder
    return folders


def _binary_auroc_works() -> bool:
    from cxrfl_ray.tasks.classification import metrics_from_proba

    try:
        metrics_from_proba(np.array([[0.8, 0.2], [0.3, 0.7]]), np.array([0, 1]))
    except ValueError:
        return False
    return True


@pytest.fixture(scope="module")
def study(subset, tmp_path_factory, ray_session) -> dict:
    if not _binary_auroc_works():
        pytest.fail("cxrfl_ray/tasks/classification.py metrics_from_proba raises on two classes (normal vs "
                    "tuberculosis): roc_auc_score(multi_class='ovr') needs probs[:, 1] when k == 2; the study's "
                    "classification step cannot run until that is fixed")
    out = tmp_path_factory.mktemp("study") / "real"
    sources = "sources=[" + ", ".join(str(subset[s]) for s in SITES) + "]"
    argv = ["study", str(SPEC), "--out", str(out), "--quiet", *[a for t in [sources, *TINY] for a in ("--set", t)]]
    assert cxrfl(argv) == 0
    return {"out": out, "argv": argv, "result": json.loads((out / "study.json").read_text())}


def test_each_site_folder_and_both_together_ingest_with_csv_site_counts(subset, study, tmp_path):
    # One folder per site: its own dataset, every CSV row a row with its mask.
    for site, folder in subset.items():
        assert cxrfl(["ingest", "manifest", str(folder), "--out", str(tmp_path / site), "--max-size", "64",
                      "--quiet"]) == 0
        card = open_dataset(tmp_path / site).card
        assert card["counts"]["site"] == {site: 2 * PER_LABEL}
        assert card["num_rows"] == card["num_masks"] == 2 * PER_LABEL and card["num_skipped"] == 0
        assert card["counts"]["label"] == {"normal": PER_LABEL, "tuberculosis": PER_LABEL}
    # Absolute paths in a CSV work too (the image folder named with --images).
    rows = [{**r, "filename": str(REAL / "montgomery" / r["filename"]),
             "mask_file": str(REAL / "montgomery" / r["mask_file"])} for r in _rows(REAL / "montgomery")[:3]]
    _write_csv(tmp_path / "abs" / "labels.csv", rows)
    assert cxrfl(["ingest", "manifest", str(tmp_path / "abs"), "--images", str(REAL / "montgomery" / "images"),
                  "--out", str(tmp_path / "abs-ds"), "--max-size", "64", "--quiet"]) == 0
    assert open_dataset(tmp_path / "abs-ds").card["num_masks"] == 3
    # Both folders in one dataset (the study's): each CSV's rows under its site, ids by folder.
    full = open_dataset(study["out"] / "data" / "full")
    assert full.card["counts"]["site"] == {s: 2 * PER_LABEL for s in SITES}
    assert full.card["num_masks"] == 4 * PER_LABEL and max(full.card["image_size"]["height"]["max"],
                                                            full.card["image_size"]["width"]["max"]) == 64
    ids = full.metadata.column("id").to_pylist()
    assert {i.split(":")[0] for i in ids} == set(SITES) and len(set(ids)) == len(ids)
    assert study["result"]["dataset"]["sites"] == {s: 2 * PER_LABEL for s in SITES}


def test_segmentation_table_same_budget_and_federated_learning(study):
    seg = study["result"]["segmentation"]
    assert seg["sites"] == list(SITES)
    models = seg["models"]
    assert set(models) == {"pooled", "local-montgomery", "local-shenzhen", "fl-fedavg"}
    for name, m in models.items():  # every model evaluated on every site's test rows and on all
        assert set(m["test"]) == {*SITES, "all"}, name
        assert all(0 <= m["test"][v]["jaccard"] <= 1 for v in m["test"]), name
        assert m["wall_time_s"] > 0
    # Same rows seen: the federated run's, within one epoch of each baseline's rows.
    fl_rows = models["fl-fedavg"]["rows_seen"]
    assert fl_rows == pytest.approx(seg["federated_rows"])
    full = prepare(load_config(study["out"] / models["pooled"]["run"] / "config.yaml"))
    steps, batch = full.cfg.train.steps, full.cfg.train.batch_size
    assert steps == 4  # an epoch is 4 steps of 4 rows, for the clients and the baselines alike
    assert fl_rows == 2 * len(SITES) * steps * batch  # rounds x sites x one epoch of steps
    for name in ("pooled", *(f"local-{s}" for s in SITES)):
        assert models[name]["rows_seen"] == fl_rows, name
        assert models[name]["epochs"] == 2 * len(SITES), name  # as many steps as all federated clients
    # Federated training learned: Jaccard after round 2 above the initial model's (round 0).
    metrics = pq.read_table(study["out"] / models["fl-fedavg"]["run"] / "metrics.parquet").to_pylist()
    jac = {r["round"]: r["value"] for r in metrics if (r["scope"], r["id"], r["metric"]) == ("central", "test", "jaccard")}
    assert jac[2] > jac[0] + 0.05, jac
    # The table's cells are the checkpoint's own evaluation (best.safetensors on the test rows).
    summary = json.loads((study["out"] / models["pooled"]["run"] / "summary.json").read_text())
    assert models["pooled"]["test"]["all"]["jaccard"] == pytest.approx(summary["test"]["central:test"]["jaccard"])
    assert models["local-montgomery"]["test"]["shenzhen"]["jaccard"] == pytest.approx(
        json.loads((study["out"] / models["local-montgomery"]["run"] / "summary.json").read_text())
        ["test"]["site:shenzhen"]["jaccard"])


def test_masks_are_nonempty_inside_the_image_and_partitions_match(study):
    out = study["out"]
    full, masked = open_dataset(out / "data" / "full"), open_dataset(out / "data" / "masked")
    assert study["result"]["mask"]["model"] == "fl-fedavg"
    assert full.metadata.column("id").to_pylist() == masked.metadata.column("id").to_pylist()
    for col in ("site", "split", "label", "patient_id"):
        assert full.metadata.column(col).to_pylist() == masked.metadata.column(col).to_pylist(), col
    rows = masked.take(np.arange(masked.num_rows), ["image", "mask", "height", "width"]).to_pylist()
    areas = []
    for r in rows:
        image, mask = decode_png(r["image"]), decode_png(r["mask"]) > 127
        assert mask.shape == image.shape == (r["height"], r["width"])
        assert not image[~mask].any()  # zero outside the predicted lungs
        areas.append(mask.mean())
    areas = np.asarray(areas)
    assert ((areas > 0.05) & (areas < 0.8)).mean() >= 0.9  # lungs found, not the whole image
    truth = [decode_png(m) > 127 for m in full.take(np.arange(full.num_rows), ["mask"]).column("mask").to_pylist()]
    predicted = [decode_png(r["mask"]) > 127 for r in rows]
    iou = [(t & p).sum() / max((t | p).sum(), 1) for t, p in zip(truth, predicted)]
    assert np.mean(iou) > 0.5  # where the lungs are, not just lung-sized
    flagged = {f["id"] for f in study["result"]["mask"]["flagged"]}
    assert flagged <= set(full.metadata.column("id").to_pylist())
    # Classification: identical id lists per client on full and masked images.
    cls = study["result"]["classification"]
    assert cls["identical_partitions"] and cls["clients"] == 2
    preps = [prepare(load_config(out / cls["models"][k]["run"] / "config.yaml")) for k in ("full", "masked")]
    ids = [np.asarray(p.dataset.metadata.column("id").to_pylist(), dtype=object) for p in preps]
    for a, b in zip(preps[0].plan.clients, preps[1].plan.clients):
        assert list(ids[0][a]) == list(ids[1][b])


def test_classification_cam_and_report(study):
    out, r = study["out"], study["result"]
    for kind in ("full", "masked"):
        test = r["classification"]["models"][kind]["test"]
        assert set(test) == {*SITES, "all"}
        for view, m in test.items():
            assert 0 <= m["accuracy"] <= 1 and 0 <= m["f1_macro"] <= 1, (kind, view)
    cam = r["cam"]
    assert cam["n"] == min(8, r["dataset"]["splits"]["test"])
    for name in ("full", "masked"):
        assert np.isfinite(cam["summaries"][name]["overall"]) and 0 <= cam["summaries"][name]["overall"] <= 1
    focus = (out / "cam" / "focus.csv").read_text().splitlines()
    assert len(focus) == cam["n"] + 1
    scores = [float(line.split(",")[i]) for line in focus[1:] for i in (3, 5)]
    assert np.isfinite(scores).mean() >= 0.5 and all(0 <= x <= 1 for x in scores if np.isfinite(x))
    report = (out / "report.md").read_text()
    for heading in ("## Segmentation", "## Mask", "## Classification", "## Lung focus", "## Wall time"):
        assert heading in report
    assert "| model | montgomery | shenzhen | all | rows seen |" in report
    assert "| model | test rows of | accuracy | AUROC | macro-F1 |" in report
    assert "local-montgomery on shenzhen's test rows" in report and "**Finding.**" in report
    for link in ("cam/grid.png", "segmentation/fl-fedavg/jaccard.png", "classification/masked/accuracy.png"):
        assert f"({link})" in report and (out / link).is_file()
    assert set(r["steps_s"]) == {"ingest", "segmentation", "mask", "classification", "cam"}
    assert r["total_s"] == pytest.approx(sum(r["steps_s"].values()), abs=0.05)


def test_a_rerun_skips_every_finished_step(study, capsys):
    out = study["out"]
    stamps = {p: p.stat().st_mtime for p in out.glob("*/*/summary.json")}
    assert len(stamps) == 6
    (out / "segmentation" / "pooled" / "evaluation.json").unlink()  # an interrupted evaluation is redone
    start = time.time()
    assert cxrfl(study["argv"]) == 0
    assert time.time() - start < 30
    assert {p: p.stat().st_mtime for p in out.glob("*/*/summary.json")} == stamps
    again = json.loads((out / "study.json").read_text())
    assert again["segmentation"] == study["result"]["segmentation"]
    assert again["classification"] == study["result"]["classification"] and again["cam"] == study["result"]["cam"]
    # A changed experiment does not silently reuse a run made with another config.
    assert cxrfl([*study["argv"], "--set", "segmentation.set.train.lr=0.01"]) == 2
    assert "holds a run of another config (train.lr" in capsys.readouterr().err


def test_bad_specs_fail_before_anything_runs(subset, tmp_path):
    from cxrfl_ray.study import load_study, run_study

    with pytest.raises(ConfigError, match=r"sources: .*not found"):
        load_study(SPEC, [f"sources=[{tmp_path / 'nowhere'}]"])
    with pytest.raises(ConfigError, match=r"cam\.bogus: Extra inputs"):
        load_study(SPEC, ["cam.bogus=1"])
    with pytest.raises(ConfigError, match=r"segmentation\.preset: .*classification preset"):
        load_study(SPEC, ["segmentation.preset=real-classification"])
    sources = f"sources=[{subset['montgomery']}, {subset['shenzhen']}]"
    with pytest.raises(ConfigError, match=r"fl-fedavgm: .*bogus"):
        run_study(SPEC, out=tmp_path / "s", overrides=[sources, "segmentation.strategies=[{name: fedavgm, options: {bogus: 1}}]"])
    with pytest.raises(ConfigError, match=r"train\.lr"):
        run_study(SPEC, out=tmp_path / "s", overrides=[sources, "classification.set.train.lr=-1"])
    assert not (tmp_path / "s").exists()
