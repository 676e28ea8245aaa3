"""report.html: written by every pipeline run (a fully cached one too), self-contained, opened in
headless Chromium: it renders, its plots load, nothing in it runs, and generated code is shown
as text."""

import json
import re
import shutil
from pathlib import Path

import pytest

from test_flow_caching import run_flow, write_data
from tests.browser import Browser, chromium_missing
from tests.installed import require_installed

pytestmark = pytest.mark.prefect


def reports(config: Path) -> list[Path]:
    return sorted((config.parent / "runs" / "reports").glob("*.html"))


def test_every_run_writes_a_report_that_says_what_was_computed_and_what_reused(prefect_api, tmp_path, tiny_llama_dir):
    config = write_data(tmp_path, tiny_llama_dir)
    config.write_text(config.read_text().replace("evaluate_base: false", "evaluate_base: true"))
    state, _ = run_flow(config)
    assert state.is_completed()
    (report,) = reports(config)
    assert re.fullmatch(r"evaluate-[0-9a-f]{16}\.html", report.name)
    first = report.read_text()
    for anchor in ("run", "ingest", "tokenize", "train", "merge", "evaluate", "provenance"):
        assert f'id="{anchor}"' in first
    assert first.count('class="computed">computed') == 5 and "reused</span>" not in first
    assert "<script" not in first and "http://" not in first and "https://" not in first  # needs no network
    assert first.count("data:image/png;base64,") == 2  # loss curves, throughput and memory (no CoBa here); inline
    state, _ = run_flow(config)  # fully cached: the same report, now saying so
    assert reports(config) == [report]
    again = report.read_text()
    assert again.count('class="reused">reused') == 5 and "computed</span>" not in again


def test_generated_code_is_text_in_the_report(tmp_path):
    from mft_core.run_report import _samples

    evaluate = tmp_path / "runs" / "evaluate" / "k"
    evaluate.mkdir(parents=True)
    hostile = "</pre><script>alert('owned')</script><img src=x onerror=alert(1)>"
    (evaluate / "generations.jsonl").write_text(json.dumps(
        {"model": "finetuned", "task_id": "Python/0", "sample_index": 0, "language": "python",
         "generation": hostile}) + "\n")
    (evaluate / "results.jsonl").write_text(json.dumps(
        {"model": "finetuned", "task_id": "Python/0", "sample_index": 0, "verdict": "failed"}) + "\n")
    html = _samples(evaluate, {"models": {}})
    assert "<script>" not in html and "<img" not in html
    assert "&lt;script&gt;alert(&#x27;owned&#x27;)&lt;/script&gt;" in html


@pytest.mark.slow
def test_the_report_renders_in_a_real_browser(prefect_api, tmp_path, tiny_llama_dir):
    require_installed(chromium_missing())
    config = write_data(tmp_path, tiny_llama_dir)
    state, _ = run_flow(config)
    assert state.is_completed()
    (report,) = reports(config)
    with Browser() as browser:
        browser.open(report.as_uri())
        text = browser.wait_for_text(["mft-pipeline run report", "This run", "Training", "Merge check",
                                      "HumanEval-X: pass@k", "Provenance"], timeout=60)
        assert "alpha" in text and "beta" in text  # the tasks' rows
        images = browser.evaluate("[...document.images].map(i => i.complete && i.naturalWidth > 0)")
        assert images and all(images)  # every plot decoded
        assert browser.evaluate("document.scripts.length") == 0
        shot = tmp_path / "report.png"
        browser.screenshot(shot)
    assert shot.stat().st_size > 20_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shutil.copy(shot, tmp_path.parent / "last-report-screenshot.png")  # for a look when the test fails
