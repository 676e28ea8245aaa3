"""Things `make test` installs before it runs the tests (the HumanEval-X toolchains, tcmalloc).

Under `make test` (MFT_TESTS_REQUIRE_INSTALLED=1) a missing one fails the test that needs it: the
install step ran, so its absence is a defect, not a reason to pass quietly. Under a bare `pytest`
on a machine set up differently, the test is skipped with the reason and the fix."""

import os

import pytest

REQUIRED = os.environ.get("MFT_TESTS_REQUIRE_INSTALLED") == "1"


def require_installed(missing: str | None) -> None:
    """`missing`: why something `make test` installs is absent (with the fix), or None."""
    if missing:
        if REQUIRED:
            pytest.fail(f"{missing} (make test installed the toolchains first: this should not happen)")
        pytest.skip(missing)
