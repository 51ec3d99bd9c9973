"""Shared bits of the benchmark scripts: JSON output and a dated row in BENCHMARKS.md."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def machine() -> str:
    import os

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {gpu}, torch {torch.__version__}"


def table(columns: dict[str, str], rows: list[dict]) -> list[str]:
    """Markdown table lines: ``columns`` maps a result key to its heading."""
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in columns) + " |" for r in rows]
    return lines


def report(name: str, results: dict, lines: list[str]) -> None:
    """Print results as JSON and append a dated section to BENCHMARKS.md."""
    print(json.dumps({"benchmark": name, **results}, indent=2))
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with open(BENCHMARKS_MD, "a") as fh:
        fh.write(f"\n### {name} — {stamp}\n\n{machine()}\n\n" + "\n".join(lines) + "\n")
