"""Pictures of a run's predictions (``cxrfl_ray/pictures.py``): drawn from the best checkpoint, on
seeded test images, with the numbers the task itself computes."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cxrfl_ray import pictures
from cxrfl_ray.cli import main as cxrfl
from cxrfl_ray.config import build_config
from cxrfl_ray.experiment import prepare
from cxrfl_ray.tasks import classification, segmentation
from cxrfl_ray.tasks.checkpoint import load_checkpoint

MAX_BYTES = 300 * 1024
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def runs(tiny_runs):
    """One cheap `cxrfl train` run folder per task (conftest's ``tiny_runs``)."""
    return tiny_runs


def _prepared(run):
    """The run's data side, from the config it saved."""
    import yaml

    return prepare(build_config(yaml.safe_load((run / "config.yaml").read_text())))


def _test_metrics(run, metric_prefix):
    """The run's own final metrics of the best checkpoint on central:test, from metrics.parquet."""
    return {r["metric"]: r["value"] for r in pq.read_table(run / "metrics.parquet").to_pylist()
            if (r["scope"], r["id"]) == ("central", "test") and r["metric"].startswith(metric_prefix)}


def test_a_train_run_draws_its_seeded_test_images_worst_first_with_the_tasks_jaccard(runs):
    run = runs["segmentation"]
    assert 0 < (run / "overlays.png").stat().st_size <= MAX_BYTES
    prep = _prepared(run)
    cfg, rows = prep.cfg, prep.views[("central", "test")]
    assert cfg.tracking.pictures == 8 and rows.size > 8
    model, _, _ = load_checkpoint(run / "best.safetensors", task="segmentation")
    picked = pictures.choose(rows, 8, cfg.seed)
    panels = pictures.segmentation_panels(model, prep.images(picked, train=False), CPU)
    assert len(panels) == 8
    # The ids are the picked rows' ids, and each Jaccard is collect's tp / (tp + fp + fn) of that image.
    ids = prep.dataset.take(picked, ["id"]).column("id").to_pylist()
    assert sorted(p.id for p in panels) == sorted(ids)
    out = segmentation.collect(model, prep.loader(picked, train=False), CPU, torch.nn.BCEWithLogitsLoss())
    union = out["tp"] + out["fp"] + out["fn"]
    expected = {i: (None if u == 0 else t / u) for i, t, u in zip(ids, out["tp"], union)}
    assert {p.id: p.jaccard for p in panels} == pytest.approx(expected, abs=1e-12)
    scored = [p.jaccard for p in panels if p.jaccard is not None]
    assert scored == sorted(scored) and scored[0] == min(v for v in expected.values() if v is not None)
    assert [p.jaccard is None for p in panels] == sorted(p.jaccard is None for p in panels)  # unscored last
    # All test images drawn: their mean Jaccard is the run's own test Jaccard of the best checkpoint.
    every = pictures.segmentation_panels(model, prep.images(rows, train=False), CPU)
    assert len(every) == rows.size
    mean = np.mean([p.jaccard for p in every if p.jaccard is not None])
    assert mean == pytest.approx(_test_metrics(run, "jaccard")["jaccard"], abs=1e-6)


def test_the_same_seed_draws_the_same_images_and_another_seed_others(runs, tmp_path):
    rows = np.arange(100, 140)
    assert np.array_equal(pictures.choose(rows, 8, 3), pictures.choose(rows, 8, 3))
    assert not np.array_equal(pictures.choose(rows, 8, 3), pictures.choose(rows, 8, 4))
    assert np.array_equal(pictures.choose(rows[::-1], 50, 3), rows)  # fewer than n: all of them
    # Whole runs: the same config writes the same picture, another seed another one.
    prep = _prepared(runs["segmentation"])
    pngs = []
    for seed in (prep.cfg.seed, prep.cfg.seed, prep.cfg.seed + 1):
        folder = tmp_path / str(len(pngs)) / "run"  # one name: the title holds it
        folder.mkdir(parents=True)
        shutil.copy(runs["segmentation"] / "best.safetensors", folder)
        other = dataclasses.replace(prep, cfg=prep.cfg.model_copy(update={"seed": seed}))
        assert pictures.write_pictures(folder, other, CPU) == [folder / "overlays.png"]
        pngs.append((folder / "overlays.png").read_bytes())
    assert pngs[0] == pngs[1] and pngs[0] != pngs[2]


def test_panels_order_worst_first_and_leave_unscored_images_out_of_the_mean():
    out = {"loss": np.zeros(4), "tp": np.array([5.0, 0, 1, 9]), "fp": np.array([0.0, 0, 3, 1]),
           "fn": np.array([5.0, 0, 0, 0])}
    blank = [np.zeros((8, 8))] * 4
    panels = pictures.overlay_panels(["a", "b", "c", "d"], blank, [m > 0 for m in blank], blank, out)
    assert [(p.id, p.jaccard) for p in panels] == [("c", 0.25), ("a", 0.5), ("d", 0.9), ("b", None)]
    assert np.mean([p.jaccard for p in panels[:3]]) == pytest.approx(segmentation.summarise(out)["jaccard"])
    # No ground truth (new images): input order, nothing scored.
    assert [(p.id, p.jaccard) for p in pictures.overlay_panels(["x", "y"], blank[:2], blank[:2])] == \
        [("x", None), ("y", None)]


def test_a_classification_run_draws_the_confusion_matrix_and_roc_curves_of_its_test_split(runs):
    from sklearn.metrics import confusion_matrix, roc_auc_score

    run = runs["classification"]
    for name in ("confusion.png", "roc.png"):
        assert 0 < (run / name).stat().st_size <= MAX_BYTES
    assert not (run / "overlays.png").exists()
    prep = _prepared(run)
    rows = prep.views[("central", "test")]
    model, _, _ = load_checkpoint(run / "best.safetensors", task="classification")
    out = classification.collect(model, prep.loader(rows, train=False), CPU)
    counts = pictures.confusion_counts(out, 3)
    assert counts.sum() == rows.size
    assert np.array_equal(counts, confusion_matrix(out["targets"], out["probs"].argmax(1), labels=[0, 1, 2]))
    logged = _test_metrics(run, "cm_")
    assert {f"cm_{i}_{j}": float(counts[i, j]) for i in range(3) for j in range(3)} == logged
    curves = pictures.roc_curves(out, 3)
    assert sorted(curves) == sorted(np.unique(out["targets"]).tolist())
    for c, (fpr, tpr, auc) in curves.items():
        assert auc == pytest.approx(roc_auc_score(out["targets"] == c, out["probs"][:, c]))
        assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    aurocs = _test_metrics(run, "auroc_")
    for c, (_, _, auc) in curves.items():
        if f"auroc_{c}" in aurocs:
            assert auc == pytest.approx(aurocs[f"auroc_{c}"])


def test_pictures_stay_small_at_any_panel_count(tmp_path):
    rng = np.random.default_rng(0)
    for n in (1, 8, 9, pictures.MAX_PANELS):  # noise, no outline: the least compressible pictures there are
        empty = np.zeros((256, 256), dtype=bool)
        panels = [pictures.Panel(f"site{k}:{k:06d}", float(rng.random()), rng.random((256, 256)), empty, empty)
                  for k in range(n)]
        path = pictures.draw_overlays(tmp_path / f"o{n}.png", panels, "noise")
        assert path.stat().st_size <= MAX_BYTES, n


def test_no_pictures_without_matplotlib_without_a_best_checkpoint_or_with_pictures_0(runs, tmp_path, monkeypatch,
                                                                                   caplog):
    prep = _prepared(runs["segmentation"])
    folder = tmp_path / "run"
    folder.mkdir()
    assert pictures.write_pictures(folder, prep, CPU) == []  # no best.safetensors: a run that stopped early
    shutil.copy(runs["segmentation"] / "best.safetensors", folder)
    off = dataclasses.replace(prep, cfg=prep.cfg.model_copy(
        update={"tracking": prep.cfg.tracking.model_copy(update={"pictures": 0})}))
    assert pictures.write_pictures(folder, off, CPU) == []
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails, as where it is not installed
    with caplog.at_level(logging.WARNING, logger="cxrfl.pictures"):
        assert pictures.write_pictures(folder, prep, CPU) == []
    assert any(m.startswith("pictures skipped: matplotlib is not available") for m in caplog.messages)
    assert sorted(p.name for p in folder.iterdir()) == ["best.safetensors"]
    # predict --overlay still writes its masks.
    out = tmp_path / "pred"
    assert cxrfl(["predict", str(runs["segmentation"] / "best.safetensors"), str(prep.cfg.data.path),
                  "--out", str(out), "--overlay", "3"]) == 0
    assert (out / "masks.csv").is_file() and not (out / "overlays.png").exists()


def test_the_config_field_is_a_count_of_zero_or_more():
    from cxrfl_ray.config import ConfigError

    assert build_config({"tracking": {"pictures": 0}}).tracking.pictures == 0
    for bad in (-1, 17, 2.5, True):
        with pytest.raises(ConfigError, match="tracking.pictures"):
            build_config({"tracking": {"pictures": bad}})
