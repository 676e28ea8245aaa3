"""Fixtures for the HumanEval-X executor tests (helpers live in eval_testing.py)."""

from __future__ import annotations

import pytest

from eval_testing import fast_config
from mft_core.eval.execute import ProgramRunner


@pytest.fixture(scope="session")
def runner():
    """One program runner for the whole session (warm Java compile server, Go caches)."""
    with ProgramRunner(fast_config(), workers=2) as shared:
        yield shared
