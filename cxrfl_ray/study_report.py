"""``OUT/report.md`` of a study (``cxrfl_ray.study``): its tables, pictures and the one-sentence
finding, all from the numbers in ``study.json`` so the report can be rebuilt without training."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from cxrfl_ray.report import _markdown

MAX_FLAGGED_SHOWN = 20


def _num(value: Any, digits: int = 3) -> Any:
    """A table cell: floats rounded, missing or NaN values blank."""
    if value is None:
        return ""
    if isinstance(value, float):
        return round(value, digits) if math.isfinite(value) else ""
    return value


def segmentation_table(seg: dict[str, Any]) -> pd.DataFrame:
    """Rows: models; columns: test Jaccard on each site and all, rows seen, work, wall time."""
    rows = []
    for name, m in seg["models"].items():
        row = {"model": name}
        row.update({s: _num(m["test"].get(s, {}).get("jaccard")) for s in [*seg["sites"], "all"]})
        work = f"{m['rounds']} rounds x {m['epochs']} epoch(s)" if m["rounds"] else f"{m['epochs']} epochs"
        row.update({"rows seen": m["rows_seen"], "training": work, "wall time (s)": m["wall_time_s"]})
        rows.append(row)
    return pd.DataFrame(rows)


def cross_site_lines(seg: dict[str, Any]) -> list[str]:
    """Each local-only model on the other sites, next to that site's own local model."""
    lines = []
    for site in seg["sites"]:
        own = seg["models"].get(f"local-{site}")
        for other in seg["sites"]:
            if own is None or other == site or f"local-{other}" not in seg["models"]:
                continue
            there = own["test"].get(other, {}).get("jaccard")
            home = seg["models"][f"local-{other}"]["test"].get(other, {}).get("jaccard")
            lines.append(f"- local-{site} on {other}'s test rows: Jaccard {_num(there)} "
                         f"(local-{other} on its own: {_num(home)})")
    return lines


def classification_table(cls: dict[str, Any]) -> pd.DataFrame:
    """Rows: (model, test view); columns: accuracy, AUROC (macro), macro-F1."""
    rows = []
    for name, m in cls["models"].items():
        for view, metrics in m["test"].items():
            rows.append({"model": name, "test rows of": view, "accuracy": _num(metrics.get("accuracy")),
                         "AUROC": _num(metrics.get("auroc_macro")), "macro-F1": _num(metrics.get("f1_macro"))})
    return pd.DataFrame(rows)


def cam_table(cam: dict[str, Any]) -> pd.DataFrame:
    rows = [{"model": name, **{k: _num(v) for k, v in s.items()}} for name, s in cam["summaries"].items()]
    return pd.DataFrame(rows)


def finding(cls: dict[str, Any], cam: dict[str, Any]) -> str:
    """Were the masked classifiers worse but more lung-focused (the CXR-FL paper's finding)?"""
    full, masked = (cls["models"][k]["test"]["all"] for k in ("full", "masked"))
    metric = "auroc_macro" if all(math.isfinite(x.get("auroc_macro", float("nan"))) for x in (full, masked)) \
        else "accuracy"
    f_full, f_masked = (cam["summaries"][k]["overall"] for k in ("full", "masked"))
    worse = masked[metric] < full[metric]
    scores = f"{metric} {masked[metric]:.3f} vs {full[metric]:.3f}"
    if not (math.isfinite(f_full) and math.isfinite(f_masked)):
        return (f"The lung-masked classifier was {'worse' if worse else 'not worse'} than the full-image one on all "
                f"test rows ({scores}); its lung focus could not be compared (empty CAMs).")
    focused = f_masked > f_full
    verdict = ("as the paper found" if worse and focused else
               "unlike the paper, where masked classifiers scored lower but looked more at the lungs")
    return (f"The lung-masked classifier was {'worse' if worse else 'not worse'} than the full-image one on all "
            f"test rows ({scores}) and {'more' if focused else 'not more'} lung-focused (share of CAM inside the "
            f"lungs {f_masked:.3f} vs {f_full:.3f}): {verdict}.")


def _pictures(models: dict[str, Any]) -> list[str]:
    return [f"![{name}: {Path(p).stem}]({p})" for name, m in models.items() for p in m["plots"]]


def write_report(out: Path, r: dict[str, Any]) -> Path:
    """Write ``out/report.md`` from a study's result dict (``study.json``)."""
    data, seg, mask, cls, cam = r["dataset"], r["segmentation"], r["mask"], r["classification"], r["cam"]
    sites = ", ".join(f"{s} {n}" for s, n in data["sites"].items())
    lines = [f"# Study {r['name']}", "",
             f"Dataset `{data['path']}` ({data['name']}): {data['num_rows']} images ({data['num_skipped']} skipped); "
             f"sites: {sites}; labels: {data['labels']}; splits: {data['splits']}.", "",
             "## Segmentation: test Jaccard by site", "",
             f"Same training budget: each federated run sees about {seg['federated_rows']:.0f} rows; pooled and "
             "local-only runs train enough epochs to see about as many.", "",
             _markdown(segmentation_table(seg)), "", "Cross-site:", "", *(cross_site_lines(seg) or ["- (no local-only runs)"]),
             "", *_pictures(seg["models"]), "",
             "## Mask", "",
             f"`{mask['path']}`: {mask['num_rows']} images masked by {mask['model']} (lung probability >= "
             f"{mask['threshold']}); {len(mask['flagged'])} implausible masks flagged (kept, partitions unchanged).", ""]
    lines += [f"- {f['id']}: {f['reason']}" for f in mask["flagged"][:MAX_FLAGGED_SHOWN]]
    if len(mask["flagged"]) > MAX_FLAGGED_SHOWN:
        lines.append(f"- ... {len(mask['flagged']) - MAX_FLAGGED_SHOWN} more in `data/masked/dataset.json`")
    lines += ["", "## Classification: full vs lung-masked images", "",
              f"{cls['clients']} clients; the full and masked datasets give every client the same image ids.", "",
              _markdown(classification_table(cls)), "",
              "Wall time: " + ", ".join(f"{k} {m['wall_time_s']} s ({m['rows_seen']} rows seen)"
                                        for k, m in cls["models"].items()) + ".", "",
              *_pictures(cls["models"]), "",
              "## Lung focus (Grad-CAM)", "",
              f"{cam['n']} test images, {cam['method']}; lung masks: {cam['mask_source']}. Share of CAM energy "
              "inside the lungs (1 = only the lungs).", "",
              _markdown(cam_table(cam)), "", f"![CAM grid]({cam['grid']})", "",
              f"**Finding.** {r['finding']}", "",
              "## Wall time", "",
              _markdown(pd.DataFrame([{"step": k, "seconds": v} for k, v in r["steps_s"].items()])), "",
              f"Total: {r['total_s']} s.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
