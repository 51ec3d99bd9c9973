"""The ``cxrfl`` command: one subcommand per step of the pipeline (see ``cxrfl --help``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

# Nothing we start phones home unless the user asks for it.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _key_value(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected FIELD=COLUMN, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def summarize_card(card: dict) -> str:
    """A few human lines about a dataset card."""
    counts = card["counts"]
    size = card.get("image_size", {})
    lines = [
        f"dataset {card['name']!r}: {card['num_rows']} images, {card.get('num_masks', 0)} masks, "
        f"{card.get('num_skipped', 0)} skipped",
        f"  labels: {counts['label']}",
        f"  splits: {counts['split']}",
        f"  sites:  {counts['site']}",
    ]
    if size:
        lines.append(
            f"  size:   height {size['height']['min']}-{size['height']['max']}, "
            f"width {size['width']['min']}-{size['width']['max']}, bit depth {size['bit_depth']}"
        )
    for s in card.get("skipped", [])[:10]:
        lines.append(f"  skipped {s['path']}: {s['reason']}")
    if card.get("num_skipped", 0) > 10:
        lines.append(f"  ... {card['num_skipped'] - 10} more in skipped.csv")
    from cxrfl_ray.data.writer import card_lines  # flagged rows and notes (issue 14)
    lines += card_lines(card)
    return "\n".join(lines)


# -- subcommands -----------------------------------------------------------------------------

def cmd_synth(args: argparse.Namespace) -> int:
    from cxrfl_ray.data.synth import write_synthetic_dataset

    card = write_synthetic_dataset(
        args.out, n=args.n, sites=args.sites, size=args.size, seed=args.seed,
        label_marker=args.label_marker, progress=not args.quiet,
    )
    print(summarize_card(card))
    print(f"wrote {Path(args.out).resolve()}")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from cxrfl_ray.data.ingest import IngestOptions, ingest_sources
    from cxrfl_ray.data.ingest.rsna import LABEL_NAMES as RSNA_LABELS

    kwargs: dict = {}
    if args.layout in ("manifest", "lungseg"):
        kwargs.update(columns=dict(args.column or []), csv=args.csv, images=args.images, masks=args.masks)
        if args.unlabeled is not None:
            kwargs["unlabeled"] = args.unlabeled
    elif args.layout == "rsna":
        kwargs.update(images=args.images)
    labels = args.labels or (list(RSNA_LABELS) if args.layout == "rsna" else None)
    options = IngestOptions(
        label_names=labels, max_size=args.max_size, strict=args.strict, val_frac=args.val_frac,
        test_frac=args.test_frac, seed=args.seed, resize_masks=args.resize_masks,
        workers=args.workers, progress=not args.quiet,
    )
    card = ingest_sources(args.layout, args.source, args.out, options, name=args.name, **kwargs)
    print(summarize_card(card))
    print(f"wrote {Path(args.out).resolve()}")
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    from cxrfl_ray.data.store import open_dataset
    from cxrfl_ray.jsonio import dumps

    card = open_dataset(args.dataset).card
    print(dumps(card, indent=2) if args.json else summarize_card(card))
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    from cxrfl_ray.data.partition import format_counts, plan_partition
    from cxrfl_ray.data.store import open_dataset

    ds = open_dataset(args.dataset)
    scheme_args = {k: v for k, v in (("alpha", args.alpha), ("power", args.power), ("min_size", args.min_size)) if v is not None}
    plan = plan_partition(
        ds, args.scheme, args.clients, args.seed, holdout_sites=args.holdout_sites or (),
        train_splits=args.train_splits, **scheme_args,
    )
    default = Path("plans") / f"{ds.card['name']}-{args.scheme}-{args.clients}-s{args.seed}.json"
    out = Path(args.out) if args.out else default
    plan.save(out)
    print(format_counts(plan.counts(ds.metadata, ds.label_names), ds.label_names, limit=args.show))
    for name, ids in {**plan.central, **{f"holdout:{k}": v for k, v in plan.holdout.items()}}.items():
        print(f"  central {name}: {ids.size} rows")
    print(f"wrote {out.resolve()}")
    return 0


def preset_config(name: str, overrides: list[str]):
    """A named preset plus ``--set`` overrides, validated."""
    from cxrfl_ray.config import ConfigError, build_config
    from cxrfl_ray.presets import PRESETS

    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    return build_config(PRESETS[name], overrides, source=f"preset {name}")


def builtin_data(preset: str, overrides: list[str]) -> bool:
    """Whether a preset's config reads the built-in phantoms: the preset names them and no
    ``--set`` replaced its data path. Decided from where the value comes from, not from its text,
    so a user's path (even one equal to the default) is never filled with phantoms."""
    import copy

    from cxrfl_ray.config import set_dotted
    from cxrfl_ray.presets import DEFAULT_DATA, PRESETS

    if PRESETS[preset].get("data", {}).get("path") != DEFAULT_DATA:
        return False
    probe = copy.deepcopy(PRESETS[preset])
    unset = probe["data"]["path"] = object()  # survives only if no override touches data.path
    for item in overrides:
        key, _, value = item.partition("=")
        set_dotted(probe, key.strip(), value)
    data = probe.get("data")
    return isinstance(data, dict) and data.get("path") is unset


