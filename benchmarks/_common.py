"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOTTLE = Path(os.environ.get("PATCHAD_BOTTLE", ROOT.parent / "shared/data/mvtec_ad/bottle"))
RESULTS = ROOT / "benchmarks" / "results"


def peak_rss_mb() -> float:
    """Peak resident set size of this process (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def header() -> str:
    """First lines of every results file: the exact command, date and machine."""
    cmd = "PYTHONPATH=src python3 " + " ".join(sys.argv)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    import torch

    return (
        f"# command: {cmd}\n# date: {now}\n# machine: {platform.machine()}, "
        f"{os.cpu_count()} cores, load average at start {os.getloadavg()[0]:.2f} (above ~0.3 "
        f"other jobs shared the cores and timings are noisy), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads\n"
    )
