from __future__ import annotations

import json

import pytest

from eval_testing import fast_config, require_toolchain, requires_humaneval_x
from mft_core.eval.problems import LANGUAGES
from mft_core.eval.selfcheck import run_selfcheck

pytestmark = requires_humaneval_x


def test_quick_selfcheck_reports_passes_and_negative_control(tmp_path):
    for language in ("python", "js"):
        require_toolchain(language)
    report = run_selfcheck(languages=["python", "js"], limit=2, config=fast_config(),
                           results_dir=tmp_path)
    assert report.ok, report.format()
    for language in ("python", "js"):
        check = report.languages[language]
        assert (check.problems, check.canonical_passed, check.negative_total) == (2, 2, 2)
        assert check.negative_passed == [] and check.unexpected_failures == []
    assert (tmp_path / "canonical.jsonl").read_text().count("\n") == 4
    assert json.loads(json.dumps(report.to_dict()))["ok"] is True
    assert "self-check passed" in report.format()


@pytest.mark.slow
def test_full_canonical_sweep_all_languages(tmp_path):
    """5 x 164 canonical + 5 x 164 shifted: a few minutes on 2 cores."""
    for language in LANGUAGES:
        require_toolchain(language)
    report = run_selfcheck(results_dir=tmp_path)
    print(report.format())
    assert report.ok, report.format()
    for language in LANGUAGES:
        check = report.languages[language]
        assert check.problems == 164 and check.negative_total == 164
        assert check.negative_passed == []
    assert set(report.languages["js"].canonical_failures) == {"JavaScript/112", "JavaScript/155"}
    assert set(report.languages["go"].canonical_failures) <= {"Go/95"}
    for language in ("python", "cpp", "java"):
        assert report.languages[language].canonical_passed == 164
