"""The MFT-vs-SFT experiment: several trainings ("arms") of one base pipeline config, compared on
each task's validation loss (and HumanEval-X pass@k when the arms are evaluated).

An experiment config (YAML) names the base pipeline config and the arms, each a set of `--set`
style overrides on it:

    base: ../pipeline.yaml          # relative to this file
    preset: paper                   # MFT (case3), mixed SFT, one single-task SFT per task
    coba: false                     # paper preset: also an MFT arm with CoBa
    arms: []                        # more arms: [{name: ..., overrides: {train.loss: focal_task}}]
    seeds: [7, 8]                   # every arm once per seed (default: the base's train.seed)
    steps: 24                       # the token budget: optimizer steps of every arm
    stages: [ingest, tokenize, train]   # through evaluate for pass@k
    overrides: {}                   # applied to the base config in every arm

Every arm is an ordinary pipeline run, so the arms share the cached ingest and tokenize outputs
(train.tasks selects a single-task arm's task at train time) and a crashed experiment resumes arm
by arm. The token budget is equal by construction: every arm trains `steps` optimizer steps of
grad_accum x rows_per_micro_batch packed rows of seq_length tokens, with as many epochs as that
takes (a single-task model repeats its smaller data); with the paper preset the single-task models
share their arm's steps (steps // tasks each; single_task_budget: per_model gives each all of
them); the trained tokens are reported per arm.

This module never imports Prefect: flows/mft_experiment.py runs the arms as subflows of
mft-pipeline and hands their outputs to `summarize` and `write_results`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from mft_core.config import (
    ConfigError,
    PipelineConfig,
    _Strict,
    _format_validation_error,
    apply_overrides,
    config_to_yaml,
    load_config,
    read_yaml,
)
from mft_core.run_report import signed_percent, write_experiment_report
from mft_core.stages import STAGE_ORDER
from mft_core.store import write_text_atomic

log = logging.getLogger("mft.experiment")

EXPERIMENTS_DIR = "experiments"
# Enough epochs for any arm to reach its steps: training stops at max_steps, so the rest are never
# planned (a single-task arm of a task holding 1/10 of the data needs ~10x the epochs of MFT).
EPOCHS_CAP = 1000
SINGLE_TASK_ROW = "single-task SFT"


class ArmSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="The arm's name in tables and run names.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Dotted keys set on the base config.")


class ExperimentConfig(_Strict):
    base: Path = Field(description="The base pipeline config (relative to the experiment file).")
    name: str | None = Field(default=None, description="Default: the experiment file's name without .yaml.")
    preset: Literal["paper"] | None = Field(
        default=None, description="paper: MFT (case3), mixed SFT (case1, unit weights) and one single-task SFT per task.")
    coba: bool = Field(default=False, description="With preset paper: also an MFT arm with CoBa.")
    single_task_budget: Literal["split", "per_model"] = Field(
        default="split", description="With preset paper: split (the single-task models share the arm's steps, steps // "
        "tasks each, so every arm trains the same total) or per_model (each trains all the steps: tasks x the budget).")
    arms: list[ArmSpec] = Field(default_factory=list, description="Arms beyond (or instead of) the preset's.")
    seeds: list[int] | None = Field(default=None, min_length=1, description="Default: [the base's train.seed].")
    steps: int | None = Field(default=None, ge=1, description="Optimizer steps of every arm; default: the base's train.max_steps.")
    stages: list[str] = Field(default_factory=lambda: ["ingest", "tokenize", "train"],
                              description="The pipeline stages every arm runs (add merge, evaluate for pass@k).")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Dotted keys set on the base config in every arm.")

    @model_validator(mode="after")
    def _checks(self) -> "ExperimentConfig":
        unknown = [s for s in self.stages if s not in STAGE_ORDER]
        if unknown or "train" not in self.stages:
            raise ValueError(f"stages {self.stages}: must include train and name only {STAGE_ORDER}")
        if self.preset is None and not self.arms:
            raise ValueError("no arms: set preset: paper, or list arms")
        if self.coba and self.preset != "paper":
            raise ValueError("coba: true adds an arm to the paper preset; without it, list a coba arm in arms")
        return self


@dataclass(frozen=True)
class ArmRun:
    """One training of the experiment: an arm with one seed."""

    arm: str
    seed: int
    overrides: dict[str, Any]  # on the base config, everything included

    @property
    def label(self) -> str:
        return f"{self.arm}-seed{self.seed}"


@dataclass(frozen=True)
class Experiment:
    config: ExperimentConfig
    name: str
    base_config: Path  # absolute
    base: PipelineConfig  # with the experiment's overrides
    runs: list[ArmRun]
    directory: Path  # runs/experiments/<name>-<key16>: the key hashes every arm's resolved config

    @property
    def task_names(self) -> list[str]:
        return [t.task_name for t in self.base.data.tasks if t.kind == "sft"]  # the fine-tuning tasks


def load_experiment(path: str | Path, overrides: dict[str, Any] | None = None) -> Experiment:
    """Read and check an experiment config; every arm's pipeline config is loaded once here, so a
    bad override fails now, naming the arm, and not after the first arms have trained."""
    path = Path(path)
    try:
        config = ExperimentConfig.model_validate(apply_overrides(read_yaml(path, "experiment config"), overrides))
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, str(path))) from None
    base_config = (path.resolve().parent / config.base).resolve()
    base = load_config(base_config, config.overrides)
    steps = config.steps or base.train.max_steps
    if steps is None:
        raise ConfigError(f"{path}: set `steps` (the optimizer steps of every arm), or train.max_steps in {base_config}: "
                          "the arms' token budget must be equal")
    seeds = config.seeds or [base.train.seed]
    arms = _arms(config, base, steps)
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: arm names repeat: {names}")
    runs, digest = [], hashlib.sha256()
    for seed in seeds:  # seed-major: an experiment stopped half-way holds a whole comparison for a seed
        for arm in arms:
            run = ArmRun(arm.name, seed, {**config.overrides, "train.max_steps": steps, "train.epochs": EPOCHS_CAP,
                                          "train.seed": seed, **arm.overrides})
            try:
                resolved = load_config(base_config, run.overrides)
            except ConfigError as err:
                raise ConfigError(f"{path}: arm {arm.name!r}: {err}") from None
            digest.update(run.label.encode())
            digest.update(config_to_yaml(resolved).encode())
            runs.append(run)
    name = config.name or path.stem
    directory = base.runs_root / EXPERIMENTS_DIR / f"{name}-{digest.hexdigest()[:16]}"
    return Experiment(config, name, base_config, base, runs, directory)


def _arms(config: ExperimentConfig, base: PipelineConfig, steps: int) -> list[ArmSpec]:
    arms: list[ArmSpec] = []
    if config.preset == "paper":
        fine_tuning = [task for task in base.data.tasks if task.kind == "sft"]  # preference tasks are align's
        single_steps = max(1, steps // len(fine_tuning)) if config.single_task_budget == "split" else steps
        unit_weights = {f"data.tasks.{i}.weight": 1.0 for i in range(len(base.data.tasks))}
        arms.append(ArmSpec(name="mft-case3", overrides={"train.loss": "case3"}))
        if config.coba:
            arms.append(ArmSpec(name="mft-coba", overrides={"train.loss": "coba", **unit_weights}))
        # Mixed SFT: every task's data in one stream, one token mean, no task balancing.
        arms.append(ArmSpec(name="mixed-sft", overrides={"train.loss": "case1", "train.sampling": "proportional",
                                                         **unit_weights}))
        for task in fine_tuning:  # with one task, case1 and case3 are the same loss
            arms.append(ArmSpec(name=f"sft-{task.task_name}", overrides={"train.tasks": [task.task_name],
                                                                         "train.loss": "case1",
                                                                         "train.max_steps": single_steps}))
    return arms + list(config.arms)


# ----------------------------------------------------------------------------- results


def arm_result(run: ArmRun, outputs: dict[str, str | Path]) -> dict[str, Any]:
    """What one finished arm run measured, read from its stage outputs."""
    train_dir = Path(outputs["train"])
    summary = json.loads((train_dir / "train_summary.json").read_text())
    steps = [json.loads(line) for line in (train_dir / "metrics.jsonl").read_text().splitlines()]
    result: dict[str, Any] = {
        "arm": run.arm, "seed": run.seed, "train_dir": str(train_dir),
        "valid_loss": summary["final_valid_task_loss"] or {},
        "steps": summary["steps"], "trained_tokens": summary["trained_tokens"],
        "train_seconds": sum(m.get("step_seconds", 0.0) for m in steps if "loss" in m),
    }
    if "evaluate" in outputs:
        evaluation = json.loads((Path(outputs["evaluate"]) / "summary.json").read_text())
        table = evaluation["models"]["finetuned"]["pass_at_k"]
        entries = {**table["languages"], "average": table["average"]}
        result["pass_at_k"] = {f"pass@{k}": {lang: entry.get(f"pass@{k}") for lang, entry in entries.items()}
                               for k in evaluation["ks"]}
    return result


def base_valid_loss(cfg: PipelineConfig, tokenize_dir: Path) -> dict[str, float]:
    """Per-task token-mean validation loss of the base model (the reference every arm improves
    on), on the tokenize output the arms validate on."""
    import torch

    from mft_core.config import TrainConfig
    from mft_core.modeling import resolve_model
    from mft_core.train.data import TokenizedSplit, collate, validation_plan
    from mft_core.train.losses import per_task_loss_sums, trained_values
    from mft_core.train.model import TokenLossModel, load_model

    template = json.loads((tokenize_dir / "template.json").read_text())
    split = TokenizedSplit(tokenize_dir, "valid")
    model = load_model(resolve_model(cfg.model.path, cfg.runs_root), TrainConfig(method="full"), "fp32",
                       "sdpa_varlen", on_gpu=False, trust_remote_code=cfg.model.trust_remote_code)
    wrapper = TokenLossModel(model).eval()
    sums = torch.zeros(split.num_tasks, dtype=torch.float64)
    counts = torch.zeros(split.num_tasks, dtype=torch.float64)
    with torch.no_grad():
        for rows in validation_plan(split, template["seq_length"], 1, 1)[0]:
            batch = collate(split, rows, template["seq_length"], template["pad_id"])
            out = wrapper(batch["input_ids"], batch["position_ids"], batch["labels"])
            s, c = per_task_loss_sums(out.token_loss.double(), trained_values(batch["task_ids"], batch["labels"]),
                                      split.num_tasks)
            sums += s
            counts += c
    return {name: (sums[k] / counts[k]).item() for k, name in enumerate(split.task_names) if counts[k] > 0}


def cached_base_valid_loss(experiment: Experiment, tokenize_dirs: list[str | Path]) -> dict[str, float]:
    """base_valid_loss, computed once per experiment folder (kept in base_valid_loss.json). The
    arms normally share one tokenize output; when an arm's overrides tokenize differently, the
    base model is measured on the first arm's (and the table says gains are against that)."""
    tokenize_dir = Path(tokenize_dirs[0])
    if len({Path(d).name for d in tokenize_dirs}) > 1:
        log.warning("the arms have different tokenize outputs; the base model's loss is measured on %s", tokenize_dir)
    record_path = experiment.directory / "base_valid_loss.json"
    identity = {"tokenize": tokenize_dir.name, "model": experiment.base.model.path}
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("identity") == identity:
            return record["loss"]
    loss = base_valid_loss(experiment.base, tokenize_dir)
    record_path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(record_path, json.dumps({"identity": identity, "loss": loss}, indent=1) + "\n")
    return loss


