"""report.html: one self-contained page per pipeline run (inline CSS and PNG plots, no script, no
network), written under the runs root and named by the last stage's key:

    <runs_root>/reports/<stage>-<key16>.html

A fully cached rerun writes it again (then every stage says "reused"). What it shows: the config
and the stage keys, what this run computed and what it reused, ingest's rejects by reason, token
and packing statistics, per-task train and validation loss curves, CoBa's weights over time,
throughput and memory, the merge check, pass@k per language base vs fine-tuned, a few generated
samples per language with their verdicts (escaped: generated code is untrusted text), and the
provenance (project commit, library versions, hardware). Plots are drawn with matplotlib.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import platform
import subprocess
from collections.abc import Iterable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from mft_core.config import PipelineConfig, config_to_yaml
from mft_core.store import write_text_atomic

REPORTS_DIR = "reports"
LIBRARIES = ("torch", "transformers", "peft", "accelerate", "deepspeed", "prefect", "pyarrow")
SAMPLES_PER_LANGUAGE = 2

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .6em 0; } td, th { border: 1px solid #ccc; padding: .25em .6em; }
th { background: #f3f3f3; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.computed { color: #0a6b0a; font-weight: 600; } .reused { color: #555; }
pre { background: #f7f7f7; border: 1px solid #ddd; padding: .6em; overflow-x: auto; max-height: 24em; }
.passed { color: #0a6b0a; } .failed, .compile_error, .timeout { color: #a00; }
img.plot { max-width: 100%; border: 1px solid #eee; }
"""


def report_path(cfg: PipelineConfig, outputs: dict[str, Path]) -> Path:
    last = list(outputs)[-1]
    return cfg.runs_root / REPORTS_DIR / f"{last}-{Path(outputs[last]).name[:16]}.html"


def write_report(cfg: PipelineConfig, outputs: dict[str, Path], run_started: datetime) -> Path:
    """Write the run's report.html; `outputs`: stage -> its output directory, in stage order;
    an output built after `run_started` counts as computed by this run, else as reused."""
    outputs = {stage: Path(directory) for stage, directory in outputs.items()}
    sections = [_overview(cfg, outputs, run_started)]
    for stage, render in (("ingest", _ingest), ("tokenize", _tokenize), ("train", _train), ("align", _align),
                          ("merge", _merge), ("evaluate", _evaluate)):
        if stage in outputs:
            sections.append(render(outputs[stage]))
    sections.append(_provenance(cfg))
    path = report_path(cfg, outputs)
    _write_page(path, "mft-pipeline run report", sections)
    return path


def write_experiment_report(path: Path, cfg: PipelineConfig, summary: dict[str, Any], plot_png: Path,
                            results: list[dict[str, Any]]) -> Path:
    """The experiment's report.html: the arms x tasks table (best per task in bold), the verdict,
    the plot, every arm run with a link to its own run report, and the provenance."""
    tasks = summary["tasks"]
    base = summary["base_valid_loss"]
    rows = [["base model", *(_fmt(base.get(t)) for t in tasks), "", "", "", ""]]
    for name, row in summary["rows"].items():
        cells = []
        for task in tasks:
            cell = row["tasks"][task]
            text = "-" if cell is None else cell["text"]
            cells.append(f"<b>{_e(text)}</b>" if summary["best_per_task"][task] == name else _e(text))
        rows.append([_e(name), *cells, _e(signed_percent(row["mean_gain"])), _e(signed_percent(row["task_spread"])),
                     row["trained_tokens"], f"{row['train_seconds']:.0f}"])
    runs = []
    for result in results:
        report = cfg.runs_root / REPORTS_DIR / f"train-{Path(result['train_dir']).name[:16]}.html"
        link = f'<a href="{_e(report.as_uri())}">run report</a>' if report.is_file() else "-"
        runs.append([_e(result["arm"]), result["seed"], result["steps"], result["trained_tokens"],
                     f"<code>{_e(result['train_dir'])}</code>", link])
    languages = summary["pass_languages"]
    passes = [[name, k, *(_pct(values.get(lang)) for lang in languages)]
              for name, by_k in summary["pass_at_k"].items() for k, values in by_k.items()]
    image = base64.b64encode(plot_png.read_bytes()).decode()
    sections = [
        f"<p><b>Reading:</b> {_e(summary['verdict'])}.</p>",
        "<h2 id=\"table\">Validation loss per task (gain over the base model)</h2>",
        _table(["arm", *tasks, "mean gain", "task spread", "trained tokens", "train s"], rows, escape=False),
        f'<img class="plot" alt="validation loss per task and arm" src="data:image/png;base64,{image}">',
        *(["<h2 id=\"pass\">HumanEval-X pass@k of each fine-tuned model</h2>",
            _table(["arm", "k", *languages], passes)] if passes else []),
        "<h2 id=\"runs\">Arm runs</h2>",
        _table(["arm", "seed", "steps", "trained tokens", "train output", ""], runs, escape=False),
        _provenance(cfg),
    ]
    _write_page(path, f"mft-pipeline experiment {summary['name']}", sections)
    return path


