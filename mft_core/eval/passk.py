"""Unbiased pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code").

For one problem with n samples of which c passed:
    pass@k = 1 - C(n - c, k) / C(n, k)
computed as 1 - prod_{i = n-c+1 .. n} (1 - k / i), which is numerically stable; it is 1 when
n - c < k. A language's pass@k is the mean over its problems and is reported only when every
problem has n >= k (CodeGeeX's policy: with fewer samples the estimator is undefined). The
overall figure is the mean over languages (each language weighs the same, as in the
HumanEval-X paper), over the languages where that k is defined.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

from mft_core.eval.problems import LANGUAGES, language_of_task


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn from n (c correct) is correct."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} is undefined with n={n} samples (need 1 <= k <= n)")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def counts_per_problem(results: Iterable[dict]) -> dict[str, tuple[int, int]]:
    """task_id -> (samples, passed) from result records ({"task_id", "passed"})."""
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for record in results:
        entry = totals[record["task_id"]]
        entry[0] += 1
        entry[1] += bool(record["passed"])
    return {task_id: (n, c) for task_id, (n, c) in totals.items()}


def pass_at_k_table(results: Iterable[dict], ks: Sequence[int] = (1, 10, 100)) -> dict:
    """pass@k per language and averaged over languages.

    Returns {"languages": {lang: {"problems", "samples", "min_samples", "passed",
    "pass@k": value or None}}, "average": {"pass@k": value or None, "languages": [...]}}.
    A value is None when some problem of the language has fewer than k samples.
    """
    if any(k < 1 for k in ks):
        raise ValueError(f"k must be >= 1, got {list(ks)}")
    per_language: dict[str, dict[str, tuple[int, int]]] = defaultdict(dict)
    for task_id, counts in counts_per_problem(results).items():
        per_language[language_of_task(task_id)][task_id] = counts
    table: dict = {"languages": {}, "average": {}}
    for language in sorted(per_language, key=LANGUAGES.index):
        problems = per_language[language]
        min_samples = min(n for n, _ in problems.values())
        row: dict = {"problems": len(problems), "samples": sum(n for n, _ in problems.values()),
                     "min_samples": min_samples, "passed": sum(c for _, c in problems.values())}
        for k in ks:
            row[f"pass@{k}"] = (sum(pass_at_k(n, c, k) for n, c in problems.values()) / len(problems)
                                if k <= min_samples else None)
        table["languages"][language] = row
    for k in ks:
        values = [row[f"pass@{k}"] for row in table["languages"].values()
                  if row[f"pass@{k}"] is not None]
        table["average"][f"pass@{k}"] = sum(values) / len(values) if values else None
        table["average"][f"languages@{k}"] = [
            language for language, row in table["languages"].items() if row[f"pass@{k}"] is not None]
    return table


def format_pass_at_k_table(table: dict, ks: Sequence[int]) -> str:
    """A fixed-width text table (percentages; '-' where k exceeds the samples per problem)."""
    header = f"{'language':<10} {'problems':>8} {'samples':>8} {'passed':>7}" + "".join(
        f" {'pass@' + str(k):>9}" for k in ks)
    lines = [header, "-" * len(header)]

    def cell(value: float | None) -> str:
        return f" {'-':>9}" if value is None else f" {100 * value:>8.2f}%"

    for language, row in table["languages"].items():
        lines.append(f"{language:<10} {row['problems']:>8} {row['samples']:>8} {row['passed']:>7}"
                     + "".join(cell(row[f"pass@{k}"]) for k in ks))
    lines.append(f"{'average':<10} {'':>8} {'':>8} {'':>7}"
                 + "".join(cell(table["average"][f"pass@{k}"]) for k in ks))
    return "\n".join(lines)
