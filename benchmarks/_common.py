"""Shared bits of the benchmark scripts: JSON output and a dated row in BENCHMARKS.md."""

from __future__ import annotations

import functools
import json
import platform
import time
from pathlib import Path

import torch

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def machine() -> str:
    """The host in one line, CPU model and the vector unit torch uses included: the same VM size
    lands on different CPUs, and a row's speed depends on which (a 1-thread resnet18 fit took
    1.1-1.3 s on the host of sessions 10-12 and 2.3-3.0 s on session 13's AMD EPYC with AVX2)."""
    import os

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores ({cpu_model()}, "
            f"{torch.backends.cpu.get_cpu_capability()}), {gpu}, torch {torch.__version__}")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU model unknown"


def keeps_torch_threads(run):
    """``run`` with the process's torch thread count restored after it (the floors set their own)."""

    @functools.wraps(run)
    def kept(*args, **kwargs):
        threads = torch.get_num_threads()
        try:
            return run(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return kept


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
