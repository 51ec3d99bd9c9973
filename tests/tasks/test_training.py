"""The tasks learn the phantoms: real models reach the issue's thresholds, a one-conv model
does clearly worse. Seeded, CPU, through the real `cxrfl train` path."""

from __future__ import annotations

import copy
import json

import pyarrow.parquet as pq
import pytest

from cxrfl_ray.baseline import run_training
from cxrfl_ray.config import build_config


def train(tmp_path, data, size=128, **sections):
    base = {"name": "t", "out_dir": str(tmp_path), "seed": 0,
            "data": {"path": str(data), "size": size, "augment": False}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    run = run_training(build_config(base), quiet=True)
    return run, json.loads((run / "summary.json").read_text())


def test_unet_resnet18_segments_phantom_lungs(tmp_path, phantoms):
    data = phantoms(n=400, size=64, seed=1)
    run, summary = train(tmp_path, data, 64, task="segmentation", model={"name": "unet-resnet18"},
                         train={"optimizer": "adam", "lr": 3e-3, "batch_size": 8, "steps": 50,
                                "lr_schedule": "cosine", "eval_batch_size": 16})
    assert summary["test"]["central:test"]["jaccard"] >= 0.85
    for name in ("config.yaml", "metrics.parquet", "best.safetensors", "last.safetensors", "jaccard.png"):
        assert (run / name).is_file()


def test_resnet18_classifies_phantoms_and_beats_a_one_conv_model(tmp_path, phantoms):
    data = phantoms(n=1500, size=64, seed=2)
    _, real = train(tmp_path, data, 64, model={"name": "resnet18"},
                    train={"optimizer": "adam", "lr": 1e-3, "batch_size": 10, "steps": 100,
                           "lr_schedule": "cosine", "eval_batch_size": 50})
    _, tiny = train(tmp_path, data, 64, model={"name": "tiny-conv"},
                    train={"optimizer": "adam", "lr": 1e-2, "batch_size": 32, "steps": 150, "eval_batch_size": 100})
    acc, floor = real["test"]["central:test"]["accuracy"], tiny["test"]["central:test"]["accuracy"]
    assert acc >= 0.80, real["test"]["central:test"]
    assert floor <= acc - 0.15, (floor, acc)
    # per-site test views of the best checkpoint are reported too
    assert {k for k in real["test"] if k.startswith("site:")} == {"site:site0", "site:site1", "site:site2", "site:site3"}


def test_train_writes_epoch_metrics_and_local_only_uses_one_client(tmp_path, phantoms):
    data = phantoms(n=200, size=64)
    run, summary = train(tmp_path, data, model={"name": "tiny-conv"}, partition={"clients": 4},
                         train={"epochs": 3, "steps": 2, "batch_size": 4})
    metrics = pq.read_table(run / "metrics.parquet").to_pylist()
    val = [(r["round"], r["value"]) for r in metrics if r["scope"] == "central" and r["id"] == "val" and r["metric"] == "accuracy"]
    assert [e for e, _ in val] == [0, 1, 2]
    assert summary["best_val"] == max(v for _, v in val)
    assert summary["best_epoch"] == [e for e, v in val if v == summary["best_val"]][0]
    from cxrfl_ray.data.partition import plan_partition
    from cxrfl_ray.data.store import open_dataset

    splits = open_dataset(data).metadata.column("split").to_pylist()
    assert summary["train_rows"] == splits.count("train")
    base = {"name": "t", "out_dir": str(tmp_path), "data": {"path": str(data), "size": 64},
            "model": {"name": "tiny-conv"}, "partition": {"clients": 4}, "train": {"steps": 1}}
    local = run_training(build_config(base), local_only=2, quiet=True)
    local_summary = json.loads((local / "summary.json").read_text())
    plan = plan_partition(open_dataset(data), "iid", 4, seed=0)
    assert local_summary["train_rows"] == plan.clients[2].size and local_summary["kind"] == "local2"


def test_make_scheduler_cosine_over_total_steps_and_continued_after_done_steps():
    import math

    import torch

    from cxrfl_ray.tasks.training import make_scheduler

    def lrs(total, done=0, steps=None):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        sched = make_scheduler(opt, build_config({"train": {"lr_schedule": "cosine"}}).train, total, done)
        out = []
        for _ in range(steps if steps is not None else total + 2):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    fresh = lrs(10)
    expected = [0.05 * (1 + math.cos(math.pi * min(k, 10) / 10)) for k in range(12)]
    assert fresh == pytest.approx(expected, abs=1e-12)
    assert fresh[0] == pytest.approx(0.1) and fresh[5] == pytest.approx(0.05) and fresh[10:] == [0.0, 0.0]
    for done in (3, 7):  # a later round of one run: step k is step done + k of the whole schedule
        assert lrs(10, done, steps=12 - done) == pytest.approx(fresh[done:], abs=1e-12)
    constant = build_config({"train": {"lr_schedule": "constant"}}).train
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    assert make_scheduler(opt, constant, 10) is None and make_scheduler(opt, constant, 10, 5) is None
    assert lrs(0, steps=2) == [0.1, 0.0]  # no division by zero for an empty run


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd", "adagrad"])
def test_optimizers_take_the_fused_kernel_and_make_the_default_implementations_update(name):
    import torch

    from cxrfl_ray.tasks.training import fused, make_optimizer

    cfg = build_config({"train": {"optimizer": name, "lr": 0.01, "momentum": 0.9 if name == "sgd" else 0.0,
                                  "weight_decay": 1e-4}}).train
    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    initial, reference = copy.deepcopy(ours), copy.deepcopy(ours)
    opt = make_optimizer(ours.parameters(), cfg)
    assert opt.defaults["fused"] is True
    kwargs = {"lr": 0.01, "weight_decay": 1e-4, **({"momentum": 0.9} if name == "sgd" else {})}
    ref = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
           "adagrad": torch.optim.Adagrad}[name](reference.parameters(), foreach=False, **kwargs)
    x, y = torch.randn(16, 7), torch.randint(0, 3, (16,))
    for model, optimizer in ((ours, opt), (reference, ref)):
        for _ in range(4):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    # the models moved, and moved alike
    assert any((p - q).abs().max() > 1e-3 for p, q in zip(reference.parameters(), initial.parameters()))
    differ = [(a - b).abs().max().item() for a, b in zip(ours.parameters(), reference.parameters())]
    assert max(differ) < 1e-5, differ
    # an optimizer this torch has no fused kernel for (RMSprop takes no ``fused``) is built as it is
    plain = fused(torch.optim.RMSprop, iter(ours.parameters()), lr=0.01)
    assert "fused" not in plain.defaults and len(plain.param_groups[0]["params"]) == 4