def _write_page(path: Path, title: str, sections: list[str]) -> None:
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}"
            f"</title><style>{CSS}</style></head><body>\n<h1>{_e(title)}</h1>\n"
            + "\n".join(sections) + "\n</body></html>\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, page)


# ----------------------------------------------------------------------------- sections


def _overview(cfg: PipelineConfig, outputs: dict[str, Path], run_started: datetime) -> str:
    rows = []
    for stage, directory in outputs.items():
        built = _built(directory)
        computed = built is not None and built >= run_started
        state = '<span class="computed">computed</span>' if computed else '<span class="reused">reused</span>'
        rows.append([stage, state, f"<code>{_e(directory.name[:16])}</code>", _e(built.isoformat() if built else "-"),
                     f"<code>{_e(str(directory))}</code>"])
    return ("<h2 id=\"run\">This run</h2>\n"
            f"<p>Config <code>{_e(cfg.source)}</code>, report written {_e(_now())}.</p>\n"
            + _table(["stage", "this run", "key", "built (UTC)", "output"], rows, escape=False)
            + f"<details><summary>resolved config</summary><pre>{_e(config_to_yaml(cfg))}</pre></details>")


def _ingest(directory: Path) -> str:
    stats = _json(directory / "stats.json")
    reasons = sorted({reason for task in stats["tasks"].values() for reason in task["rejected_by_reason"]})
    headers = ["task", "lines", "kept", "train", "valid", "duplicates", "contaminated", *reasons]
    rows = [[name, task["lines"], task["kept"], task["train"], task["valid"], task["duplicates"], task["contaminated"],
             *(task["rejected_by_reason"].get(reason, 0) for reason in reasons)] for name, task in stats["tasks"].items()]
    return ("<h2 id=\"ingest\">Ingest: records and rejects by reason</h2>\n"
            f"<p>Decontamination {_e(stats.get('decontamination', '-'))}; rejects are listed in "
            f"<code>{_e(str(directory / 'rejects.jsonl'))}</code>.</p>\n" + _table(headers, rows))


def _tokenize(directory: Path) -> str:
    stats = _json(directory / "stats.json")
    rows = [[task, split, s["samples"], s["tokens"], s["trained_tokens"], s["truncated"], s["dropped"]]
            for task, splits in stats["tasks"].items() for split, s in splits.items()]
    return ("<h2 id=\"tokenize\">Tokens</h2>\n"
            f"<p>seq_length {_e(stats.get('seq_length'))}, {_e(stats.get('shards'))} shards.</p>\n"
            + _table(["task", "split", "samples", "tokens", "trained tokens", "truncated", "dropped"], rows))


def _train(directory: Path) -> str:
    summary = _json(directory / "train_summary.json")
    hyper = _json(directory / "hyperparameters.json") if (directory / "hyperparameters.json").is_file() else {}
    metrics = _jsonl(directory / "metrics.jsonl")
    steps = [m for m in metrics if "loss" in m]
    valids = [m for m in metrics if "valid_task_loss" in m]
    parts = ["<h2 id=\"train\">Training</h2>",
             f"<p>{_e(summary['steps'])} steps, {_e(summary['trained_tokens'])} trained tokens, precision "
             f"{_e(hyper.get('precision', '-'))}, attention {_e(hyper.get('attention', '-'))}, "
             f"{_e(hyper.get('world_size', 1))} process(es); best weighted validation loss "
             f"{_fmt(summary.get('best_valid_loss'))} at step {_e(summary.get('best_step'))}"
             f"{' (stopped early)' if summary.get('early_stopped') else ''}.</p>"]
    tasks = summary["tasks"]
    parts.append(_plot("Per-task loss", "optimizer step", "loss", [
        *[(f"{task} (train)", [(m["step"], m["task_loss"][task]) for m in steps if task in m.get("task_loss", {})], "-")
          for task in tasks],
        *[(f"{task} (valid)", [(m["step"], m["valid_task_loss"][task]) for m in valids
                               if task in m["valid_task_loss"]], "o--") for task in tasks]]))
    weighted = [m for m in steps if "task_weight" in m]
    if weighted:
        parts.append(_plot("CoBa task weights", "optimizer step", "weight", [
            (task, [(m["step"], m["task_weight"][task]) for m in weighted], "-") for task in tasks]))
    parts.append(_plot("Throughput and memory", "optimizer step", "tokens/s", [
        ("tokens/s", [(m["step"], m["tokens_per_s"]) for m in steps if "tokens_per_s" in m], "-")],
        second=("peak RSS (MB)", [(m["step"], m["peak_rss_mb"]) for m in steps if "peak_rss_mb" in m])))
    final = summary.get("final_valid_task_loss") or {}
    parts.append(_table(["task", "final validation loss"], [[task, _fmt(final.get(task))] for task in tasks]))
    return "\n".join(parts)