def _mean_and_spread(values: list[float]) -> tuple[float, float]:
    """Mean over seeds and half the range (0 with one seed)."""
    return sum(values) / len(values), (max(values) - min(values)) / 2


def summarize(experiment: Experiment, results: list[dict[str, Any]], base_loss: dict[str, float]) -> dict[str, Any]:
    """The paper-shaped table: a row per arm (the single-task arms folded into one row, each task
    from its own arm), a column per task; the mean over seeds and their half-range; the relative
    gain over the base model per task, its mean and its spread (best minus worst task); the winner."""
    tasks = experiment.task_names
    arms = list(dict.fromkeys(r["arm"] for r in results))
    single = {f"sft-{t}": t for t in tasks if f"sft-{t}" in arms and experiment.config.preset == "paper"}
    rows: dict[str, dict[str, Any]] = {}

    def cells_of(arm_results: list[dict[str, Any]], task: str) -> dict[str, Any] | None:
        values = [r["valid_loss"][task] for r in arm_results if task in r["valid_loss"]]
        if not values:
            return None
        mean, spread = _mean_and_spread(values)
        gain = (base_loss[task] - mean) / base_loss[task] if task in base_loss else None
        return {"loss": mean, "seed_spread": spread, "seeds": len(values), "gain": gain}

    for arm in arms:
        if arm in single:
            continue
        mine = [r for r in results if r["arm"] == arm]
        rows[arm] = {"tasks": {t: cells_of(mine, t) for t in tasks}, "runs": mine}
    if single:
        rows[SINGLE_TASK_ROW] = {
            "tasks": {t: cells_of([r for r in results if r["arm"] == f"sft-{t}"], t) for t in tasks},
            "runs": [r for r in results if r["arm"] in single],
        }
    for row in rows.values():
        gains = [c["gain"] for c in row["tasks"].values() if c and c["gain"] is not None]
        row["mean_gain"] = sum(gains) / len(gains) if len(gains) == len(tasks) else None
        row["task_spread"] = max(gains) - min(gains) if len(gains) == len(tasks) else None
        seeds = max(1, len({r["seed"] for r in row["runs"]}))  # per seed: all the row's models of one seed
        row["trained_tokens"] = sum(r["trained_tokens"] for r in row["runs"]) // seeds
        row["train_seconds"] = sum(r["train_seconds"] for r in row["runs"]) / seeds
    several = len({r["seed"] for r in results}) > 1
    for row in rows.values():
        for cell in filter(None, row["tasks"].values()):  # as the tables print it: loss [± seeds' half-range] (gain)
            cell["text"] = (f"{cell['loss']:.4f}" + (f" ± {cell['seed_spread']:.4f}" if several else "")
                            + (f" ({cell['gain']:+.1%})" if cell["gain"] is not None else ""))
    best = {t: min((name for name in rows if rows[name]["tasks"][t]), key=lambda n: rows[n]["tasks"][t]["loss"], default=None)
            for t in tasks}
    # pass@k is not per task: every arm keeps its own row (each single-task model too), mean over seeds.
    pass_at_k: dict[str, dict[str, dict[str, float | None]]] = {}
    for arm in arms:
        mine = [r["pass_at_k"] for r in results if r["arm"] == arm and "pass_at_k" in r]
        if mine:
            pass_at_k[arm] = {k: {lang: _mean([m[k].get(lang) for m in mine]) for lang in mine[0][k]} for k in mine[0]}
    # the pass@k table's columns: the languages (and "average") in the evaluation's order
    languages = list(dict.fromkeys(lang for by_k in pass_at_k.values() for values in by_k.values() for lang in values))
    return {"name": experiment.name, "tasks": tasks, "base_valid_loss": base_loss, "pass_at_k": pass_at_k,
            "pass_languages": languages,
            "seeds": sorted({r["seed"] for r in results}), "rows": rows, "best_per_task": best,
            "verdict": _verdict(rows)}


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _verdict(rows: dict[str, dict[str, Any]]) -> str:
    """Which arm wins on the mean relative gain, and whether it separates from the runner-up by
    more than the seeds' noise (the largest half-range of a task's loss, relative to that loss)."""
    ranked = sorted((r["mean_gain"], name) for name, r in rows.items() if r["mean_gain"] is not None)
    if len(ranked) < 2:
        return "fewer than two arms with a validation loss on every task: no comparison"
    (second, runner_up), (first, winner) = ranked[-2], ranked[-1]
    noise = max((c["seed_spread"] / c["loss"] for r in rows.values() for c in r["tasks"].values()
                 if c and c["seeds"] > 1), default=None)
    margin = first - second
    text = f"{winner} has the highest mean gain ({first:+.2%}), {margin:.2%} ahead of {runner_up} ({second:+.2%})"
    if noise is None:
        return text + "; one seed, so the noise is unknown: run several seeds before reading a winner"
    if margin <= noise:
        return text + f"; the seeds vary by up to ±{noise:.2%} of a task's loss, so the arms do not separate at this budget"
    return text + f", more than the seeds' spread (±{noise:.2%} of a task's loss)"


