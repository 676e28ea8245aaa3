"""`mft eval ...` sub-commands: `selfcheck` and `score`.

Wire into the main parser with `add_eval_commands(subparsers)`; every leaf parser sets
`func`, which takes the parsed namespace and returns the process exit code:

    args = parser.parse_args()
    sys.exit(args.func(args))
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import logging
import sys
from collections import Counter
from pathlib import Path

from mft_core.eval.execute import (ExecutionConfig, ResultsFileBusy, ToolchainMissing,
                                   execute_samples, normalize_samples)
from mft_core.eval.passk import format_pass_at_k_table, pass_at_k_table
from mft_core.eval.problems import (LANGUAGES, ProblemDataError, language_of_task,
                                    normalize_language)
from mft_core.eval.sandbox import SandboxError
from mft_core.eval.selfcheck import run_selfcheck


def add_eval_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `eval` command (with `selfcheck` and `score`) to an argparse sub-parser set."""
    eval_parser = subparsers.add_parser(
        "eval", help="HumanEval-X execution: executor self-check, scoring of generations",
        description="Execute HumanEval-X programs in the sandbox (scripts/install-toolchains.sh "
                    "installs the five toolchains).")
    commands = eval_parser.add_subparsers(dest="eval_command", metavar="{selfcheck,score}")
    commands.required = True

    selfcheck = commands.add_parser(
        "selfcheck", help="canonical solutions must pass, shifted ones must fail",
        description="Run every canonical solution (expected failures: JavaScript/112, "
                    "JavaScript/155, sometimes Go/95) and a shifted-canonical negative control "
                    "(expected: no pass). Exit code 0 when both hold.")
    selfcheck.add_argument("--languages", nargs="+", metavar="LANG",
                           help=f"subset of {', '.join(LANGUAGES)} (space or comma separated)")
    selfcheck.add_argument("--limit", type=_positive_int, metavar="N",
                           help="only the first N problems per language")
    selfcheck.add_argument("--no-negative-control", action="store_true",
                           help="skip the shifted-canonical run")
    selfcheck.add_argument("--out", type=Path, metavar="DIR",
                           help="keep results (canonical.jsonl, negative.jsonl, report.json) here")
    _add_execution_options(selfcheck)
    selfcheck.set_defaults(func=selfcheck_command)

    score = commands.add_parser(
        "score", help="execute generations and report pass@k",
        description="Execute generations given as JSON lines {\"task_id\", \"generation\"} "
                    "(or OpenAI human-eval's \"completion\"; optional \"sample_index\"), write "
                    "results.jsonl and summary.json, print a pass@k table. Rerunning with the "
                    "same --out resumes an interrupted run.")
    score.add_argument("samples", type=Path, metavar="SAMPLES.jsonl",
                       help="generations, one JSON object per line (.jsonl or .jsonl.gz)")
    score.add_argument("--out", type=Path, metavar="DIR",
                       help="output directory (default: <SAMPLES without suffix>-eval/)")
    score.add_argument("--k", type=_k_list, default=[1, 10], metavar="K[,K...]",
                       help="pass@k values to report (default 1,10; only k <= samples per problem)")
    score.add_argument("--no-truncate", action="store_true",
                       help="use generations verbatim (default: apply the per-language stop rules)")
    _add_execution_options(score)
    score.set_defaults(func=score_command)
    return eval_parser