def test_train_local_stops_at_the_first_nonfinite_loss():
    import math

    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from cxrfl_ray.tasks.training import train_local

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 4) * 100, torch.randint(0, 3, (64,)))
    model = torch.nn.Linear(4, 3)
    fit = train_local(model, DataLoader(data, batch_size=8), torch.nn.CrossEntropyLoss(),
                      torch.optim.SGD(model.parameters(), lr=1e38), torch.device("cpu"), steps=6)
    assert not math.isfinite(fit["loss"])
    assert fit["steps"] == 1  # the step that blew up the weights, and no more
    sane = torch.nn.Linear(4, 3)
    fit = train_local(sane, DataLoader(data, batch_size=8), torch.nn.CrossEntropyLoss(),
                      torch.optim.SGD(sane.parameters(), lr=1e-4), torch.device("cpu"), steps=6)
    assert math.isfinite(fit["loss"]) and fit["steps"] == 6


def test_a_diverging_centralised_run_fails_with_one_line_and_saves_no_model(tmp_path, phantoms, capsys):
    from cxrfl_ray.cli import main as cxrfl

    cfg = build_config({"name": "t", "out_dir": str(tmp_path), "data": {"path": str(phantoms(n=60, size=32)), "size": 32},
                        "model": {"name": "tiny-conv"}, "train": {"epochs": 2, "steps": 2, "batch_size": 8, "lr": 1e30}})
    assert cxrfl(["train", str(cfg.save(tmp_path / "cfg.yaml")), "--quiet"]) == 2
    assert capsys.readouterr().err == "cxrfl train: error: diverged at epoch 0 (train loss nan): lower train.lr\n"
    (run,) = tmp_path.glob("t-central-*")
    assert not (run / "best.safetensors").exists() and not (run / "summary.json").exists()


def test_nonfinite_classifier_outputs_are_divergence_not_a_scikit_learn_error():
    import numpy as np
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from cxrfl_ray.tasks import classification
    from cxrfl_ray.tasks.training import DivergedError, located

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    with torch.no_grad():
        model[1].weight.fill_(float("inf"))  # a diverged model: its logits are inf - inf = nan
    loader = DataLoader(TensorDataset(torch.randn(5, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1])), batch_size=2)
    with pytest.raises(DivergedError) as info, located("round 2"):
        classification.summarise(classification.collect(model, loader, torch.device("cpu"), torch.nn.CrossEntropyLoss()))
    assert str(info.value) == "diverged at round 2 (non-finite model outputs for 5 of 5 images): lower train.lr"
    with pytest.raises(DivergedError, match=r"^diverged \(non-finite model outputs for 1 of 2 images\): lower train.lr$"):
        classification.metrics_from_proba(np.array([[0.2, 0.3, 0.5], [np.nan, 0.5, 0.5]]), np.array([2, 1]))
