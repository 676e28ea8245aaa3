from __future__ import annotations

import argparse
import json

import pytest

from eval_testing import require_toolchain, requires_humaneval_x
from mft_core.eval.commands import add_eval_commands
from mft_core.eval.problems import load_problems


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="mft")
    add_eval_commands(main.add_subparsers(dest="command"))
    return main


def test_arguments_and_defaults():
    args = parser().parse_args(["eval", "score", "s.jsonl", "--k", "10,1", "--workers", "2"])
    assert args.func.__name__ == "score_command" and args.k == [1, 10] and args.workers == 2
    args = parser().parse_args(["eval", "selfcheck", "--languages", "python,js", "go", "--limit", "3"])
    assert args.func.__name__ == "selfcheck_command" and args.limit == 3
    with pytest.raises(SystemExit):
        parser().parse_args(["eval", "score", "s.jsonl", "--k", "0"])
    with pytest.raises(SystemExit):
        parser().parse_args(["eval"])


@requires_humaneval_x
def test_score_writes_results_summary_and_table(tmp_path, capsys):
    require_toolchain("python")
    zero, one = load_problems("python")[:2]
    samples = tmp_path / "gen.jsonl"
    rows = [{"task_id": "Python/0", "generation": zero.canonical_solution},
            {"task_id": "Python/0", "generation": "    return None\n"},
            {"task_id": "HumanEval/1", "completion": one.canonical_solution},  # OpenAI's form
            {"task_id": "Python/1", "generation": one.canonical_solution}]
    samples.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = parser().parse_args(["eval", "score", str(samples), "--k", "1,2,5"])
    assert args.func(args) == 0
    out = tmp_path / "gen-eval"
    summary = json.loads((out / "summary.json").read_text())
    python = summary["pass_at_k"]["languages"]["python"]
    assert python["pass@1"] == pytest.approx(0.75) and python["pass@2"] == 1.0
    assert python["pass@5"] is None
    assert summary["verdicts"]["python"] == {"passed": 3, "failed": 1}
    assert (out / "results.jsonl").read_text().count("\n") == 4
    printed = capsys.readouterr().out
    assert "75.00%" in printed and "results:" in printed


def test_bad_arguments_end_as_one_error_line(tmp_path):
    args = parser().parse_args(["eval", "selfcheck", "--languages", "rust"])
    with pytest.raises(SystemExit, match="error: unknown language 'rust'"):
        args.func(args)
    args = parser().parse_args(["eval", "selfcheck", "--humaneval-dir", str(tmp_path / "none")])
    with pytest.raises(SystemExit, match="error: HumanEval-X directory .* does not exist"):
        args.func(args)


def test_score_rejects_bad_lines_with_file_and_line(tmp_path):
    samples = tmp_path / "bad.jsonl"
    samples.write_text('{"task_id": "Python/0", "generation": "x"}\n{"task_id": "Python/1"}\n')
    args = parser().parse_args(["eval", "score", str(samples)])
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: expected an object with 'task_id'"):
        args.func(args)


@requires_humaneval_x
def test_selfcheck_command_exit_code_and_report(tmp_path, capsys):
    require_toolchain("python")
    args = parser().parse_args(["eval", "selfcheck", "--languages", "python", "--limit", "2",
                                "--out", str(tmp_path)])
    assert args.func(args) == 0
    assert json.loads((tmp_path / "report.json").read_text())["ok"] is True
    assert "self-check passed" in capsys.readouterr().out
