from __future__ import annotations

import gzip
import json

import pytest

from eval_testing import requires_humaneval_x
from mft_core.eval import problems as P


@requires_humaneval_x
def test_each_language_has_164_problems_in_order():
    for language in P.LANGUAGES:
        problems = P.load_problems(language)
        assert len(problems) == 164
        assert [p.number for p in problems] == list(range(164))
        assert all(p.language == language for p in problems)
    go = P.load_problems("go")[2]
    assert set(go.extra) >= {"import", "test_setup", "docstring"}


@requires_humaneval_x
def test_subsets_by_language_task_id_and_limit():
    first_two = P.select_problems(languages=["JavaScript", "py"], limit=2)
    assert [p.task_id for p in first_two] == ["Python/0", "Python/1", "JavaScript/0", "JavaScript/1"]
    picked = P.select_problems(task_ids=["Go/5", "HumanEval/3", "cpp/7"])
    assert [p.task_id for p in picked] == ["Python/3", "CPP/7", "Go/5"]
    assert len(P.select_problems(limit=1)) == 5
    with pytest.raises(P.ProblemDataError, match="unknown task id"):
        P.select_problems(task_ids=["Python/999"])
    with pytest.raises(ValueError, match="unknown language"):
        P.select_problems(languages=["rust"])


def test_task_id_helpers():
    assert P.language_of_task("CPP/3") == "cpp"
    assert P.language_of_task("JavaScript/3") == "js"
    assert P.language_of_task("HumanEval/3") == "python"
    assert P.normalize_task_id("humaneval/12") == "Python/12"
    with pytest.raises(ValueError, match="not a HumanEval-X id"):
        P.language_of_task("Rust/1")


def test_explicit_missing_directory_is_an_error(tmp_path):
    with pytest.raises(P.ProblemDataError, match="does not exist"):
        P.load_problems("python", tmp_path / "nope")


def test_malformed_data_names_file_and_line(tmp_path):
    folder = tmp_path / "python"
    folder.mkdir()
    good = {"task_id": "Python/0", "prompt": "p", "canonical_solution": "c", "test": "t"}
    with gzip.open(folder / "humaneval_python.jsonl.gz", "wt") as handle:
        handle.write(json.dumps(good) + "\n" + "{broken\n")
    with pytest.raises(P.ProblemDataError, match=r"humaneval_python.jsonl.gz:2: not valid JSON"):
        P.load_problems("python", tmp_path)
    with gzip.open(folder / "humaneval_python.jsonl.gz", "wt") as handle:
        handle.write(json.dumps({"task_id": "Python/0"}) + "\n")
    with pytest.raises(P.ProblemDataError, match=r":1: missing field"):
        P.load_problems("python", tmp_path)
