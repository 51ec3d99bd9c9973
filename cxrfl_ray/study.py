"""``cxrfl study SPEC``: the whole real-hospital study in one command.

Steps, in order: (1) ingest the hospitals' folders into one dataset (``OUT/data/full``, each
folder a site); (2) lung segmentation: pooled, local-only per site (same rows seen) and one
federated run per strategy, every best checkpoint evaluated the same way on each site's test
rows; (3) the best federated model (mean site Jaccard) masks the dataset (``OUT/data/masked``);
(4) federated classification on full and masked images with identical partitions; (5) Grad-CAM
lung focus of both classifiers; (6) ``OUT/report.md`` and ``OUT/study.json``.

Each step is skipped when its output is complete (a dataset's card, a run's ``summary.json``, an
``evaluation.json``, ``cam/cam.json``), and a federated run with saved round state but no summary
resumes from its last round, so running an interrupted study again continues where it stopped.
A run folder holding a different experiment config is an error, never silently reused.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow.parquet as pq
import yaml

from cxrfl_ray.config import ExperimentConfig, load_config
from cxrfl_ray.data.writer import CARD_NAME
from cxrfl_ray.experiment import Prepared, evaluate_views, prepare, resolve_site_clients
from cxrfl_ray.jsonio import write_json
from cxrfl_ray.study_spec import StudySpec, experiment, load_study, validate

SEG_METRIC = "jaccard"
CLS_METRICS = ("accuracy", "auroc_macro", "f1_macro")


class StudyError(ValueError):
    """A study that cannot go on (e.g. full and masked partitions differ); says what and where."""


# -- runs: skipped when complete, resumed when they can be -------------------------------------

def _complete(run: Path, cfg: ExperimentConfig) -> bool:
    """True when ``run`` finished with ``cfg``; raises when it holds another experiment (paths
    aside, so a moved study folder still resumes)."""
    saved = run / "config.yaml"
    if not saved.is_file():
        return False
    from cxrfl_ray.fl.state import config_changes, format_changes

    changes = config_changes(load_config(saved).model_dump(mode="json"), cfg.model_dump(mode="json"),
                             ignore=("out_dir", "data.path"))
    if changes:
        raise StudyError(f"{run} holds a run of another config ({format_changes(changes, limit=5)}); "
                         f"delete it or use another --out")
    return (run / "summary.json").is_file()


def run_baseline(cfg: ExperimentConfig, run: Path, prep: Prepared, client: int | None, quiet: bool) -> Path:
    """Pooled (``client`` None) or local-only training into ``run``; an unfinished one starts over
    (it keeps no round state)."""
    from cxrfl_ray.baseline import run_training

    if _complete(run, resolve_site_clients(cfg, prep.dataset)):
        return run
    shutil.rmtree(run, ignore_errors=True)
    return run_training(cfg, local_only=client, quiet=quiet, run_dir=run)


def run_fl(cfg: ExperimentConfig, run: Path, prep: Prepared, quiet: bool) -> Path:
    """A federated run into ``run``: skipped when done, resumed from its saved round when it has one."""
    from cxrfl_ray.fl.engine import run_federated
    from cxrfl_ray.fl.state import saved_round

    if _complete(run, resolve_site_clients(cfg, prep.dataset)):
        check_no_failures(run)
        return run
    done = saved_round(run)
    if done is not None and done < cfg.fl.rounds:
        run_federated(resume=run, quiet=quiet)
    else:
        shutil.rmtree(run, ignore_errors=True)
        run_federated(cfg, quiet=quiet, run_dir=run)
    check_no_failures(run)
    return run


def check_no_failures(run: Path) -> None:
    """A federated run that lost client trainings nobody injected is not a result to report."""
    failures = json.loads((run / "summary.json").read_text()).get("client_failures", 0)
    if failures and not load_config(run / "config.yaml").faults.client_failure_rate:
        raise StudyError(f"{run}: {failures} client trainings failed; see why with `cxrfl simulate "
                         f"{run / 'config.yaml'} --verbose`, fix it, delete the folder and run the study again")


def evaluate_run(run: Path, prep: Prepared, keys: list[tuple[str, str]]) -> dict[str, dict[str, float]]:
    """``run``'s best checkpoint on ``prep``'s views ``keys``, the same way for every model
    (kept in ``run/evaluation.json``)."""
    from cxrfl_ray.tasks.checkpoint import load_checkpoint
    from cxrfl_ray.tasks.training import select_device

    cache = run / "evaluation.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    cfg = prep.cfg
    device = select_device(cfg.train.device)
    model, _, _ = load_checkpoint(run / "best.safetensors", task=cfg.task, device=device)
    loss_fn = prep.task.make_loss(cfg.loss_name, cfg.train.class_weights).to(device)
    results = {f"{s}:{i}": m for (s, i), m in evaluate_views(prep, model, device, loss_fn, keys).items()}
    write_json(cache, results, indent=1)
    return results


# -- budgets -----------------------------------------------------------------------------------

def epoch_rows(cfg: ExperimentConfig, rows: int) -> int:
    """Rows one epoch trains on: a full pass, or ``train.steps`` batches."""
    return cfg.train.steps * cfg.train.batch_size if cfg.train.steps else rows


def federated_rows(prep: Prepared) -> float:
    """Rows a federated run trains on in all: rounds x local epochs x the expected cohort's epoch rows."""
    cfg, clients = prep.cfg, prep.plan.clients
    per_round = sum(epoch_rows(cfg, c.size) for c in clients) * cfg.clients_per_round / len(clients)
    return cfg.fl.rounds * cfg.train.epochs * per_round


