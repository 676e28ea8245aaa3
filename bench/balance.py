"""What task balancing buys: the same model on deliberately unbalanced demo tasks, trained with
case1 (token mean: the big task dominates), case3 (task-level mean), focal_task and coba, with
the same steps, seeds and data. Reported per task: validation loss before and after, the relative
reduction, and the spread between the best and worst task; a plot and a markdown report.

    .venv/bin/python bench/balance.py [--steps 24] [--seq-length 512] [--modes case1,case3,focal_task,coba]

Runs on CPU with SmolLM2-135M in a small budget (about 4 runs x steps x a few seconds); on a GPU
raise --steps and --sizes. The numbers are whatever they are: read them with the run's noise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

# The project root replaces this folder on sys.path (bench/tokenize.py would shadow the stdlib).
sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import REPO, RESULTS, ensure_demo_data, save, table  # noqa: E402

TASKS = ("text-to-code", "code-completion", "docstring-generation")


def unbalanced_data(demo: Path, out: Path, sizes: dict[str, int]) -> None:
    """The first N records of each demo task: one task ~10x another."""
    for task, n in sizes.items():
        lines = (demo / task / "data.jsonl").read_text().splitlines()[:n]
        (out / task).mkdir(parents=True, exist_ok=True)
        (out / task / "data.jsonl").write_text("\n".join(lines) + "\n")


def valid_losses(model_dir: Path, tokenize_dir: Path, adapter: Path | None = None) -> dict[str, float]:
    """Per-task token-mean validation loss of a model (base, or base + adapter)."""
    import torch

    from mft_core.config import TrainConfig
    from mft_core.train.data import TokenizedSplit, collate, validation_plan
    from mft_core.train.losses import per_task_loss_sums, trained_values
    from mft_core.train.model import TokenLossModel, load_model

    template = json.loads((tokenize_dir / "template.json").read_text())
    split = TokenizedSplit(tokenize_dir, "valid")
    model = load_model(model_dir, TrainConfig(method="full"), "fp32", "sdpa_varlen", on_gpu=False)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    wrapper = TokenLossModel(model).eval()
    k = split.num_tasks
    sums, counts = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    with torch.no_grad():
        for rows in validation_plan(split, template["seq_length"], 1, 1)[0]:
            batch = collate(split, rows, template["seq_length"], template["pad_id"])
            out = wrapper(batch["input_ids"], batch["position_ids"], batch["labels"])
            s, c = per_task_loss_sums(out.token_loss.double(), trained_values(batch["task_ids"], batch["labels"]), k)
            sums += s
            counts += c
    return {name: (sums[i] / counts[i]).item() for i, name in enumerate(split.task_names) if counts[i] > 0}


def plot(results: dict, before: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(results)
    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        reductions = [results[mode]["reduction"][t] * 100 for t in TASKS]
        ax.bar([x + i * width for x in range(len(TASKS))], reductions, width, label=mode)
    ax.set_xticks([x + width * (len(modes) - 1) / 2 for x in range(len(TASKS))])
    ax.set_xticklabels([f"{t}\n(n={before['sizes'][t]})" for t in TASKS], fontsize=8)
    ax.set_ylabel("validation loss reduction (%)")
    ax.set_title("per-task gain by loss mode (unbalanced tasks)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--modes", default="case1,case3,focal_task,coba")
    parser.add_argument("--sizes", default="1500,150,600", help="records of text-to-code,code-completion,docstring-generation")
    args = parser.parse_args()

    from mft_core.config import load_config
    from mft_core.modeling import resolve_model
    from mft_core.stages import run_stage

    demo = ensure_demo_data(REPO / "demo-data")
    work = Path(tempfile.mkdtemp(prefix="bench-balance-"))
    sizes = dict(zip(TASKS, (int(n) for n in args.sizes.split(","))))
    unbalanced_data(demo, work / "data", sizes)
    base = {
        "runs_root": str(work / "runs"),
        "model.path": str(resolve_model("smollm2-135m-instruct", REPO / "runs")),
        "data.tasks": [{"name": t, "path": str(work / "data" / t)} for t in TASKS],
        "tokenize.seq_length": args.seq_length,
        "ingest.min_valid": 24, "ingest.valid_fraction": 0.05,
        "train.max_steps": args.steps, "train.warmup_steps": 2, "train.grad_accum": 2,
        "train.eval_every": args.steps, "train.checkpoint_every": args.steps, "train.seed": 7,
        "train.coba.warmup_steps": max(2, args.steps // 4), "train.coba.valid_batches": 2,
    }
    cfg = load_config(REPO / "pipeline.yaml", base)
    tokenize_dir = run_stage(cfg, "tokenize", upstream_dir=run_stage(cfg, "ingest").directory).directory
    before = valid_losses(Path(base["model.path"]), tokenize_dir)
    results = {}
    for mode in args.modes.split(","):
        out = run_stage(load_config(REPO / "pipeline.yaml", {**base, "train.loss": mode}), "train").directory
        after = json.loads((out / "train_summary.json").read_text())["final_valid_task_loss"]
        reduction = {t: (before[t] - after[t]) / before[t] for t in TASKS}
        results[mode] = {"valid_loss": after, "reduction": reduction,
                         "spread": max(reduction.values()) - min(reduction.values()),
                         "mean_reduction": sum(reduction.values()) / len(TASKS)}
        print(f"{mode}: {json.dumps(results[mode]['reduction'])}", flush=True)

    rows = [[mode, *(f"{r['valid_loss'][t]:.4f} ({r['reduction'][t]:+.1%})" for t in TASKS), f"{r['mean_reduction']:+.1%}", f"{r['spread']:.1%}"]
            for mode, r in results.items()]
    headers = ["loss", *(f"{t} (n={sizes[t]})" for t in TASKS), "mean gain", "spread"]
    print("\nbase model validation loss: " + ", ".join(f"{t} {before[t]:.4f}" for t in TASKS))
    print(table(headers, rows))
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(results, {"sizes": sizes}, RESULTS / "balance.png")
    report = ["# Task balancing on unbalanced demo tasks\n",
              f"SmolLM2-135M-Instruct, LoRA, {args.steps} optimizer steps of 2 x {args.seq_length} tokens, seed 7. "
              f"Validation loss per task after training (relative reduction from the base model's).\n",
              "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    report += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    report.append("\nBase model: " + ", ".join(f"{t} {before[t]:.4f}" for t in TASKS) + "\n\n![per-task gain](balance.png)\n")
    (RESULTS / "balance.md").write_text("\n".join(report))
    print(f"written {save('balance', {'sizes': sizes, 'steps': args.steps, 'before': before, 'results': results})}, "
          f"{RESULTS / 'balance.md'}, {RESULTS / 'balance.png'}")


if __name__ == "__main__":
    main()
