"""What multi-task fine-tuning buys, on deliberately unbalanced demo tasks, through the
mft-experiment flow (mft_core/experiment.py): this script only prepares the data and the
experiment config, runs the flow in-process and copies its table, plot and JSON to bench/results/.

    .venv/bin/python bench/balance.py --preset paper [--seeds 7,8] [--steps 16] [--single-task-budget per_model]
        MFT (case3) vs mixed SFT vs one single-task SFT per task (the MFTCoder paper's comparison)
    .venv/bin/python bench/balance.py --modes case1,case3,focal_task,coba [--seeds 7] [--steps 12]
        the task-balancing losses against each other, one arm per loss

SmolLM2-135M on CPU, LoRA, steps x 2 x seq_length tokens per arm and seed; the demo tasks cut to
--sizes records (one task 10x another). Results: bench/results/<name>.md, .png, .json. Every arm is
an ordinary cached pipeline run under bench/results/balance-runs/, so a rerun with more seeds
trains only the new ones. The numbers are whatever they are: read them with the seeds' spread.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import yaml

# The project root replaces this folder on sys.path (bench/tokenize.py would shadow the stdlib).
sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import REPO, RESULTS, ensure_demo_data  # noqa: E402

TASKS = ("text-to-code", "code-completion", "docstring-generation")


def unbalanced_data(demo: Path, out: Path, sizes: dict[str, int]) -> None:
    """The first N records of each demo task: one task ~10x another."""
    for task, n in sizes.items():
        lines = (demo / task / "data.jsonl").read_text().splitlines()[:n]
        (out / task).mkdir(parents=True, exist_ok=True)
        (out / task / "data.jsonl").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", choices=["paper"], help="the paper's arms (default: one arm per --modes loss)")
    parser.add_argument("--single-task-budget", choices=["split", "per_model"], default="split",
                        help="--preset paper: the single-task models share the arm's steps, or each trains all of them")
    parser.add_argument("--modes", default="case1,case3,focal_task,coba", help="losses, one arm each (without --preset)")
    parser.add_argument("--seeds", default="7", help="comma-separated seeds; every arm runs once per seed")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps of every arm")
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--sizes", default="1500,150,600", help="records of text-to-code,code-completion,docstring-generation")
    args = parser.parse_args()

    from mft_core.modeling import resolve_model

    demo = ensure_demo_data(REPO / "demo-data")
    work = RESULTS / "balance-runs"
    sizes = dict(zip(TASKS, (int(n) for n in args.sizes.split(","))))
    unbalanced_data(demo, work / "data", sizes)
    base = {
        "runs_root": "runs",
        "model": {"path": str(resolve_model("smollm2-135m-instruct", REPO / "runs"))},
        "data": {"tasks": [{"name": t, "path": f"data/{t}"} for t in TASKS]},
        "ingest": {"decontaminate": {"enabled": False}, "min_valid": 24, "valid_fraction": 0.05},
        "tokenize": {"seq_length": args.seq_length},
        "train": {"warmup_steps": 2, "grad_accum": 2, "eval_every": args.steps, "checkpoint_every": args.steps,
                  "coba": {"warmup_steps": max(2, args.steps // 4), "valid_batches": 2}},
    }
    (work / "pipeline.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    name = ("paper" + ("-per-model" if args.single_task_budget == "per_model" else "")) if args.preset else "balance"
    experiment = {"base": "pipeline.yaml", "name": name, "steps": args.steps,
                  "seeds": [int(s) for s in args.seeds.split(",")], "stages": ["ingest", "tokenize", "train"]}
    if args.preset:
        experiment["preset"] = args.preset
        experiment["single_task_budget"] = args.single_task_budget
    else:
        experiment["arms"] = [{"name": mode, "overrides": {"train.loss": mode}} for mode in args.modes.split(",")]
    config = work / f"{name}.yaml"
    config.write_text(yaml.safe_dump(experiment, sort_keys=False))

    from flows.mft_experiment import mft_experiment

    report = Path(mft_experiment(config=str(config)))
    RESULTS.mkdir(parents=True, exist_ok=True)
    for suffix in ("md", "png", "json"):
        shutil.copy(report.parent / f"experiment.{suffix}", RESULTS / f"{name}.{suffix}")
    # the markdown names its plot experiment.png; the copy is <name>.png
    text = (RESULTS / f"{name}.md").read_text().replace("(experiment.png)", f"({name}.png)")
    (RESULTS / f"{name}.md").write_text(text)
    print(f"written {RESULTS / f'{name}.md'}, {RESULTS / f'{name}.png'}, {RESULTS / f'{name}.json'}; report {report}")


if __name__ == "__main__":
    main()