def epochs_for(prep: Prepared, rows: int) -> int:
    """Epochs on ``rows`` rows that see about as many rows as the federated run."""
    return max(1, math.ceil(federated_rows(prep) / epoch_rows(prep.cfg, rows) - 1e-9))


def rows_seen(run: Path) -> int:
    """Training rows a run went through, from its metrics (federated: each client's epochs)."""
    cfg = load_config(run / "config.yaml")
    rows = pq.read_table(run / "metrics.parquet", filters=[("scope", "in", ["train", "client"])]).to_pylist()
    if any(r["scope"] == "client" for r in rows):
        if cfg.train.steps:
            return int(sum(r["value"] for r in rows if r["metric"] == "steps") * cfg.train.batch_size)
        return int(sum(r["value"] for r in rows if r["metric"] == "num-examples") * cfg.train.epochs)
    return int(sum(r["value"] for r in rows if r["metric"] == "examples"))


def client_sites(prep: Prepared) -> list[str]:
    """The site each plan client holds (``client<i>`` where a client is not exactly one site)."""
    sites = np.asarray(prep.dataset.metadata.column("site").to_pylist(), dtype=object)
    names = [str(u[0]) if (u := np.unique(sites[rows])).size == 1 else f"client{i}"
             for i, rows in enumerate(prep.plan.clients)]
    return names if len(set(names)) == len(names) else [f"client{i}" for i in range(len(names))]


def site_views(prep: Prepared) -> list[tuple[str, str]]:
    """Each site's test rows, then all test rows: the views every model is compared on."""
    return [k for k in prep.views if k[0] == "site"] + [("central", prep.cfg.data.test_split)]


def _run_row(run: Path, out: Path, views: dict[str, dict[str, float]], metrics: tuple[str, ...]) -> dict[str, Any]:
    summary = json.loads((run / "summary.json").read_text())
    cfg = load_config(run / "config.yaml")
    plots = sorted(p.relative_to(out).as_posix() for p in run.glob("*.png"))
    return {"run": run.relative_to(out).as_posix(), "epochs": cfg.train.epochs, "rounds": summary.get("rounds"),
            "rows_seen": rows_seen(run), "wall_time_s": summary["wall_time_s"],
            "test": {v.split(":", 1)[1] if v.startswith("site:") else "all": {m: r.get(m, float("nan")) for m in metrics}
                     for v, r in views.items()},
            "plots": plots}


# -- steps -------------------------------------------------------------------------------------