def resolve_configs(args: argparse.Namespace, default: list[str]) -> list[tuple]:
    """``(config, reads the built-in phantoms)`` for a command's CONFIG, ``--preset`` or default
    presets, with ``--set`` applied."""
    from cxrfl_ray.config import ConfigError, load_config

    if args.config and args.preset:
        raise ConfigError("give a config file or --preset, not both")
    if args.config:
        return [(load_config(args.config, args.set), False)]
    names = [args.preset] if args.preset else default
    if not names:
        return [(load_config(None, args.set), False)]
    return [(preset_config(n, args.set), builtin_data(n, args.set)) for n in names]


def ready_data(configs: list[tuple], quiet: bool) -> None:
    """Generate the built-in phantoms on first use; any other ``data.path`` must exist (checked
    here, before a run folder or Ray)."""
    from cxrfl_ray.config import ConfigError

    for cfg, builtin in configs:
        path = cfg.data.path
        if "://" in path or Path(path).exists():
            continue
        if not builtin:
            raise ConfigError(f"data.path: {path} does not exist")
        from cxrfl_ray.data.synth import write_synthetic_dataset
        from cxrfl_ray.presets import DEFAULT_DATA_ARGS

        print(f"generating the default phantoms in {path}", flush=True)
        write_synthetic_dataset(path, **DEFAULT_DATA_ARGS, progress=not quiet)