def _align(directory: Path) -> str:
    summary = _json(directory / "train_summary.json")
    hyper = _json(directory / "hyperparameters.json")
    valids = [m for m in _jsonl(directory / "metrics.jsonl") if "valid_task_accuracy" in m]
    tasks = summary["preference_tasks"]
    before, after = summary.get("valid_before") or {}, summary.get("valid_after") or {}
    parts = ["<h2 id=\"align\">Preference alignment</h2>",
             f"<p>{_e(summary['method'].upper())}, β {_e(summary['beta'])}, {_e(summary['steps'])} steps from the "
             f"fine-tuned model <code>{_e(hyper.get('sft_dir', '-'))}</code>; reference: {_e(hyper.get('reference', '-'))}; "
             f"precision {_e(hyper.get('precision', '-'))}.</p>",
             _table(["task", "accuracy before", "accuracy after", "reward accuracy after", "reward margin after",
                     "pair loss before", "pair loss after"],
                    [[t, _pct(before.get("logp_accuracy", {}).get(t)), _pct(after.get("logp_accuracy", {}).get(t)),
                      _pct(after.get("accuracy", {}).get(t)), _fmt(after.get("reward_margin", {}).get(t)),
                      _fmt(before.get("loss", {}).get(t)), _fmt(after.get("loss", {}).get(t))] for t in tasks]),
             "<p>Accuracy: the share of validation pairs whose chosen answer has the higher mean token log-prob; "
             "reward accuracy: whose chosen reward β(π − ρ) is the higher.</p>"]
    parts.append(_plot("Validation preference accuracy", "optimizer step", "accuracy", [
        (task, [(m["step"], m["valid_task_logp_accuracy"][task]) for m in valids if task in m["valid_task_logp_accuracy"]], "o-")
        for task in tasks]))
    sft_before, sft_after = summary.get("sft_valid_loss_before") or {}, summary.get("sft_valid_loss_after") or {}
    if sft_before:
        parts.append(_table(["fine-tuning task", "validation loss before align", "after"],
                            [[t, _fmt(v), _fmt(sft_after.get(t))] for t, v in sft_before.items()]))
    return "\n".join(parts)


def _merge(directory: Path) -> str:
    report = _json(directory / "merge_report.json")
    check = report["check"]
    effect = check.get("finetune_effect", {})
    rows = [[check.get("reference", "base + adapter"), _sci(check.get("max_abs_diff")), _sci(check.get("mean_abs_diff")),
             _pct(check.get("argmax_agreement"))],
            ["the base (fine-tune effect)", _sci(effect.get("max_abs_diff")), _sci(effect.get("mean_abs_diff")),
             _pct(1 - effect["argmax_changed"]) if "argmax_changed" in effect else "-"]]
    state = "passed" if check.get("passed") else "FAILED"
    return ("<h2 id=\"merge\">Merge check</h2>\n"
            f"<p>{_e(report.get('method'))} merged in {_e(report.get('dtype'))}: {state} within tolerance "
            f"{_sci(check.get('tolerance'))} on {_e(check.get('samples'))} {_e(check.get('split', ''))} samples.</p>\n"
            + _table(["logits vs", "max |diff|", "mean |diff|", "argmax agreement"], rows))


