"""The HumanEval-X data the tests use (imported by conftest, so it is decided once per session).

Found the way the product finds it (mft_core/benchmark.py), plus the copy that CI keeps beside the
checkout (test material, never a product default), and exported in $MFT_HUMANEVAL_X_DIR so that
every stage and subprocess of the session uses the same data. Where it is found, the tests that
need it are required (a missing toolchain then fails them under `make test`); where it is not,
they are skipped with the reason and the command that fetches it.
"""

import os
from pathlib import Path

import pytest

from mft_core.benchmark import ENV_HUMANEVAL_X_DIR, LANGUAGES, BenchmarkError, resolve_benchmark


def _find_humaneval_x():
    """The HumanEval-X data the tests use, found the way the product finds it, plus the copy
    that CI keeps beside the checkout (test material, never a product default). Exported in
    $MFT_HUMANEVAL_X_DIR, so that every stage and subprocess of the session uses the same data."""
    beside = Path(__file__).resolve().parents[2] / "shared" / "humaneval-x"
    if not os.environ.get(ENV_HUMANEVAL_X_DIR) and beside.is_dir():
        os.environ[ENV_HUMANEVAL_X_DIR] = str(beside)
    try:
        benchmark = resolve_benchmark()
    except BenchmarkError as error:
        return None, f"HumanEval-X not usable here: {error}"
    if benchmark.languages == LANGUAGES and benchmark.directory is not None:
        os.environ[ENV_HUMANEVAL_X_DIR] = str(benchmark.directory)
        return benchmark, None
    return benchmark, (f"needs HumanEval-X in all five languages, not found here ({benchmark.describe()}; looked at "
                       f"${ENV_HUMANEVAL_X_DIR}, {beside}, the user cache and the Hugging Face cache). "
                       f"Fetch it with `.venv/bin/mft data humaneval-x` (needs network) or set "
                       f"{ENV_HUMANEVAL_X_DIR}")


HUMANEVAL_X, HUMANEVAL_X_MISSING = _find_humaneval_x()
# For tests that need HumanEval-X's data (C++, Java, JavaScript, Go; or the real Python problems):
requires_humaneval_x = pytest.mark.skipif(HUMANEVAL_X_MISSING is not None, reason=HUMANEVAL_X_MISSING or "")


