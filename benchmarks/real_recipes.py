"""Recipe ablations on a real lung dataset with sites (issue 13): each variant is a preset plus
overrides, trained centrally (``--mode central``) or federated (``--mode fl``), and scored on
each site's test rows (Jaccard for segmentation, AUROC for classification). Results go to a JSON file one variant at a time, so a rerun skips the
variants already measured (delete the file, or pass --redo, to measure again).

    python benchmarks/real_recipes.py runs/real/mcsz --mode fl --variants base,no_aug
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("WANDB_MODE", "offline")

from cxrfl_ray.config import build_config  # noqa: E402
from cxrfl_ray.presets import PRESETS  # noqa: E402

# What each variant changes against the preset; the name says which knob it tests.
VARIANTS: dict[str, list[str]] = {
    "base": [],
    "norm_none": ["data.normalize=none"],
    "aug_none": ["data.augment=false"],
    "aug_paper": ["data.augment=paper"],
    "paper_inputs": ["data.normalize=none", "data.augment=paper"],  # the old defaults
    "lr_constant": ["train.lr_schedule=constant"],
    "batchnorm": ["model.norm=batch"],
    "fedavgm": ["fl.strategy.name=fedavgm", "fl.strategy.options={server_momentum: 0.5}"],
    "fedadam": ["fl.strategy.name=fedadam", "fl.strategy.options={eta: 0.003, eta_l: 0.001, tau: 0.001}"],
    "steps10": ["train.steps=10"],
    "steps50": ["train.steps=50"],
    "epoch_per_round": ["train.steps=null"],
}


def run_variant(dataset: str, preset: str, mode: str, overrides: list[str], out: Path, name: str) -> dict:
    cfg = build_config(PRESETS[preset], [f"data.path={dataset}", f"out_dir={out}", f"name={name}",
                                         "tracking.wandb=disabled", *overrides], source=f"variant {name}")
    started = time.time()
    if mode == "central":
        from cxrfl_ray.baseline import run_training

        run = run_training(cfg, quiet=True)
        summary = json.loads((run / "summary.json").read_text())
        test = summary["test"]
    else:
        from cxrfl_ray.fl.engine import run_federated

        run = run_federated(cfg, quiet=True)
        summary = json.loads((run / "summary.json").read_text())
        test = summary["final"]
    metric = "jaccard" if cfg.task == "segmentation" else "auroc_macro"
    sites = {k.split(":", 1)[1]: round(v.get(metric, float("nan")), 4) for k, v in test.items() if k.startswith("site:")}
    return {"variant": name, "mode": mode, "overrides": overrides, "metric": metric, "sites": sites,
            "test": round(test.get("central:test", {}).get(metric, float("nan")), 4),
            "test_accuracy": test.get("central:test", {}).get("accuracy"),
            "best_val": summary.get("best_val", summary.get("best_value")),
            "wall_s": round(time.time() - started, 1), "run": str(run)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset")
    ap.add_argument("--preset", default="real-segmentation")
    ap.add_argument("--mode", choices=["central", "fl"], default="fl")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    ap.add_argument("--set", action="append", default=[], help="overrides for every variant")
    ap.add_argument("--define", action="append", default=[], metavar="NAME=KEY=VALUE|KEY=VALUE",
                    help="an extra variant, e.g. warm_phantoms=model.pretrained=runs/x/best.safetensors")
    ap.add_argument("--out", default="runs/recipes")
    ap.add_argument("--json", help="results file (default OUT/MODE.json)")
    ap.add_argument("--redo", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = Path(args.json or out / f"{args.mode}.json")
    done = json.loads(path.read_text()) if path.is_file() and not args.redo else {}
    for item in args.define:
        name, _, overrides = item.partition("=")
        VARIANTS[name] = overrides.split("|")
    for name in args.variants.split(","):
        if name in done:
            continue
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
        row = run_variant(args.dataset, args.preset, args.mode, [*args.set, *VARIANTS[name]], out, name)
        done[name] = row
        path.write_text(json.dumps(done, indent=2) + "\n")
        print(json.dumps(row), flush=True)
    print(f"{'variant':18s} {'test':>7s} " + " ".join(f"{s:>11s}" for s in next(iter(done.values()))["sites"])
          + "   wall_s")
    for name, row in done.items():
        print(f"{name:18s} {row['test']:7.4f} " + " ".join(f"{v:11.4f}" for v in row["sites"].values())
              + f"   {row['wall_s']:.0f}")


if __name__ == "__main__":
    main()
