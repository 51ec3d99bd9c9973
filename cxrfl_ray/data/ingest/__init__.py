"""Source layouts that turn a folder of real chest X-rays into a dataset (see docs/DATA.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from cxrfl_ray.data.ingest import folders, lungseg, manifest, rsna
from cxrfl_ray.data.ingest.pipeline import Candidate, IngestError, IngestOptions, Skip, ingest

LAYOUTS = {
    "manifest": manifest.scan,
    "lungseg": lungseg.scan,
    "rsna": rsna.scan,
    "folders": folders.scan,
}

# Keyword arguments that name one source's own files: they cannot apply to several folders.
ONE_SOURCE_ARGS = ("csv", "images", "masks")


def ingest_sources(layout: str, roots: Sequence[str | Path], out: str | Path, options: IngestOptions,
                   name: str | None = None, **layout_kwargs: Any) -> dict[str, Any]:
    """Ingest one or several source folders of ``layout`` into ONE dataset; returns its card.

    Each folder is a source named after it (its rows' ids and, where its CSV names no site, their
    site: one folder per hospital), so folder names must differ. ``name`` names the dataset
    (default: the folder names joined by ``+``) and, with a single folder, its source too.
    ``layout_kwargs`` go to the layout's scan of every folder (``csv``/``images``/``masks`` only
    with one folder)."""
    if layout not in LAYOUTS:
        raise IngestError(f"unknown layout {layout!r}; choose from {sorted(LAYOUTS)}")
    roots = [Path(r) for r in roots]
    if not roots:
        raise IngestError("no source folder given")
    names = [r.resolve().name for r in roots]
    if len(set(names)) != len(names):
        raise IngestError(f"source folders must have distinct names (they name sites and ids): {names}")
    several = len(roots) > 1
    if several and any(layout_kwargs.get(k) for k in ONE_SOURCE_ARGS):
        raise IngestError("csv/images/masks name one source's files; give one source folder with them")
    entries: list[Candidate | Skip] = []
    for root, folder in zip(roots, names):
        source = name if not several and name else folder
        for entry in LAYOUTS[layout](root, source=source, **layout_kwargs):
            if several and isinstance(entry, Candidate):
                entry.source = source
            entries.append(entry)
    sources = [{"layout": layout, "path": str(r.resolve())} for r in roots]
    dataset_name = name or "+".join(names)
    return ingest(entries, out, name=dataset_name, source=names[0] if not several and not name else dataset_name,
                  options=options, sources=sources)


__all__ = ["LAYOUTS", "Candidate", "IngestError", "IngestOptions", "Skip", "ingest", "ingest_sources"]