def step_ingest(spec: StudySpec, out: Path, quiet: bool) -> dict[str, Any]:
    from cxrfl_ray.data.ingest import IngestOptions, ingest_sources
    from cxrfl_ray.data.store import open_dataset

    path = out / "data" / "full"
    if not (path / CARD_NAME).is_file():
        o = spec.ingest
        options = IngestOptions(max_size=o.max_size, val_frac=o.val_frac, test_frac=o.test_frac, seed=o.seed,
                                workers=o.workers, progress=not quiet)
        kwargs = {"columns": o.columns} if o.columns else {}
        ingest_sources(spec.layout, spec.sources, path, options, **kwargs)
    card = open_dataset(path).card
    return {"path": "data/full", "name": card["name"], "num_rows": card["num_rows"], "num_skipped": card["num_skipped"],
            "sites": card["counts"]["site"], "labels": card["counts"]["label"], "splits": card["counts"]["split"]}


def step_segmentation(spec: StudySpec, out: Path, quiet: bool, say) -> dict[str, Any]:
    seg, full, runs_dir = spec.segmentation, out / "data" / "full", out / "segmentation"
    base = experiment(spec, seg, "segmentation", full, runs_dir)
    prep = prepare(base)
    sites = client_sites(prep)
    runs: dict[str, Path] = {}
    if seg.baselines:
        pooled = prep.pooled_train_rows.size
        jobs = [("pooled", None, pooled)] + [(f"local-{s}", i, c.size) for i, (s, c) in enumerate(zip(sites, prep.plan.clients))]
        for name, client, rows in jobs:
            epochs = epochs_for(prep, rows)
            say(f"segmentation {name}: {rows} training rows, {epochs} epochs")
            cfg = experiment(spec, seg, name, full, runs_dir, **{"train.epochs": epochs})
            runs[name] = run_baseline(cfg, runs_dir / name, prep, client, quiet)
    for s in seg.strategies:
        cfg = experiment(spec, seg, s.run_name, full, runs_dir, s)
        say(f"segmentation {s.run_name}: {len(sites)} clients, {cfg.fl.rounds} rounds")
        runs[s.run_name] = run_fl(cfg, runs_dir / s.run_name, prep, quiet)
    keys = site_views(prep)
    models = {name: _run_row(run, out, evaluate_run(run, prep, keys), (SEG_METRIC, "dice")) for name, run in runs.items()}
    return {"sites": sites, "federated_rows": federated_rows(prep), "models": models}


def best_federated(seg: dict[str, Any]) -> str:
    """The federated model with the highest mean Jaccard over the sites' test rows."""
    def mean_site(name: str) -> float:
        return float(np.mean([seg["models"][name]["test"][s][SEG_METRIC] for s in seg["sites"]
                              if s in seg["models"][name]["test"]]))
    return max((n for n in seg["models"] if n.startswith("fl-")), key=mean_site)


def step_mask(spec: StudySpec, out: Path, seg: dict[str, Any], quiet: bool) -> dict[str, Any]:
    from cxrfl_ray.cascade import mask_dataset
    from cxrfl_ray.data.store import open_dataset

    path = out / "data" / "masked"
    if not (path / CARD_NAME).is_file():
        best = out / seg["models"][best_federated(seg)]["run"] / "best.safetensors"
        device = load_config(best.parent / "config.yaml").train.device
        m = spec.mask
        mask_dataset(best, out / "data" / "full", path, threshold=m.threshold, min_area=m.min_area,
                     max_area=m.max_area, max_components=m.max_components, batch_size=m.batch_size,
                     device=device, progress=not quiet)
    card = open_dataset(path).card
    used = Path(card["cascade"]["checkpoint"]).parent.name  # the model that made it, also on a rerun
    return {"path": "data/masked", "model": used, "threshold": card["cascade"]["threshold"],
            "num_rows": card["num_rows"], "flagged": card["cascade"]["flagged"]}


def check_same_partitions(a: Prepared, b: Prepared) -> None:
    """Both datasets give every client, and every evaluation view, the same image ids."""
    ids_a = np.asarray(a.dataset.metadata.column("id").to_pylist(), dtype=object)
    ids_b = np.asarray(b.dataset.metadata.column("id").to_pylist(), dtype=object)
    if len(a.plan.clients) != len(b.plan.clients):
        raise StudyError(f"classification: {a.dataset.path} plans {len(a.plan.clients)} clients but "
                         f"{b.dataset.path} plans {len(b.plan.clients)}")
    pairs = [(f"client {i}", ra, rb) for i, (ra, rb) in enumerate(zip(a.plan.clients, b.plan.clients))]
    pairs += [(f"view {k}", a.views[k], b.views.get(k, np.zeros(0, np.int64))) for k in a.views]
    for what, ra, rb in pairs:
        if not np.array_equal(ids_a[ra], ids_b[rb]):
            raise StudyError(f"classification: {what} holds different image ids in {a.dataset.path} ({ra.size}) "
                             f"and {b.dataset.path} ({rb.size}); was the masked dataset written with --drop-flagged?")