def markdown(summary: dict[str, Any], experiment: Experiment) -> str:
    tasks = summary["tasks"]
    base = summary["base_valid_loss"]
    several = len(summary["seeds"]) > 1
    headers = ["arm", *tasks, "mean gain", "task spread", "trained tokens", "train s"]
    lines = [f"# Experiment {summary['name']}\n",
             f"Base config {experiment.base_config}; seeds {summary['seeds']}; optimizer steps of the same packed rows: "
             + ", ".join(f"{arm} {steps}" for arm, steps in dict((r.arm, r.overrides["train.max_steps"]) for r in experiment.runs).items())
             + " (the single-task row: each task from its own model).",
             "Cells: validation loss after training" + (" (mean over seeds ± half their range)" if several else "")
             + " and its gain over the base model; **bold**: the best arm of the task.\n",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines.append("| base model | " + " | ".join(f"{base[t]:.4f}" if t in base else "-" for t in tasks) + " | | | | |")
    for name, row in summary["rows"].items():
        cells = []
        for t in tasks:
            cell = row["tasks"][t]
            text = "-" if cell is None else cell["text"]
            cells.append(f"**{text}**" if summary["best_per_task"][t] == name else text)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {signed_percent(row['mean_gain'])} | {signed_percent(row['task_spread'])} | "
                     f"{row['trained_tokens']} | {row['train_seconds']:.0f} |")
    languages = summary["pass_languages"]
    if languages:
        lines += ["\nHumanEval-X pass@k (%) of each fine-tuned model" + (", mean over seeds" if several else "") + ":\n",
                  "| arm | k | " + " | ".join(languages) + " |", "|" + "---|" * (len(languages) + 2)]
    for name, by_k in summary["pass_at_k"].items():
        for k, values in by_k.items():
            lines.append(f"| {name} | {k} | " + " | ".join("-" if values.get(lang) is None else f"{100 * values[lang]:.1f}"
                                                          for lang in languages) + " |")
    lines += ["", f"**Reading:** {summary['verdict']}.", "", "![validation loss gain per task and arm](experiment.png)", ""]
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> None:
    """Per task and arm: the gain over the base model (%), seeds' half-range as error bars; the
    validation loss itself where the base model's is unknown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, rows, base = summary["tasks"], summary["rows"], summary["base_valid_loss"]
    as_gain = all(t in base for t in tasks)
    figure, axis = plt.subplots(figsize=(9, 4), dpi=100)
    width = 0.8 / max(1, len(rows))
    for i, (name, row) in enumerate(rows.items()):
        xs = [x + i * width for x in range(len(tasks))]
        cells = [row["tasks"][t] for t in tasks]
        if as_gain:
            heights = [100 * c["gain"] if c else math.nan for c in cells]
            errors = [100 * c["seed_spread"] / base[t] if c else 0 for c, t in zip(cells, tasks)]
        else:
            heights = [c["loss"] if c else math.nan for c in cells]
            errors = [c["seed_spread"] if c else 0 for c in cells]
        axis.bar(xs, heights, width, label=name, yerr=errors, capsize=3)
    axis.set_xticks([x + width * (len(rows) - 1) / 2 for x in range(len(tasks))])
    axis.set_xticklabels(tasks, fontsize=8)
    axis.set_ylabel("validation loss gain over the base model (%)" if as_gain else "validation loss")
    axis.set_title(f"experiment {summary['name']}: per task and arm" + (" (error bars: the seeds' half-range)"
                                                                        if len(summary["seeds"]) > 1 else ""))
    axis.legend(fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write_results(experiment: Experiment, results: list[dict[str, Any]], base_loss: dict[str, float]) -> dict[str, Path]:
    """experiment.json, experiment.md, experiment.png and report.html in the experiment's folder."""
    summary = summarize(experiment, results, base_loss)
    out = experiment.directory
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "experiment.json", "markdown": out / "experiment.md", "plot": out / "experiment.png",
             "report": out / "report.html"}
    write_text_atomic(paths["json"], json.dumps({"summary": summary, "runs": results,
                                             "config": experiment.config.model_dump(mode="json")}, indent=1) + "\n")
    write_text_atomic(paths["markdown"], markdown(summary, experiment))
    plot(summary, paths["plot"])
    write_experiment_report(paths["report"], experiment.base, summary, paths["plot"], results)
    return paths