def _evaluate(directory: Path) -> str:
    from mft_core.eval.stage import eval_table_rows

    summary = _json(directory / "summary.json")
    rows = eval_table_rows(summary)
    parts = ["<h2 id=\"evaluate\">HumanEval-X: pass@k, base vs fine-tuned</h2>",
             f"<p>{_e(summary.get('benchmark_source', summary.get('benchmark', '')))}.</p>",
             _table(rows[0], rows[1:])]
    if summary.get("skipped_languages"):
        parts.append(f"<p>Not evaluated (no data here): {_e(', '.join(summary['skipped_languages']))}.</p>")
    parts.append(_samples(directory, summary))
    return "\n".join(parts)


def _samples(directory: Path, summary: dict[str, Any]) -> str:
    """A few generations per language with their verdicts; generated code is escaped."""
    results = {(r["model"], r["task_id"], r["sample_index"]): r for r in _jsonl(directory / "results.jsonl")}
    generations = list(_jsonl(directory / "generations.jsonl"))
    base_output = summary.get("models", {}).get("base", {}).get("evaluation_output")
    if base_output:  # the base model's generations live in its own shared output
        generations += _jsonl(directory.parents[1] / base_output / "generations.jsonl")
    shown: dict[tuple[str, str], int] = {}
    blocks = ["<h3>Samples</h3>"]
    for record in sorted(generations, key=lambda r: (r["language"], r["model"] != "finetuned", r["task_id"])):
        slot = (record["language"], record["model"])
        if shown.get(slot, 0) >= SAMPLES_PER_LANGUAGE:
            continue
        shown[slot] = shown.get(slot, 0) + 1
        verdict = results.get((record["model"], record["task_id"], record["sample_index"]), {}).get("verdict", "-")
        blocks.append(f"<details><summary>{_e(record['task_id'])} · {_e(record['model'])} · "
                      f"<span class=\"{_e(verdict)}\">{_e(verdict)}</span></summary>"
                      f"<pre>{_e(record.get('generation', ''))}</pre></details>")
    return "\n".join(blocks)


def _provenance(cfg: PipelineConfig) -> str:
    project = Path(__file__).resolve().parents[1]
    commit = _git(project, "rev-parse", "HEAD") or "unknown (not a git checkout)"
    dirty = _git(project, "status", "--porcelain")
    rows = [["project commit", commit + (" (with uncommitted changes)" if dirty else "")],
            ["python", platform.python_version()],
            *[[name, _version(name)] for name in LIBRARIES],
            ["machine", f"{platform.machine()}, {os.cpu_count()} cores, {_cpu_name()}"],
            ["GPU", _gpu()]]
    return "<h2 id=\"provenance\">Provenance</h2>\n" + _table(["", ""], rows)


# ----------------------------------------------------------------------------- pieces


def _plot(title: str, xlabel: str, ylabel: str, series: Iterable[tuple[str, list[tuple[float, float]], str]],
          second: tuple[str, list[tuple[float, float]]] | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 3.6), dpi=90)
    drawn = False
    for label, points, style in series:
        if points:
            axis.plot([x for x, _ in points], [y for _, y in points], style, label=label, markersize=4)
            drawn = True
    if second and second[1]:
        other = axis.twinx()
        other.plot([x for x, _ in second[1]], [y for _, y in second[1]], ":", color="grey", label=second[0])
        other.set_ylabel(second[0])
    axis.set_title(title)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    if drawn:
        axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    data = base64.b64encode(buffer.getvalue()).decode()
    return f'<img class="plot" alt="{_e(title)}" src="data:image/png;base64,{data}">'


def _table(headers: list[Any], rows: list[list[Any]], escape: bool = True) -> str:
    def cell(value: Any) -> str:
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        text = _e(value) if escape else str(value)
        return f'<td class="num">{text}</td>' if numeric else f"<td>{text}</td>"

    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def _sci(value: Any) -> str:
    return "-" if value is None else f"{value:.3g}"


def signed_percent(value: Any) -> str:
    """A relative change as +1.2%; "-" when unknown."""
    return "-" if value is None else f"{value:+.1%}"


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _built(directory: Path) -> datetime | None:
    success = directory / "_SUCCESS"
    if not success.is_file():
        return None
    return datetime.fromtimestamp(success.stat().st_mtime, tz=timezone.utc)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _git(project: Path, *args: str) -> str:
    try:
        done = subprocess.run(["git", "-C", str(project), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _gpu() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    except Exception:  # noqa: BLE001 - provenance must never fail a run
        pass
    return "none"