def step_classification(spec: StudySpec, out: Path, quiet: bool, say) -> dict[str, Any]:
    runs_dir = out / "classification"
    cfgs = {k: experiment(spec, spec.classification, k, out / "data" / k, runs_dir) for k in ("full", "masked")}
    preps = {k: prepare(c) for k, c in cfgs.items()}
    check_same_partitions(preps["full"], preps["masked"])
    models = {}
    for kind, cfg in cfgs.items():
        say(f"classification {kind}: {len(preps[kind].plan.clients)} clients, {cfg.fl.rounds} rounds")
        run = run_fl(cfg, runs_dir / kind, preps[kind], quiet)
        models[kind] = _run_row(run, out, evaluate_run(run, preps[kind], site_views(preps[kind])), CLS_METRICS)
    return {"identical_partitions": True, "clients": len(preps["full"].plan.clients), "models": models}


def step_cam(spec: StudySpec, out: Path, cls: dict[str, Any]) -> dict[str, Any]:
    from cxrfl_ray.interpret import run_cam

    path = out / "cam"
    cache = path / "cam.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    full, masked = (out / cls["models"][k]["run"] / "best.safetensors" for k in ("full", "masked"))
    c = spec.cam
    result = run_cam(full, out / "data" / "full", path, n=c.n, method=c.method, layer=c.layer, compare=masked,
                     compare_dataset=out / "data" / "masked", split=c.split, seed=c.seed,
                     device=load_config(full.parent / "config.yaml").train.device)
    keep = {"n": len(result["ids"]), "method": c.method, "mask_source": result["mask_source"],
            "summaries": {"full": result["summaries"]["main"], "masked": result["summaries"]["compare"]},
            "grid": "cam/grid.png", "focus_csv": "cam/focus.csv", "cam_report": "cam/cam_report.md"}
    write_json(cache, keep, indent=1)
    return keep


class StepTimes:
    """Seconds spent in each step, summed over the invocations that worked on it (``steps.json``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.times: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.time()
        try:
            yield
        finally:
            self.times[name] = round(self.times.get(name, 0.0) + time.time() - start, 2)
            write_json(self.path, self.times, indent=1)


def run_study(spec_path: str | Path, out: str | Path | None = None, overrides: list[str] | None = None,
              quiet: bool = False) -> Path:
    """Run (or continue) the study of ``spec_path``; returns the study folder with ``report.md``."""
    from cxrfl_ray.study_report import finding, write_report

    spec = load_study(spec_path, overrides)
    out = Path(out) if out is not None else Path(spec.out_dir) / spec.name
    validate(spec, out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    clock = StepTimes(out / "steps.json")

    def say(text: str) -> None:
        print(f"[study {spec.name}] {text}", flush=True)

    result: dict[str, Any] = {"name": spec.name, "spec": spec.model_dump(mode="json")}
    say(f"1/6 ingest {len(spec.sources)} source(s) -> {out / 'data' / 'full'}")
    with clock.step("ingest"):
        result["dataset"] = step_ingest(spec, out, quiet)
    say("2/6 segmentation")
    with clock.step("segmentation"):
        result["segmentation"] = step_segmentation(spec, out, quiet, say)
    say("3/6 mask")
    with clock.step("mask"):
        result["mask"] = step_mask(spec, out, result["segmentation"], quiet)
    say("4/6 classification on full and masked images")
    with clock.step("classification"):
        result["classification"] = step_classification(spec, out, quiet, say)
    say("5/6 cam")
    with clock.step("cam"):
        result["cam"] = step_cam(spec, out, result["classification"])
    say("6/6 report")
    result["finding"] = finding(result["classification"], result["cam"])
    result["steps_s"] = dict(clock.times)
    result["total_s"] = round(sum(clock.times.values()), 2)
    write_json(out / "study.json", result, indent=1)
    write_report(out, result)
    say(f"report: {out / 'report.md'}")
    return out
