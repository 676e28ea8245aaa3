"""Every benchmark script starts and parses its options (the benchmarks themselves are run by
`make bench`, never by the tests: no timing in tests)."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if p.name not in ("__init__.py", "common.py", "run_all.py", "local_cluster.py"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_script_starts(script):
    done = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
