"""Shared by the benchmarks: best-of-N timing, results JSON, a printed table.

Every benchmark measures our code and a named baseline in the same run and reports ratios:
these machines are shared and noisy, so absolute times are context, ratios are the result.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def best_time(fn: Callable[[], Any], repeat: int = 3) -> tuple[float, Any]:
    """The fastest of `repeat` runs (the least disturbed by other load) and its return value."""
    best, value = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return best, value


def machine() -> dict[str, Any]:
    try:
        flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")).split()
        model = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")).split(":", 1)[1].strip()
    except (OSError, StopIteration):
        flags, model = [], platform.processor()
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "bf16_native": any(f in flags for f in ("amx_bf16", "avx512_bf16")),
        "load_avg_1min": os.getloadavg()[0],
        "python": platform.python_version(),
    }


def ensure_demo_data(out: Path) -> Path:
    if not (out / "demo_stats.json").exists():
        subprocess.run([sys.executable, "-m", "mft_core.cli", "data", "demo", "--out", str(out)], check=True, cwd=REPO)
    return out


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers, *[[f"{c:.3g}" if isinstance(c, float) else str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def save(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), **result}, indent=1) + "\n")
    return path
