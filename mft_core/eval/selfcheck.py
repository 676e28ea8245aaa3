"""Self-check of the executor: canonical solutions must pass, shifted ones must fail.

- Canonical: every problem with its own canonical solution (through the same truncation and
  assembly as model output). Expected: all pass except JavaScript/112 and JavaScript/155
  (wrong canonical solutions, reference section 4) and, sometimes, Go/95 (its solution depends
  on Go's randomised map order; fails ~15-20% of runs).
- Negative control: problem i gets the canonical solution of the next problem of its language
  (i+1, wrapping around). Expected: none passes. A pass means the executor is broken (for
  example a verdict that ignores the exit status).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mft_core.eval.execute import ExecutionConfig, execute_samples
from mft_core.eval.problems import LANGUAGES, load_problems, normalize_language, select_problems

EXPECTED_CANONICAL_FAILURES = frozenset({"JavaScript/112", "JavaScript/155"})
FLAKY_CANONICAL_FAILURES = frozenset({"Go/95"})


@dataclass
class LanguageCheck:
    language: str
    problems: int
    canonical_passed: int
    canonical_failures: dict[str, str] = field(default_factory=dict)  # task id -> verdict
    unexpected_failures: list[str] = field(default_factory=list)
    negative_total: int = 0
    negative_passed: list[str] = field(default_factory=list)
    cpu_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.unexpected_failures and not self.negative_passed


@dataclass
class SelfcheckReport:
    languages: dict[str, LanguageCheck]
    negative_control: bool

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.languages.values())

    def to_dict(self) -> dict:
        return {"ok": self.ok, "negative_control": self.negative_control,
                "languages": {name: {**asdict(check), "ok": check.ok}
                              for name, check in self.languages.items()}}

    def format(self) -> str:
        lines = [f"{'language':<10} {'canonical':>11} {'negative':>10}  status",
                 "-" * 54]
        for name, check in self.languages.items():
            negative = (f"{len(check.negative_passed)}/{check.negative_total}"
                        if self.negative_control else "-")
            status = "ok" if check.ok else "FAIL"
            notes = []
            expected = [t for t in check.canonical_failures if t not in check.unexpected_failures]
            if expected:
                notes.append("known failures: " + ", ".join(expected))
            if check.unexpected_failures:
                notes.append("UNEXPECTED: " + ", ".join(
                    f"{t} ({check.canonical_failures[t]})" for t in check.unexpected_failures))
            if check.negative_passed:
                notes.append("shifted solutions passed: " + ", ".join(check.negative_passed))
            lines.append(f"{name:<10} {check.canonical_passed:>5}/{check.problems:<5} "
                         f"{negative:>10}  {status}" + (f"  [{'; '.join(notes)}]" if notes else ""))
        lines.append(f"self-check {'passed' if self.ok else 'FAILED'}")
        return "\n".join(lines)


def run_selfcheck(languages: list[str] | None = None, limit: int | None = None,
                  humaneval_dir: str | Path | None = None,
                  config: ExecutionConfig | None = None, negative_control: bool = True,
                  results_dir: str | Path | None = None) -> SelfcheckReport:
    """Run the canonical and (optionally) shifted-canonical checks; returns a structured report.

    `limit`: first N problems per language. `results_dir`: keep canonical.jsonl and
    negative.jsonl there (a rerun resumes); by default a temporary directory is used.
    """
    chosen = [normalize_language(lang) for lang in languages] if languages else None
    problems = select_problems(languages=chosen, limit=limit, humaneval_dir=humaneval_dir)
    canonical = [{"task_id": p.task_id, "sample_index": 0, "generation": p.canonical_solution}
                 for p in problems]
    shifted = []
    if negative_control:
        for language in sorted({p.language for p in problems}, key=LANGUAGES.index):
            everything = load_problems(language, humaneval_dir)
            following = {p.task_id: everything[(i + 1) % len(everything)]
                         for i, p in enumerate(everything)}
            shifted += [{"task_id": p.task_id, "sample_index": 0,
                         "generation": following[p.task_id].canonical_solution}
                        for p in problems if p.language == language]

    temporary = results_dir is None
    out = Path(tempfile.mkdtemp(prefix="mft-selfcheck-")) if temporary else Path(results_dir)
    try:
        canonical_results = execute_samples(canonical, out / "canonical.jsonl",
                                            problems=problems, config=config)
        negative_results = (execute_samples(shifted, out / "negative.jsonl", problems=problems,
                                            config=config) if shifted else [])
    finally:
        if temporary:
            shutil.rmtree(out, ignore_errors=True)

    checks: dict[str, LanguageCheck] = {}
    for language in sorted({p.language for p in problems}, key=LANGUAGES.index):
        mine = [r for r in canonical_results if r["language"] == language]
        failures = {r["task_id"]: r["verdict"] for r in mine if not r["passed"]}
        unexpected = [t for t in failures
                      if t not in EXPECTED_CANONICAL_FAILURES | FLAKY_CANONICAL_FAILURES]
        negatives = [r for r in negative_results if r["language"] == language]
        checks[language] = LanguageCheck(
            language=language, problems=len(mine), canonical_passed=len(mine) - len(failures),
            canonical_failures=failures, unexpected_failures=unexpected,
            negative_total=len(negatives),
            negative_passed=[r["task_id"] for r in negatives if r["passed"]],
            cpu_s=round(sum(r["cpu_s"] for r in mine + negatives), 3))
    return SelfcheckReport(languages=checks, negative_control=negative_control)
