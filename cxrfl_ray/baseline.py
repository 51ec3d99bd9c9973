"""Centralised training on pooled data (the reference every federated result is compared to)
and local-only training (one client alone): the same task code the federated clients run."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from cxrfl_ray.config import ConfigError, ExperimentConfig
from cxrfl_ray.experiment import Prepared, evaluate_views, prepare
from cxrfl_ray.jsonio import write_json
from cxrfl_ray.pictures import write_pictures
from cxrfl_ray.plots import plot_series
from cxrfl_ray.tasks.checkpoint import save_checkpoint
from cxrfl_ray.tasks.models import create_model
from cxrfl_ray.tasks.training import (check_finite, located, make_optimizer, make_scheduler, seed_everything,
                                      select_device, train_local)
from cxrfl_ray.tracking import MetricsSink

log = logging.getLogger("cxrfl.train")


def new_run_dir(cfg: ExperimentConfig, kind: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(cfg.out_dir) / f"{cfg.name}-{kind}-{stamp}"
    run, k = base, 1
    while run.exists():
        k += 1
        run = base.with_name(f"{base.name}-{k}")
    run.mkdir(parents=True)
    return run


def evaluate_and_log(prep: Prepared, model, device, loss_fn, sink: MetricsSink, round_: int,
                     keys) -> dict[tuple[str, str], dict[str, float]]:
    results = evaluate_views(prep, model, device, loss_fn, keys)
    for (scope, vid), metrics in results.items():
        sink.log(round_, scope, vid, metrics)
    return results


def run_training(cfg: ExperimentConfig, local_only: int | None = None, quiet: bool = False,
                 run_dir: str | Path | None = None) -> Path:
    """Train centrally (or on one client's rows alone) and write a run folder (``run_dir``, or a
    new dated folder under ``out_dir``: a caller that names it can find it again).

    The folder holds ``config.yaml``, ``metrics.parquet`` (per epoch: train loss, validation
    metrics; at the end: test, per-site and held-out-site metrics of the best checkpoint),
    ``best.safetensors``, ``last.safetensors``, ``summary.json``, a PNG of the main metric and pictures
    of the best checkpoint's test predictions (``pictures.write_pictures``).
    """
    prep = prepare(cfg)
    cfg = prep.cfg  # with counts taken from the dataset (partition.clients: sites)
    if local_only is not None and not 0 <= local_only < len(prep.plan.clients):
        raise ConfigError(f"--local-only {local_only}: the plan has clients 0..{len(prep.plan.clients) - 1}")
    rows = prep.pooled_train_rows if local_only is None else prep.plan.clients[local_only]
    kind = "central" if local_only is None else f"local{local_only}"
    device = select_device(cfg.train.device)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    run = new_run_dir(cfg, kind) if run_dir is None else Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    cfg.save(run / "config.yaml")
    sink = MetricsSink(run / "metrics.parquet")

    seed_everything(cfg.seed)
    model = create_model(cfg.model.name, cfg.task, cfg.data.channels, prep.num_classes, cfg.model.pretrained,
                         norm=cfg.model.norm).to(device)
    loss_fn = prep.task.make_loss(cfg.loss_name, cfg.train.class_weights).to(device)
    optimizer = make_optimizer(model.parameters(), cfg.train)
    train_loader = prep.loader(rows, train=True)
    steps_per_epoch = cfg.train.steps or len(train_loader)
    scheduler = make_scheduler(optimizer, cfg.train, steps_per_epoch * cfg.train.epochs)
    checkpoint_args = dict(cfg=cfg, num_classes=prep.num_classes, label_names=prep.label_names)
    val_view = ("central", cfg.data.val_split)
    main = prep.task.main_metric
    best, best_epoch = None, None
    for epoch in range(cfg.train.epochs):
        fit = train_local(model, train_loader, loss_fn, optimizer, device, epochs=1, steps=cfg.train.steps,
                          first_epoch=epoch, scheduler=scheduler)
        sink.log(epoch, "train", kind, {"loss": fit["loss"], "examples": fit["examples"]})
        # A diverged epoch stops the run before its model can be saved or picked as best.
        check_finite(f"epoch {epoch}", {"train loss": fit["loss"]}, model.state_dict())
        with located(f"epoch {epoch}"):
            scores = evaluate_and_log(prep, model, device, loss_fn, sink, epoch, [val_view])
        check_finite(f"epoch {epoch}", {k: v for k, v in scores.get(val_view, {}).items() if k in ("loss", main)})
        score = scores.get(val_view, {}).get(main, -fit["loss"])  # no val rows: pick by train loss
        if prep.task.better(score, best):
            best, best_epoch = score, epoch
            save_checkpoint(run / "best.safetensors", model, **checkpoint_args, info={"epoch": epoch, main: score})
        save_checkpoint(run / "last.safetensors", model, **checkpoint_args, info={"epoch": epoch})
        sink.flush()
        if not quiet:
            print(f"epoch {epoch}: train loss {fit['loss']:.4f}, val {main} {score:.4f}", flush=True)

    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(run / "best.safetensors"), device=str(device)))
    final = evaluate_and_log(prep, model, device, loss_fn, sink, best_epoch,
                             [k for k in prep.views if k != val_view])
    sink.flush()
    summary = {
        "kind": kind, "task": cfg.task, "model": cfg.model.name, "main_metric": main,
        "best_val": best, "best_epoch": best_epoch, "train_rows": int(rows.size),
        "test": {f"{s}:{i}": m for (s, i), m in final.items()},
        "wall_time_s": round(time.time() - sink.start, 2),
    }
    write_json(run / "summary.json", summary)
    plot_series(run / f"{main}.png", {f"val {main}": sink.series("central", cfg.data.val_split, main)},
                ylabel=main, title=f"{cfg.name} ({kind})")
    write_pictures(run, prep, device)
    return run
