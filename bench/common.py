"""Helpers for the benchmark scripts: statistics, peak RSS, the machine, the speech manifest."""

from __future__ import annotations

import csv
import os
import platform
import resource
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEECH = ROOT / "tests" / "data" / "speech"


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    k = (len(v) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def summary(values: list[float]) -> str:
    return f"median {statistics.median(values):.3f}  p95 {pct(values, 0.95):.3f}  (n={len(values)})"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> str:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, {platform.system()} {platform.machine()}, " \
           f"Python {platform.python_version()}"


def manifest(speech_dir: Path = SPEECH) -> list[dict[str, str]]:
    with open(speech_dir / "manifest.tsv", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))
