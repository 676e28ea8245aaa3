"""Plain-text summaries of stage outputs, printed at the end of a run (`make demo`)."""

from __future__ import annotations

import json
from pathlib import Path


def _table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [headers, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def ingest_summary(directory: Path) -> str:
    stats = json.loads((directory / "stats.json").read_text())
    headers = ["task", "lines", "rejected", "duplicates", "contaminated", "train", "valid"]
    rows = [[name, *(s[h] for h in headers[1:])] for name, s in stats["tasks"].items()]
    totals = stats["totals"]
    rows.append(["(all)", totals["lines"], totals["rejected"], totals["duplicates"], totals["contaminated"], totals["train"], totals["valid"]])
    return f"ingest ({directory}; decontamination {stats['decontamination']})\n" + _table(headers, rows)


def tokenize_summary(directory: Path) -> str:
    stats = json.loads((directory / "stats.json").read_text())
    headers = ["task", "split", "samples", "tokens", "trained", "truncated", "dropped"]
    rows = [
        [task, split, s["samples"], s["tokens"], s["trained_tokens"], s["truncated"], s["dropped"]]
        for task, splits in stats["tasks"].items()
        for split, s in splits.items()
    ]
    return f"tokenize ({directory}; seq_length {stats['seq_length']}, {stats['shards']} shards)\n" + _table(headers, rows)


def _train_speed(steps: list[dict]) -> float:
    """Tokens/s over the steps after the first (the first carries start-up costs)."""
    timed = steps[1:] or steps
    seconds = sum(m.get("step_seconds", 0) for m in timed)
    return sum(m.get("tokens", 0) for m in timed) / seconds if seconds else 0.0


def train_summary(directory: Path) -> str:
    summary = json.loads((directory / "train_summary.json").read_text())
    metrics = [json.loads(l) for l in (directory / "metrics.jsonl").read_text().splitlines() if l.strip()]
    steps = [m for m in metrics if "loss" in m]
    first, last = (steps[0], steps[-1]) if steps else ({}, {})
    valid = summary.get("final_valid_task_loss") or {}
    headers = ["task", "first train loss", "last train loss", "final valid loss"]
    rows = [[t, _fmt(first.get("task_loss", {}).get(t)), _fmt(last.get("task_loss", {}).get(t)), _fmt(valid.get(t))]
            for t in summary["tasks"]]
    speed = _train_speed(steps)
    head = (f"train ({directory}; {summary['steps']} steps, {summary['trained_tokens']} trained tokens, "
            f"~{speed:.0f} tokens/s, best weighted valid loss {_fmt(summary.get('best_valid_loss'))})")
    return head + "\n" + _table(headers, rows)


def align_summary(directory: Path) -> str:
    summary = json.loads((directory / "train_summary.json").read_text())
    before, after = summary.get("valid_before") or {}, summary.get("valid_after") or {}
    headers = ["task", "accuracy before", "after", "log-prob margin before", "after", "reward accuracy after",
               "reward margin after", "pair loss before", "after"]
    value = lambda side, row, t: _fmt(side.get(row, {}).get(t))
    rows = [[t, value(before, "logp_accuracy", t), value(after, "logp_accuracy", t), value(before, "logp_margin", t),
             value(after, "logp_margin", t), value(after, "accuracy", t), value(after, "reward_margin", t),
             value(before, "loss", t), value(after, "loss", t)] for t in summary["preference_tasks"]]
    head = (f"align ({directory}; {summary['method']}, β {summary['beta']:g}, {summary['steps']} steps; on the "
            "validation pairs: accuracy = chosen has the higher mean token log-prob, log-prob margin = by how much; "
            "reward = β (log-prob - the reference's))")
    text = head + "\n" + _table(headers, rows)
    sft_before, sft_after = summary.get("sft_valid_loss_before") or {}, summary.get("sft_valid_loss_after") or {}
    if sft_before:
        text += "\n\nfine-tuning tasks (validation loss of the fine-tuned model, then of the aligned one)\n" + _table(
            ["task", "valid loss before", "after"], [[t, _fmt(v), _fmt(sft_after.get(t))] for t, v in sft_before.items()])
    return text


def merge_summary(directory: Path) -> str:
    report = json.loads((directory / "merge_report.json").read_text())
    check = report["check"]
    effect = check["finetune_effect"]
    headers = ["logits vs", "max |diff|", "mean |diff|", "argmax agreement"]
    rows = [
        [check["reference"], f"{check['max_abs_diff']:.3g}", f"{check['mean_abs_diff']:.3g}", f"{check['argmax_agreement']:.2%}"],
        ["the base (fine-tune effect)", f"{effect['max_abs_diff']:.3g}", f"{effect['mean_abs_diff']:.3g}", f"{1 - effect['argmax_changed']:.2%}"],
    ]
    head = (f"merge ({directory / report['model_dir']}; {report['method']}, {report['dtype']}, "
            f"{report['weight_shards']} shard(s), {report['weight_bytes'] / 1e6:.1f} MB; check on {check['samples']} "
            f"{check['split']} samples: {'passed' if check['passed'] else 'FAILED'}, tolerance {check['tolerance']:.3g})")
    return head + "\n" + _table(headers, rows)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def evaluate_summary(directory: Path) -> str:
    from mft_core.eval.stage import evaluate_summary as summary_of_evaluation

    return summary_of_evaluation(directory)


# ----------------------------------------------------------------------------- one line per stage
# What the console shows when a stage is done (`[train] done in 4m12s: <the line>`).


def ingest_line(directory: Path) -> str:
    t = json.loads((directory / "stats.json").read_text())["totals"]
    return (f"{t['train']} train + {t['valid']} valid records from {t['lines']} lines "
            f"({t['rejected']} rejected, {t['duplicates']} duplicates, {t['contaminated']} contaminated)")


def tokenize_line(directory: Path) -> str:
    stats = json.loads((directory / "stats.json").read_text())
    splits = [s for task in stats["tasks"].values() for s in task.values()]
    tokens, trained = sum(s["tokens"] for s in splits), sum(s["trained_tokens"] for s in splits)
    return (f"{sum(s['samples'] for s in splits)} samples, {tokens} tokens ({trained} trained) "
            f"in {stats['shards']} shards, seq_length {stats['seq_length']}")


def train_line(directory: Path) -> str:
    summary = json.loads((directory / "train_summary.json").read_text())
    metrics = [json.loads(l) for l in (directory / "metrics.jsonl").read_text().splitlines() if l.strip()]
    steps = [m for m in metrics if "loss" in m]
    parts = [f"{summary['steps']} steps"]
    if steps:
        parts.append(f"loss {steps[0]['loss']:.3g} → {steps[-1]['loss']:.3g}")
        parts.append(f"{_train_speed(steps):.0f} tokens/s")
    if summary.get("best_valid_loss") is not None:
        parts.append(f"best valid loss {summary['best_valid_loss']:.3g} (step {summary['best_step']})")
    if summary.get("early_stopped"):
        parts.append("stopped early")
    return ", ".join(parts)


def align_line(directory: Path) -> str:
    summary = json.loads((directory / "train_summary.json").read_text())
    parts = [f"{summary['method']}, {summary['steps']} steps"]
    before, after = summary.get("valid_before"), summary.get("valid_after")
    if before and after:
        mean = lambda values: sum(values.values()) / max(len(values), 1)
        parts.append(f"valid preference accuracy {mean(before['logp_accuracy']):.0%} → {mean(after['logp_accuracy']):.0%}")
        parts.append(f"reward margin {mean(after['reward_margin']):.3g}")
    return ", ".join(parts)


def merge_line(directory: Path) -> str:
    report = json.loads((directory / "merge_report.json").read_text())
    check = report["check"]
    return (f"{report['method']} model saved ({report['dtype']}, {report['weight_bytes'] / 1e6:.0f} MB); "
            f"check {'passed' if check['passed'] else 'FAILED'}: max |logit diff| {check['max_abs_diff']:.2g} "
            f"(tolerance {check['tolerance']:.2g})")


def evaluate_line(directory: Path) -> str:
    summary = json.loads((directory / "summary.json").read_text())
    k = summary["ks"][0]
    scores = []
    for model in summary["models"].values():
        value = model["pass_at_k"]["average"].get(f"pass@{k}")
        scores.append(f"{model['label']} pass@{k} " + ("-" if value is None else f"{100 * value:.1f}%"))
    return ", ".join(scores) + f" (average over {', '.join(summary['languages'])})"


RESULT_LINES = {"ingest": ingest_line, "tokenize": tokenize_line, "train": train_line, "align": align_line,
                "merge": merge_line, "evaluate": evaluate_line}


SUMMARIES = {"ingest": ingest_summary, "tokenize": tokenize_summary, "train": train_summary, "align": align_summary,
             "merge": merge_summary, "evaluate": evaluate_summary}


def pipeline_summary(outputs: dict[str, Path]) -> str:
    parts = ["", "=== mft-pipeline results ==="]
    for name, directory in outputs.items():
        summarize = SUMMARIES.get(name)
        parts.append(summarize(directory) if summarize else f"{name}: {directory}")
        parts.append("")
    return "\n".join(parts)
