"""Align stage: the fine-tuned model + the preference pairs -> a preference-aligned adapter or model.

Runs only with `align.enabled` (then merge takes its output instead of train's: stages.py). Like
the train stage it writes `train_job.json` into its work directory and runs its recipe
(mft_core/align/recipe.py) as a subprocess, with train's precision and attention and
align.launch (default: train's); the work directory survives a crash and the rerun resumes from
the newest checkpoint.

Output directory (what merge reads from a train output, plus the align adapter alone):
  model/                  the SFT and align adapters stacked into one (or a full model)
  align-adapter/          the align adapter alone, on top of the fine-tuned model (LoRA only)
  reference_logps_*.pt    the precomputed reference log-probs (align.parameters full)
  hyperparameters.json    the job: the train output it started from (sft_dir), the method, β, the
                          reference, the parameters in memory
  train_summary.json      steps; validation pair loss, reward margin and preference accuracy per
                          task before (step 0) and after; the fine-tuning's own summary
  metrics.jsonl, loss_curves.png, tensorboard/
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mft_core import store
from mft_core.config import PipelineConfig, TrainConfig
from mft_core.console import announce
from mft_core.modeling import resolve_model
from mft_core.store import FileHashCache
from mft_core.train.launch import start_trainer
from mft_core.train.stage import (
    _LAUNCH_NOT_IN_KEY,
    _NOT_IN_KEY,
    _relative_to_runs,
    job_path,
    step_reporter,
    train_key_parts,
)

log = logging.getLogger("mft.align")

STAGE_VERSION = 1
RECIPE = "mft_core.align.recipe"
# align's own settings that replace train's in the trainer's TrainConfig
_FROM_ALIGN = ("lora", "lr", "min_lr", "schedule", "warmup_steps", "epochs", "max_steps", "rows_per_micro_batch",
               "grad_accum", "seed", "eval_every", "checkpoint_every")


def align_train_config(cfg: PipelineConfig) -> TrainConfig:
    """The TrainConfig the align recipe runs with: train's launch, precision, attention, threads,
    memory settings and clipping; align's adapter, optimizer, schedule and batches."""
    update = {key: getattr(cfg.align, key) for key in _FROM_ALIGN}
    return cfg.train.model_copy(update={**update, "method": cfg.align.parameters, "weight_decay": 0.0, "tasks": None,
                                        "early_stopping_patience": None, "launch": cfg.align.launch or cfg.train.launch})


def align_key_parts(cfg: PipelineConfig, hashes: FileHashCache) -> tuple[dict[str, Any], list[str]]:
    """The align section and the settings of train that it runs with (not those that only say how
    it runs); the train output it starts from enters the key as its upstream, the base weights as
    the model digest (train's key parts give both the same way)."""
    section = json.loads(align_train_config(cfg).model_dump_json())
    for key in (*_NOT_IN_KEY, "loss", "coba", "focal_gamma", "sampling", "sampling_alpha", "tasks"):
        section.pop(key, None)
    _, inputs = train_key_parts(cfg, hashes)
    for key in _LAUNCH_NOT_IN_KEY:  # where the machines are, not what is computed
        section["launch"].pop(key)
    if section["launch"]["backend"] != "deepspeed":
        section["launch"].pop("zero_stage")
    section["align"] = cfg.stage_section("align")
    section["align"].pop("launch")  # resolved into section["launch"]
    if cfg.align.parameters == "full":
        section.pop("lora")
        section["align"].pop("lora")
    section["task_weights"] = {t.task_name: t.weight for t in cfg.data.tasks if t.kind == "preference"}
    return section, inputs


def describe_alignment(cfg: PipelineConfig, precision: str) -> str:
    align = cfg.align
    length = f"{align.max_steps} steps" if align.max_steps else f"{align.epochs} epoch(s)"
    tasks = ", ".join(t.task_name for t in cfg.data.tasks if t.kind == "preference")
    reference = "reference: the fine-tuned model" if align.method != "orpo" else "no reference"
    what = f"LoRA r{align.lora.r}" if align.parameters == "lora" else "every weight"
    if align.parameters == "full" and align.method != "orpo":
        reference += ", precomputed"
    return f"{align.method.upper()} (β {align.beta:g}, {reference}), {length}, {what} of the fine-tuned model, tasks {tasks}, {precision}"


def write_align_job(cfg: PipelineConfig, train_dir: Path, work_dir: Path) -> dict[str, Any]:
    trained = json.loads((train_dir / "hyperparameters.json").read_text())
    weights = {t.task_name: t.weight for t in cfg.data.tasks}
    job = {
        "model_dir": _relative_to_runs(resolve_model(cfg.model.path, cfg.runs_root), cfg.runs_root),
        "sft_dir": _relative_to_runs(train_dir, cfg.runs_root),
        "sft_method": trained["train"]["method"],
        "tokenize_dir": _relative_to_runs(job_path(trained["tokenize_dir"], train_dir), cfg.runs_root),
        "tasks": [{**t, "weight": weights[t["name"]]} for t in trained["tasks"]],
        "train": json.loads(align_train_config(cfg).model_dump_json()),
        "align": cfg.stage_section("align"),
        "precision": trained["precision"],  # the fine-tuning's: the same numerics as the model it starts from
        "trust_remote_code": cfg.model.trust_remote_code,
    }
    store.write_text_atomic(work_dir / "train_job.json", json.dumps(job, indent=1) + "\n")
    return job


def run_align(cfg: PipelineConfig, train_dir: Path, work_dir: Path,
              on_progress: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
    precision = write_align_job(cfg, train_dir, work_dir)["precision"]
    announce(log, "align", "start: " + describe_alignment(cfg, precision))
    start_trainer(cfg.cluster, align_train_config(cfg), work_dir, precision == "bf16", work_dir / "align.log",
                  step_reporter(on_progress, "align"), recipe_module=RECIPE)
    for required in ("model", "train_summary.json", "metrics.jsonl"):
        if not (work_dir / required).exists():
            raise RuntimeError(f"the align recipe exited 0 but wrote no {required} in {work_dir}")
    shutil.rmtree(work_dir / "checkpoints", ignore_errors=True)
    for launch_file in ("align.log", "accelerate.yaml"):
        (work_dir / launch_file).unlink(missing_ok=True)
    return json.loads((work_dir / "train_summary.json").read_text())