def _add_execution_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--humaneval-dir", type=Path, metavar="DIR",
                        help="HumanEval-X data folder (default: $MFT_HUMANEVAL_X_DIR, the user cache, "
                             "the Hub dataset, else Python HumanEval only; see mft_core/benchmark.py)")
    parser.add_argument("--workers", type=_positive_int, metavar="N",
                        help="parallel sandboxes per language (default: min(cores, 4))")
    parser.add_argument("--run-timeout", type=float, metavar="S", default=10.0,
                        help="wall-clock limit of a program run (default 10 s)")
    parser.add_argument("--compile-timeout", type=float, metavar="S", default=60.0,
                        help="wall-clock limit of a compile step (default 60 s)")
    parser.add_argument("--java-compiler", choices=("server", "javac"), default="server",
                        help="warm javax.tools server (default) or plain javac per sample")
    parser.add_argument("--allow-unsandboxed", action="store_true",
                        help="execute generated code even where the sandbox's namespaces do not work "
                             "(it can then reach the network and write wherever you can)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _k_list(text: str) -> list[int]:
    try:
        ks = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k expects integers like 1,10,100, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise argparse.ArgumentTypeError(f"--k values must be >= 1, got {text!r}")
    return ks


def _execution_config(args: argparse.Namespace) -> ExecutionConfig:
    config = ExecutionConfig(compile_timeout_s=args.compile_timeout,
                             run_timeout_s={lang: args.run_timeout for lang in LANGUAGES},
                             java_compiler=args.java_compiler, allow_unsandboxed=args.allow_unsandboxed)
    if args.workers:
        config.workers = {lang: args.workers for lang in LANGUAGES}
    return config


def _ensure_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")


def _fail_cleanly(command):
    """Known failures (bad input, missing data or toolchains) end as one `error:` line."""
    @functools.wraps(command)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (ValueError, ProblemDataError, ToolchainMissing, SandboxError,
                ResultsFileBusy) as error:
            raise SystemExit(f"error: {error}") from None
    return wrapper


@_fail_cleanly
def selfcheck_command(args: argparse.Namespace) -> int:
    _ensure_logging()
    languages = None
    if args.languages:
        languages = [normalize_language(part) for item in args.languages
                     for part in item.split(",") if part.strip()]
    report = run_selfcheck(languages=languages, limit=args.limit,
                           humaneval_dir=args.humaneval_dir, config=_execution_config(args),
                           negative_control=not args.no_negative_control, results_dir=args.out)
    if args.out:
        (args.out / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    print(report.format())
    return 0 if report.ok else 1


def read_samples_file(path: Path) -> list[dict]:
    """JSON objects from a .jsonl(.gz) file; errors name the file and line."""
    if not path.is_file():
        raise SystemExit(f"error: samples file {path} not found")
    opener = gzip.open if path.suffix == ".gz" else open
    records = []
    with opener(path, "rt", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise SystemExit(f"error: {path}:{line_number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict) or "task_id" not in record or not isinstance(
                    record.get("generation", record.get("completion")), str):
                raise SystemExit(f"error: {path}:{line_number}: expected an object with "
                                 f"'task_id' and a string 'generation' (or 'completion')")
            try:
                language_of_task(str(record["task_id"]))
            except ValueError as error:
                raise SystemExit(f"error: {path}:{line_number}: {error}") from None
            records.append(record)
    if not records:
        raise SystemExit(f"error: {path} holds no samples")
    return records


@_fail_cleanly
def score_command(args: argparse.Namespace) -> int:
    _ensure_logging()
    records = read_samples_file(args.samples)
    normalize_samples(records, source=str(args.samples))  # duplicates, bad indices
    stem = args.samples.name.removesuffix(".gz").removesuffix(".jsonl")
    out = args.out or args.samples.with_name(f"{stem}-eval")
    out.mkdir(parents=True, exist_ok=True)
    results = execute_samples(records, out / "results.jsonl", humaneval_dir=args.humaneval_dir,
                              config=_execution_config(args), truncate=not args.no_truncate)
    table = pass_at_k_table(results, args.k)
    verdicts: dict[str, Counter] = {}
    for record in results:
        verdicts.setdefault(record["language"], Counter())[record["verdict"]] += 1
    summary = {"samples_file": str(args.samples), "results_file": str(out / "results.jsonl"),
               "ks": args.k, "pass_at_k": table,
               "verdicts": {lang: dict(counts) for lang, counts in verdicts.items()},
               "truncate": not args.no_truncate, "run_timeout_s": args.run_timeout,
               "compile_timeout_s": args.compile_timeout, "java_compiler": args.java_compiler}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(format_pass_at_k_table(table, args.k))
    skipped = [k for k in args.k if table["average"][f"pass@{k}"] is None]
    if skipped:
        print(f"(pass@{', pass@'.join(map(str, skipped))}: undefined where a problem has fewer "
              f"samples than k)", file=sys.stderr)
    print(f"results: {out / 'results.jsonl'}  summary: {out / 'summary.json'}")
    return 0
