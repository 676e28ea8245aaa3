"""Helpers shared by the HumanEval-X executor tests (imported by name; conftest only has fixtures).

The executor needs the five toolchains (scripts/install-toolchains.sh) and the HumanEval-X
data (tests/benchmark_data.py). A test that needs the data is skipped with the reason where it is
not found; where it is, a missing toolchain fails under `make test` (tests/installed.py).
"""

from __future__ import annotations

import os
import time

from mft_core.eval.execute import ExecutionConfig, missing_toolchain
from mft_core.eval.problems import LANGUAGES
from tests.benchmark_data import requires_humaneval_x
from tests.installed import require_installed

__all__ = ["requires_humaneval_x", "require_toolchain", "fast_config", "processes_with_token",
           "wait_until_gone"]


def require_toolchain(language: str) -> None:
    reason = missing_toolchain(language)
    require_installed(f"{language} toolchain missing: {reason}" if reason else None)


def fast_config() -> ExecutionConfig:
    """Two workers, a 5 s run timeout (hostile tests pass shorter ones per program)."""
    return ExecutionConfig(workers={language: 2 for language in LANGUAGES},
                           run_timeout_s={language: 5.0 for language in LANGUAGES},
                           compile_timeout_s=60.0)


def processes_with_token(token: str) -> list[int]:
    """Pids whose command line contains `token` (hostile children carry one)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as handle:
                    if token.encode() in handle.read():
                        found.append(int(name))
            except OSError:
                continue
    return found


def wait_until_gone(find, seconds: float = 1.0) -> list:
    """Poll `find()` until it returns nothing (killed processes may linger as zombies briefly)."""
    deadline = time.monotonic() + seconds
    while True:
        left = find()
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.02)