def cmd_train(args: argparse.Namespace) -> int:
    from cxrfl_ray.baseline import run_training

    configs = resolve_configs(args, default=[])
    ready_data(configs, args.quiet)
    run = run_training(configs[0][0], local_only=args.local_only, quiet=args.quiet)
    summary = json.loads((run / "summary.json").read_text())
    for view, metrics in summary["test"].items():
        print(f"  {view}: {summary['main_metric']} {metrics.get(summary['main_metric'], float('nan')):.4f}")
    print(f"results: {run.resolve()}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from cxrfl_ray.config import ConfigError

    if args.resume:
        given = [what for what, there in (("a CONFIG file", args.config), ("--preset", args.preset),
                                          ("--set", args.set)) if there]
        if given:  # they would be ignored: a resumed run keeps the settings its rounds were trained with
            raise ConfigError(f"--resume {args.resume} continues with that run's own config.yaml; "
                              f"{' and '.join(given)} cannot be given with it (start a new run instead)")
        if not Path(args.resume).is_dir():
            raise ConfigError(f"--resume {args.resume}: no such run folder")
        from cxrfl_ray.fl.engine import run_federated

        run = run_federated(resume=args.resume, quiet=args.quiet, verbose=args.verbose)
        print(f"results: {run.resolve()}")
        return 0
    configs = resolve_configs(args, default=["default-segmentation", "default-classification"])
    if args.print_config:  # nothing runs, so a missing data path is not an error here
        ready_data([c for c in configs if c[1]], args.quiet)
        for cfg, _ in configs:
            print(cfg.to_yaml())
        return 0
    ready_data(configs, args.quiet)
    from cxrfl_ray.fl.engine import run_federated

    for cfg, _ in configs:
        cohort = (f"{cfg.partition.clients} clients, {cfg.clients_per_round} per round"
                  if cfg.partition.clients != "sites" else f"one client per site, {cfg.fl.clients_per_round or f'{cfg.fl.fraction:.0%}'} per round")
        print(f"== {cfg.name}: {cfg.task}, {cfg.model.name}, {cohort}, {cfg.fl.strategy.name}, "
              f"{cfg.fl.rounds} rounds", flush=True)
        run = run_federated(cfg, quiet=args.quiet, verbose=args.verbose)
        summary = json.loads((run / "summary.json").read_text())
        print(f"best {summary['main_metric']} {summary['best_value']:.4f} at round {summary['best_round']}; "
              f"rounds to threshold {summary['rounds_to_threshold']}; {summary['wall_time_s']} s")
        print(f"results: {run.resolve()}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from cxrfl_ray.report import report
    from cxrfl_ray.sweep import estimate_cost, load_spec, make_phantoms, run_sweep, validate

    if args.dry_run:
        spec = load_spec(args.spec, args.set)
        make_phantoms(spec)
        validate(spec)
        rows = estimate_cost(spec, args.throughput)
        keys = list(rows[0])
        print("\t".join(keys))
        for row in rows:
            print("\t".join(str(row[k]) for k in keys))
        trials = sum(r["trials"] for r in rows)
        line = f"{len(rows)} points, {trials} trials (random dimensions counted at their range ends)"
        if args.throughput:
            line += f", {sum(r['gpu_hours'] for r in rows):.2f} GPU-hours at {args.throughput} training images/s per client"
        else:
            line += "; give --throughput IMG_PER_S (benchmarks/train_step.py --device cuda) for hours and GPU-hours"
        print(line)
        return 0
    sweep = run_sweep(args.spec, out=args.out, resume=args.resume, address=args.address, quiet=args.quiet,
                      overrides=args.set)
    print(f"trials: {(sweep / 'trials.parquet').resolve()}")
    print(f"report: {report(sweep).resolve()}")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from cxrfl_ray.study import run_study

    out = run_study(args.spec, out=args.out, overrides=args.set, quiet=args.quiet)
    print((out / "report.md").read_text())
    print(f"report: {(out / 'report.md').resolve()}")
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from cxrfl_ray.benchmark import run_benchmark

    out = run_benchmark(args.spec, out=args.out, overrides=args.set, methods=args.methods, seeds=args.seeds,
                        max_concurrent=args.max_concurrent, address=args.address, quiet=args.quiet)
    print((out / "benchmark.md").read_text())
    print(f"report: {(out / 'benchmark.md').resolve()}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from cxrfl_ray.jobs import submit

    command = list(args.command_args)
    if command[:1] == ["--"]:
        command = command[1:]
    _, status = submit(args.address, command, remote_root=args.remote_root, python=args.python,
                       follow=not args.no_follow, timeout=args.timeout, fetch=args.fetch)
    print(f"job status: {status}")
    return 0 if status in ("SUCCEEDED", "PENDING") else 1


def cmd_job_status(args: argparse.Namespace) -> int:
    from cxrfl_ray.jobs import job_status

    for key, value in job_status(args.address, args.job_id).items():
        print(f"{key}: {value}")
    return 0


def cmd_job_stop(args: argparse.Namespace) -> int:
    from cxrfl_ray.jobs import stop_job

    print(f"stop requested: {stop_job(args.address, args.job_id)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from cxrfl_ray.report import report

    path = report(args.path, threshold=args.threshold)
    print(path.read_text())
    print(f"report: {path.resolve()}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from cxrfl_ray.predict import predict

    result = predict(args.checkpoint, args.input, args.out, batch_size=args.batch_size,
                     threshold=args.threshold, device=args.device, overlay=args.overlay)
    print(f"{result['images']} images -> {Path(result['out']).resolve()} ({len(result['skipped'])} skipped)")
    if args.overlay and result["task"] != "segmentation":
        print("--overlay: nothing drawn (a classification checkpoint predicts no masks)")
    elif "overlays" in result:
        print(f"{len(result['overlays']['images'])} images drawn -> {Path(result['overlays']['path']).resolve()}")
    for s in result["skipped"][:10]:
        print(f"  skipped {s['path']}: {s['reason']}")
    return 0


def cmd_mask(args: argparse.Namespace) -> int:
    from cxrfl_ray.cascade import mask_dataset

    card = mask_dataset(
        args.seg_checkpoint, args.dataset, args.out, threshold=args.threshold, min_area=args.min_area,
        max_area=args.max_area, max_components=args.max_components, drop_flagged=args.drop_flagged,
        batch_size=args.batch_size, device=args.device, progress=not args.quiet,
    )
    print(summarize_card(card))
    flagged = card["cascade"]["flagged"]
    verb = "dropped" if args.drop_flagged else "kept, listed in the card"
    print(f"{len(flagged)} images with implausible lung masks ({verb})")
    for f in flagged[:10]:
        print(f"  flagged {f['id']}: {f['reason']}")
    print(f"wrote {Path(args.out).resolve()}")
    return 0


def cmd_cam(args: argparse.Namespace) -> int:
    from cxrfl_ray.interpret import run_cam

    result = run_cam(
        args.checkpoint, args.dataset, args.out, n=args.n, method=args.method, layer=args.layer,
        compare=args.compare, compare_dataset=args.compare_dataset, masks=args.masks, seg=args.seg,
        split=args.split, seed=args.seed, device=args.device,
    )
    for name, summary in result["summaries"].items():
        per_class = ", ".join(f"{k} {v:.3f}" for k, v in summary.items() if k != "overall")
        print(f"  {name}: lung focus {summary['overall']:.3f} ({per_class})")
    print(f"report: {Path(result['report']).resolve()}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from cxrfl_ray.tasks.models import MODELS

    for name in sorted(MODELS, key=lambda n: (MODELS[n].task, n)):
        spec = MODELS[name]
        print(f"{spec.task:15s} {name:30s}{'  (paper)' if spec.paper else ''}")
    return 0


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="experiment YAML (default: built-in defaults)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="override a config field, e.g. --set train.lr=0.001 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxrfl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a dataset of synthetic chest X-ray phantoms with lung masks")
    p.add_argument("--out", required=True, help="dataset folder to write (replaced atomically)")
    p.add_argument("--n", type=int, default=2000, help="number of images (default 2000)")
    p.add_argument("--sites", type=int, default=4, help="number of sites, each with its own look (default 4)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed: same seed, same bytes (default 0)")
    p.add_argument("--label-marker", type=float, default=0.0,
                   help="probability of a spurious marker on Lung Opacity images (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("ingest", help="turn a folder of real chest X-rays into a dataset")
    p.add_argument("layout", choices=["manifest", "lungseg", "rsna", "folders"], help="source layout")
    p.add_argument("source", nargs="+", help="source folder(s); several join one dataset, each folder a source "
                   "and the site of its rows where its CSV names none (one folder per hospital)")
    p.add_argument("--out", required=True, help="dataset folder to write (replaced atomically)")
    p.add_argument("--name", help="dataset name (default: the source folder names joined by +)")
    p.add_argument("--csv", type=Path, help="label CSV (default SOURCE/labels.csv)")
    p.add_argument("--images", type=Path, help="image folder (default: guessed from the layout)")
    p.add_argument("--masks", type=Path, help="mask folder (default: guessed from the layout)")
    p.add_argument("--column", type=_key_value, action="append", metavar="FIELD=COLUMN",
                   help="map a CSV column to a field, e.g. patient_id=patientid (repeatable)")
    p.add_argument("--labels", type=_csv_list, help="label set in index order, comma-separated (default: inferred)")
    p.add_argument("--unlabeled", type=lambda s: s.split(","), help="label values meaning 'no label' (default: unknown,none,nan,'')")
    p.add_argument("--max-size", type=int, help="downscale so the longer side is at most N pixels")
    p.add_argument("--val-frac", type=float, default=0.1, help="patient share for val where the source has no split")
    p.add_argument("--test-frac", type=float, default=0.2, help="patient share for test where the source has no split")
    p.add_argument("--seed", type=int, default=0, help="seed for the patient-level split")
    p.add_argument("--resize-masks", action="store_true", help="resize masks whose size differs from the image")
    p.add_argument("--strict", action="store_true", help="any skipped file is an error")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="decoding threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("card", help="print a dataset's card")
    p.add_argument("dataset")
    p.add_argument("--json", action="store_true", help="the whole card as JSON")
    p.set_defaults(func=cmd_card)

    p = sub.add_parser("partition", help="plan clients over a dataset's rows and print the plan")
    p.add_argument("dataset")
    p.add_argument("--scheme", choices=["iid", "dirichlet", "quantity", "site"], default="iid")
    p.add_argument("--clients", type=int, required=True, help="number of clients")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alpha", type=float, help="dirichlet concentration (smaller = more skew)")
    p.add_argument("--power", type=float, help="quantity power-law exponent (larger = more skew)")
    p.add_argument("--min-size", type=int, help="minimum patients per client (default 1)")
    p.add_argument("--holdout-sites", type=_csv_list, help="sites that never train, comma-separated")
    p.add_argument("--train-splits", type=_csv_list, default=["train"], help="splits that train (default train)")
    p.add_argument("--out", help="plan file (default plans/NAME-SCHEME-N-sSEED.json)")
    p.add_argument("--show", type=int, default=20, help="clients to list (default 20)")
    p.set_defaults(func=cmd_partition)

    p = sub.add_parser("train", help="centralised (pooled) or local-only training: the baselines")
    _add_config_args(p)
    p.add_argument("--preset", help="a named preset instead of a config file (e.g. real-segmentation)")
    p.add_argument("--local-only", type=int, metavar="CLIENT", help="train on this client's rows alone")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("simulate", help="federated simulation on Flower's Ray engine (no args: the embedded default)")
    _add_config_args(p)
    p.add_argument("--preset", help="a named preset: default-segmentation, default-classification, "
                                    "paper-segmentation, paper-classification")
    p.add_argument("--print-config", action="store_true", help="print the resolved config(s) and stop")
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted simulation from its run folder")
    p.add_argument("--quiet", action="store_true", help="no per-round lines")
    p.add_argument("--verbose", action="store_true", help="Flower's and Ray's own logs")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("sweep", help="Ray Tune sweep over FL parameters (one trial = one simulation)")
    p.add_argument("spec", help="sweep spec YAML (see tune_configs/)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep (only unfinished trials run); start it if new")
    p.add_argument("--out", help="sweep folder (default: SPEC out_dir/name)")
    p.add_argument("--address", help="Ray cluster address (default: a local Ray started here)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="override a spec field, e.g. --set base.data.path=/data/lungseg (repeatable)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="validate, then print each point's resources and work; run nothing")
    p.add_argument("--throughput", type=float, help="with --dry-run: training images/s of one client, for GPU-hours")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("study", help="the whole real-hospital study: ingest, segmentation (pooled, local, FL), "
                                     "mask, classification full vs masked, Grad-CAM, report")
    p.add_argument("spec", help="study spec YAML (e.g. tune_configs/real_hospitals.yaml)")
    p.add_argument("--out", help="study folder (default: SPEC out_dir/name); a rerun continues an interrupted study")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="override a spec field, e.g. --set segmentation.set.fl.rounds=5 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no per-round or per-epoch lines")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("benchmark", help="pooled, local-only and federated methods on every site and held-out "
                                         "site, over seeds, same budget (FLamby-style; Ray Tune trials)")
    p.add_argument("spec", help="benchmark spec YAML (tune_configs/benchmark_sites.yaml) or an experiment config")
    p.add_argument("--methods", type=_csv_list, help="comma-separated: pooled, local, fedavg, fedprox, fedbn, scaffold, "
                   "fednova, ... (options from the spec; default: the spec's, or pooled,local and a CONFIG's own strategy)")
    p.add_argument("--seeds", type=int, help="seeds per model: base seed, +1, ... (default: the spec's, or 1)")
    p.add_argument("--out", help="benchmark folder (default: SPEC out_dir/name); a rerun continues an interrupted one")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: the spec's, or 1)")
    p.add_argument("--address", help="Ray cluster address (default: a local Ray started here)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="override a spec field (a config's field for a CONFIG), e.g. --set base.fl.rounds=5")
    p.add_argument("--quiet", action="store_true", help="no per-trial lines")
    p.set_defaults(func=cmd_benchmark)

    p = sub.add_parser("submit", help="run a cxrfl command on a Ray cluster (Ray Job Submission), follow it, fetch results")
    p.add_argument("--address", required=True, help="the cluster's dashboard, e.g. http://127.0.0.1:8265")
    p.add_argument("--fetch", metavar="DIR", help="after a sweep succeeds, copy its folder (no checkpoints) here")
    p.add_argument("--timeout", type=float, help="stop the job after this many seconds")
    p.add_argument("--no-follow", action="store_true", help="submit and return the job id")
    p.add_argument("--remote-root", default="$HOME/cxrfl-runs", help="where sweeps go on the cluster without --out")
    p.add_argument("--python", default="python", help="the cluster's Python with this package installed")
    p.add_argument("command_args", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                   help="the cxrfl command to run, e.g. -- sweep tune_configs/smoke.yaml")
    p.set_defaults(func=cmd_submit)

    for name, func, text in (("status", cmd_job_status, "a submitted job's status"),
                             ("stop", cmd_job_stop, "stop a submitted job")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--address", required=True, help="the cluster's dashboard, e.g. http://127.0.0.1:8265")
        p.add_argument("job_id")
        p.set_defaults(func=func)

    p = sub.add_parser("report", help="tables and plots of a sweep folder or a run folder")
    p.add_argument("path", help="a sweep folder (trials.parquet) or a run folder (metrics.parquet)")
    p.add_argument("--threshold", type=float, help="rounds to reach this metric value (segmentation default 0.92)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("predict", help="apply a checkpoint to a dataset, a folder of images or a file")
    p.add_argument("checkpoint", help="a .safetensors checkpoint written by train/simulate")
    p.add_argument("input", help="dataset folder, image folder (PNG/JPEG/DICOM) or one image")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threshold", type=float, default=0.5, help="segmentation probability threshold")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--overlay", type=int, nargs="?", const=16, default=0, metavar="N",
                   help="also write overlays.png: the predicted lung outline on N inputs drawn from the "
                        "checkpoint's seed (all if fewer; at most 16; --overlay alone: 16). A dataset whose rows all have "
                        "masks adds the true outline and each image's Jaccard at the model's size, worst first. "
                        "Segmentation checkpoints only")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("mask", help="cut the lungs out of a dataset's images with a segmentation model")
    p.add_argument("seg_checkpoint", help="a segmentation .safetensors checkpoint")
    p.add_argument("dataset", help="dataset folder to mask")
    p.add_argument("--out", required=True, help="masked dataset folder to write (same ids, labels, splits)")
    p.add_argument("--threshold", type=float, default=0.05,
                   help="lung probability below which pixels are zeroed (default 0.05, the paper's)")
    p.add_argument("--min-area", type=float, default=0.05, help="flag masks covering less of the image (default 0.05)")
    p.add_argument("--max-area", type=float, default=0.8, help="flag masks covering more of the image (default 0.8)")
    p.add_argument("--max-components", type=int, default=2, help="flag masks with more separate regions (default 2)")
    p.add_argument("--drop-flagged", action="store_true", help="leave flagged images out of the new dataset")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_mask)

    p = sub.add_parser("cam", help="Grad-CAM overlays and the lung-focus score of one or two classifiers")
    p.add_argument("checkpoint", help="a classification .safetensors checkpoint")
    p.add_argument("dataset", help="dataset folder the images come from")
    p.add_argument("--out", required=True, help="output folder (overlays, grid.png, focus.csv, cam_report.md)")
    p.add_argument("--n", type=int, default=16, help="number of images (default 16)")
    p.add_argument("--method", default="gradcam", choices=["gradcam", "gradcam++", "scorecam", "eigencam"])
    p.add_argument("--layer", help="dotted target layer, e.g. layer4.-1 (default: the model's last conv block)")
    p.add_argument("--compare", metavar="CHECKPOINT2", help="a second classifier shown side by side")
    p.add_argument("--compare-dataset", metavar="DATASET2",
                   help="dataset the second classifier sees, matched by id (default: DATASET)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--masks", metavar="DATASET_WITH_MASKS", help="take lung masks from this dataset, by id")
    source.add_argument("--seg", metavar="SEG_CHECKPOINT", help="predict lung masks with this segmentation model")
    p.add_argument("--split", default="test", help="split to draw images from (default test)")
    p.add_argument("--seed", type=int, default=0, help="seed for the choice of images (default 0)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=cmd_cam)

    p = sub.add_parser("models", help="list the registered models")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from cxrfl_ray.config import ConfigError
    from cxrfl_ray.data.ingest.pipeline import IngestError
    from cxrfl_ray.data.partition import PartitionError
    from cxrfl_ray.data.store import DatasetError
    from cxrfl_ray.jobs import ClusterError
    from cxrfl_ray.tasks.checkpoint import CheckpointError
    from cxrfl_ray.tasks.models import ModelError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, IngestError, PartitionError, DatasetError, CheckpointError, ModelError, ClusterError,
            FileExistsError, FileNotFoundError, ValueError) as exc:
        if os.environ.get("CXRFL_DEBUG"):
            raise
        print(f"cxrfl {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
