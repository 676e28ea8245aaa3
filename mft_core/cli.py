"""`mft`: the command line.

  mft config show [--config F] [--set k=v ...]      print the resolved config
  mft config reference                               every key, its default and effect (markdown)
  mft run [--stages a,b] [--force a] [--set k=v]     run the flow in-process (Prefect, embedded DB)
  mft ingest [--force] [--set k=v]                    run one stage without Prefect (each stage has one)
  mft status [--config F] [--json]                    each stage's key, output (complete, partial, missing), size
  mft gc [--config F] [--delete]                      stage outputs no config or deployment refers to
  mft data demo --out DIR                             build the embedded demo data set
  mft data humaneval-x                                download HumanEval-X (pinned, checked) into the HF cache
  mft eval selfcheck | score                          HumanEval-X toolchain check / scoring
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from mft_core.config import ConfigError, config_to_yaml, load_config, parse_override
from mft_core.console import run_log
from mft_core.preflight import PreflightError


def _overrides(items: list[str] | None) -> dict[str, Any]:
    return dict(parse_override(item) for item in items or [])


def _stage_list(text: str | None) -> list[str] | None:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="pipeline.yaml", help="pipeline config (default: pipeline.yaml)")
    parser.add_argument(
        "--set", dest="overrides", action="append", metavar="KEY=VALUE",
        help="override a config key, e.g. --set ingest.on_error=skip (repeatable; values are YAML)",
    )


def cmd_config_show(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, _overrides(args.overrides))
    print(config_to_yaml(cfg), end="")
    return 0


def cmd_config_reference(args: argparse.Namespace) -> int:
    from mft_core.config import reference_markdown

    print(reference_markdown(), end="")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from mft_core.preflight import preflight
    from mft_core.stages import STAGE_ORDER

    cfg = load_config(args.config, _overrides(args.overrides))
    # Imported before the run log opens: importing Prefect sets up its console handler, which the
    # run log then filters (a handler of ours on the root logger first would make Prefect skip it).
    from flows.mft_pipeline import mft_pipeline

    with run_log(cfg.runs_root):
        # Checked before paying for Prefect's start-up, so a missing toolchain, model or disk comes
        # back at once (the flow checks again: deployments start there).
        preflight(cfg, _stage_list(args.stages) or STAGE_ORDER, _stage_list(args.force) or [])
        outputs = mft_pipeline(
            config=args.config,
            stages=_stage_list(args.stages),
            force=_stage_list(args.force),
            overrides=_overrides(args.overrides),
        )
    if args.json:
        print(json.dumps(outputs, indent=1))
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from mft_core.experiment import load_experiment

    experiment = load_experiment(args.config, _overrides(args.overrides))  # a bad arm fails here, in seconds
    from flows.mft_experiment import mft_experiment  # before the run log opens (see cmd_run)

    with run_log(experiment.base.runs_root):
        mft_experiment(config=args.config, overrides=_overrides(args.overrides))
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    from mft_core.report import pipeline_summary
    from mft_core.stages import run_stage

    from mft_core.preflight import preflight

    cfg = load_config(args.config, _overrides(args.overrides))
    with run_log(cfg.runs_root):
        preflight(cfg, [args.stage], [args.stage] if args.force else [])
        run = run_stage(cfg, args.stage, force=args.force)
        print(pipeline_summary({args.stage: run.directory}))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from mft_core.status import format_status, pipeline_status

    cfg = load_config(args.config, _overrides(args.overrides))
    statuses = pipeline_status(cfg)
    if args.json:
        print(json.dumps({"config": args.config, "runs_root": str(cfg.runs_root),
                          "stages": [s.to_json() for s in statuses]}, indent=1))
    else:
        print(format_status(statuses, args.config, cfg.runs_root), end="")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from mft_core.gc import delete, format_plan, partial_of, plan_gc

    plan = plan_gc(Path.cwd(), args.config)
    if args.delete and plan.unloadable:
        print(format_plan(plan, deleted=False), end="")
        print("mft: error: not deleting anything while a config does not load (its outputs are unknown)", file=sys.stderr)
        return 2
    if args.delete:
        _freed, skipped = delete(plan)
        plan.garbage = [g for g in plan.garbage if g not in skipped]
        plan.in_use += [partial_of(g.output) for g in skipped]
    print(format_plan(plan, deleted=args.delete), end="")
    return 0


def cmd_data_demo(args: argparse.Namespace) -> int:
    from mft_core.data.demo import build_demo_data

    stats = build_demo_data(Path(args.out), per_task=args.per_task, seed=args.seed)
    counts = ", ".join(f"{name} {task['records']}" for name, task in stats["tasks"].items())
    removed = sum(task["contaminated"] for task in (*stats["tasks"].values(), *stats["preference"].values()))
    pairs = ", ".join(f"{name} {task['pairs']} pairs" for name, task in stats["preference"].items())
    print(f"demo data in {args.out}: {counts} records, {pairs} ({removed} removed as contaminated; "
          "details in demo_stats.json)")
    return 0


def cmd_data_humaneval_x(args: argparse.Namespace) -> int:
    from mft_core.benchmark import fetch_humaneval_x

    benchmark = fetch_humaneval_x()
    print(f"{benchmark.describe()}; every language matches the released problems. The pipeline uses it "
          f"when no humaneval_dir or $MFT_HUMANEVAL_X_DIR is set.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from mft_core.stages import STAGE_ORDER

    parser = argparse.ArgumentParser(prog="mft", description="Multi-task fine-tuning pipeline for code LLMs")
    sub = parser.add_subparsers(dest="command", required=True)

    config = sub.add_parser("config", help="inspect the config").add_subparsers(dest="action", required=True)
    show = config.add_parser("show", help="print the resolved config (paths absolute, defaults filled in)")
    _add_config_args(show)
    show.set_defaults(func=cmd_config_show)
    reference = config.add_parser("reference", help="every config key with its default and effect (markdown)")
    reference.set_defaults(func=cmd_config_reference)

    run = sub.add_parser("run", help="run the mft-pipeline flow in-process")
    _add_config_args(run)
    run.add_argument("--stages", help=f"comma-separated subset of {','.join(STAGE_ORDER)} (default: all)")
    run.add_argument("--force", help="comma-separated stages to recompute even if cached")
    run.add_argument("--json", action="store_true", help="print the output directories as JSON")
    run.set_defaults(func=cmd_run)

    experiment = sub.add_parser("experiment", help="run the mft-experiment flow in-process: arms of a base config "
                                "compared per task (experiments/paper.yaml: MFT vs mixed and single-task SFT)")
    experiment.add_argument("--config", default="experiments/paper.yaml", help="the experiment config")
    experiment.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                            help="override an experiment config key (repeatable), e.g. --set steps=8 --set seeds=[1]")
    experiment.set_defaults(func=cmd_experiment)

    for name in STAGE_ORDER:
        stage = sub.add_parser(name, help=f"run the {name} stage alone, without Prefect")
        _add_config_args(stage)
        stage.add_argument("--force", action="store_true", help="recompute even if the output exists")
        stage.set_defaults(func=cmd_stage, stage=name)

    status = sub.add_parser("status", help="each stage's key for the config and the state of its output")
    _add_config_args(status)
    status.add_argument("--json", action="store_true", help="print it as JSON")
    status.set_defaults(func=cmd_status)
    gc = sub.add_parser("gc", help="list (dry run) or --delete the stage outputs no config or deployment refers to")
    gc.add_argument("--config", help="a config to keep besides pipeline.yaml, configs/*.yaml and prefect.yaml's deployments")
    gc.add_argument("--delete", action="store_true", help="remove them (default: only list them)")
    gc.set_defaults(func=cmd_gc)

    data = sub.add_parser("data", help="data utilities").add_subparsers(dest="action", required=True)
    demo = data.add_parser("demo", help="mine the demo tasks from the Python standard library")
    demo.add_argument("--out", required=True, help="output directory (one sub-directory per task)")
    demo.add_argument("--per-task", type=int, default=3000, help="at most this many records per task (default 3000; the stdlib gives about 1,570 each)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_data_demo)
    fetch = data.add_parser("humaneval-x", help="download HumanEval-X (all five languages, pinned revision, "
                                                "checked) into the Hugging Face cache")
    fetch.set_defaults(func=cmd_data_humaneval_x)

    from mft_core.eval.commands import add_eval_commands

    add_eval_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # 2-core machines are shared: oversubscribed OpenMP threads make runs several times slower.
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    args = build_parser().parse_args(argv)
    loggers = [logging.getLogger(name) for name in ("mft", "mft_core")]
    handler = None
    if args.func not in (cmd_run, cmd_stage):  # a pipeline run sets up its console and run log itself
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        for logger in loggers:
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, PreflightError) as err:
        print(f"mft: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - a clean message, the traceback only with MFT_DEBUG
        if os.environ.get("MFT_DEBUG"):
            raise
        print(f"mft: error: {type(err).__name__}: {err}\n(set MFT_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    finally:  # called in-process (tests, other tools): leave no handler on a stream that may close
        if handler is not None:
            for logger in loggers:
                logger.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
