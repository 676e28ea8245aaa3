"""Helpers shared by the HumanEval-X executor tests (imported by name; conftest only has fixtures).

The executor needs the five toolchains (scripts/install-toolchains.sh) and the HumanEval-X
data ($MFT_HUMANEVAL_X_DIR or ../shared/humaneval-x). A test that needs a language whose
toolchain is missing is skipped with the reason; so is a test that needs the data.
"""

from __future__ import annotations

import os
import time

import pytest

from mft_core.eval.execute import ExecutionConfig, missing_toolchain
from mft_core.eval.problems import LANGUAGES, ProblemDataError, resolve_humaneval_dir
from tests.installed import require_installed


def humaneval_x_dir():
    try:
        return resolve_humaneval_dir()
    except ProblemDataError:
        return None


requires_humaneval_x = pytest.mark.skipif(
    humaneval_x_dir() is None,
    reason="HumanEval-X data not found (set MFT_HUMANEVAL_X_DIR to the CodeGeeX-layout folder)")


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
