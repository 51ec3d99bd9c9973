"""Source layouts that turn a folder of real chest X-rays into a dataset (see docs/DATA.md)."""

from __future__ import annotations

from cxrfl_ray.data.ingest import folders, lungseg, manifest, rsna
from cxrfl_ray.data.ingest.pipeline import Candidate, IngestError, IngestOptions, Skip, ingest

LAYOUTS = {
    "manifest": manifest.scan,
    "lungseg": lungseg.scan,
    "rsna": rsna.scan,
    "folders": folders.scan,
}

__all__ = ["LAYOUTS", "Candidate", "IngestError", "IngestOptions", "Skip", "ingest"]
