"""The stages of the pipeline, in order, and how each one is keyed, located and built.

This is the contract every stage plugs into (DESIGN.md §1). It has no Prefect in it: the CLI runs
a stage directly with `run_stage`, and the Prefect tasks in `tasks/` wrap the same calls.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mft_core import merge, store
from mft_core.align import stage as align_stage
from mft_core.config import PipelineConfig
from mft_core.console import announce, format_duration
from mft_core.data import ingest, tokenize
from mft_core.eval import stage as eval_stage
from mft_core.report import RESULT_LINES
from mft_core.train import stage as train_stage

log = logging.getLogger("mft.stages")


# (done, total, the progress line the console shows), e.g. optimizer steps; called when a line is due
Progress = Callable[[int, int, str], None]


class StageNotReady(RuntimeError):
    """A stage's upstream output does not exist yet for this config."""


@dataclass(frozen=True)
class Stage:
    name: str
    version: int
    upstream: str | None  # the stage before it when every stage runs; `upstream_name` skips disabled ones
    # (cfg, upstream dir or None, hash cache) -> (config part, input digests) of the key
    key_parts: Callable[[PipelineConfig, Path | None, store.FileHashCache], tuple[Any, list[str]]]
    # (cfg, upstream dir or None, work dir, progress callback or None) -> stats (JSON-able)
    build: Callable[[PipelineConfig, Path | None, Path, Progress | None], dict[str, Any]]
    resumable: bool = False
    # Files of the output that describe how the run went, not what it produced (store.manifest_digest):
    # left out of the keys of the stages after it.
    context_files: tuple[str, ...] = ()
    # Whether the config runs this stage (align: align.enabled); a disabled stage is skipped, and
    # the stage after it takes its upstream's output.
    enabled: Callable[[PipelineConfig], bool] = lambda cfg: True


STAGES: dict[str, Stage] = {
    "ingest": Stage(
        name="ingest",
        version=ingest.STAGE_VERSION,
        upstream=None,
        key_parts=lambda cfg, _up, hashes: ingest.ingest_key_parts(cfg, hashes),
        build=lambda cfg, _up, work, _progress: ingest.run_ingest(cfg, work),
    ),
    "tokenize": Stage(
        name="tokenize",
        version=tokenize.STAGE_VERSION,
        upstream="ingest",
        key_parts=lambda cfg, _up, _hashes: tokenize.tokenize_key_parts(cfg),
        build=lambda cfg, up, work, _progress: tokenize.run_tokenize(cfg, up, work),
        resumable=True,  # finished shards survive a crash; the rerun does the rest
    ),
    "train": Stage(
        name="train",
        version=train_stage.STAGE_VERSION,
        upstream="tokenize",
        key_parts=lambda cfg, _up, hashes: train_stage.train_key_parts(cfg, hashes),
        build=lambda cfg, up, work, progress: train_stage.run_train(cfg, up, work, progress),
        resumable=True,  # checkpoints survive a crash; the rerun resumes from the newest
        # step times, tokens/s, memory and TensorBoard's event files (named by time and host)
        context_files=("metrics.jsonl", "tensorboard/*", "loss_curves.png"),
    ),
    "align": Stage(
        name="align",
        version=align_stage.STAGE_VERSION,
        upstream="train",
        key_parts=lambda cfg, _up, hashes: align_stage.align_key_parts(cfg, hashes),
        build=lambda cfg, up, work, progress: align_stage.run_align(cfg, up, work, progress),
        resumable=True,  # checkpoints, as train's
        context_files=("metrics.jsonl", "tensorboard/*", "loss_curves.png"),
        enabled=lambda cfg: cfg.align.enabled,
    ),
    "merge": Stage(
        name="merge",
        version=merge.STAGE_VERSION,
        upstream="align",  # the aligned model when align runs, else train's (upstream_name)
        key_parts=lambda cfg, _up, hashes: merge.merge_key_parts(cfg, hashes),
        build=lambda cfg, up, work, _progress: merge.run_merge(cfg, up, work),
    ),
    "evaluate": Stage(
        name="evaluate",
        version=eval_stage.STAGE_VERSION,
        upstream="merge",
        key_parts=lambda cfg, _up, hashes: eval_stage.evaluate_key_parts(cfg, hashes),
        build=lambda cfg, up, work, progress: eval_stage.run_evaluate(cfg, up, work, progress),
        resumable=True,  # generations and verdicts are kept per sample; a rerun continues
    ),
}
STAGE_ORDER: list[str] = list(STAGES)


def stage_chain(cfg: PipelineConfig) -> list[str]:
    """The stages this config runs, in order (STAGE_ORDER without the disabled ones)."""
    return [name for name in STAGE_ORDER if STAGES[name].enabled(cfg)]


def upstream_name(cfg: PipelineConfig, name: str) -> str | None:
    """The stage whose output `name` reads for this config: the enabled stage before it."""
    parent = STAGES[name].upstream
    while parent is not None and not STAGES[parent].enabled(cfg):
        parent = STAGES[parent].upstream
    return parent


def check_enabled(cfg: PipelineConfig, name: str) -> None:
    if not STAGES[name].enabled(cfg):
        raise ValueError(f"stage {name!r} is off in this config ({cfg.source}): set align.enabled: true and add a "
                         "preference task (data.tasks[].kind: preference) to run it")


def key_components(cfg: PipelineConfig, name: str, upstream_dir: Path | None) -> dict[str, Any]:
    """What the stage key hashes, as `store.stage_key`'s arguments (kept beside each output as
    key_parts.json, so that `mft status` can say why an output no longer matches the config)."""
    stage = STAGES[name]
    hashes = store.FileHashCache(cfg.runs_root)
    config_part, inputs = stage.key_parts(cfg, upstream_dir, hashes)
    if upstream_dir is not None:
        parent = upstream_name(cfg, name)
        context = STAGES[parent].context_files if parent else ()
        inputs = [f"upstream:{store.manifest_digest(upstream_dir, context)}", *inputs]
    return {"stage": name, "version": stage.version, "config": config_part, "inputs": inputs}


def compute_key(cfg: PipelineConfig, name: str, upstream_dir: Path | None) -> str:
    return store.stage_key(**key_components(cfg, name, upstream_dir))


def upstream_of(cfg: PipelineConfig, name: str) -> Path | None:
    """The finished output directory of `name`'s upstream stage, located by key (not by recency)."""
    parent = upstream_name(cfg, name)
    if parent is None:
        return None
    return locate_stage(cfg, parent)


def locate_stage(cfg: PipelineConfig, name: str) -> Path:
    """The finished output of `name` for this config, or StageNotReady saying what to run first."""
    upstream = upstream_of(cfg, name)
    key = compute_key(cfg, name, upstream)
    directory = store.stage_dir(cfg.runs_root, name, key)
    if not store.is_complete(directory):
        raise StageNotReady(
            f"stage {name!r} has no finished output for this config and its inputs (expected {directory}). "
            f"Run it first: `mft {name}`, or `mft run`, which runs every stage in order "
            f"(in a flow: include {name!r} in `stages`)."
        )
    return directory


def run_stage(cfg: PipelineConfig, name: str, upstream_dir: Path | None = None, force: bool = False,
              progress: Progress | None = None) -> store.StageRun:
    """Build (or reuse) the output of stage `name`. `upstream_dir` defaults to the located upstream."""
    stage = STAGES[name]
    check_enabled(cfg, name)
    if upstream_dir is None and upstream_name(cfg, name) is not None:
        upstream_dir = upstream_of(cfg, name)
    parts = key_components(cfg, name, upstream_dir)
    key = store.stage_key(**parts)
    rank = cfg.train.launch.machine_rank
    if rank > 0:  # a multi-machine run: machine 0 alone builds and publishes, on the shared runs root
        if name == "train":
            return train_stage.join_training(cfg, key, progress)
        if name == "align":
            return train_stage.join_training(cfg, key, progress, "align", align_stage.align_train_config(cfg),
                                             align_stage.RECIPE)
        final = store.stage_dir(cfg.runs_root, name, key)
        announce(log, name, f"machine {rank}: waiting for machine 0's output {final}")
        store.wait_until(lambda: store.is_complete(final),
                         f"machine 0 did not publish {final} within {store.MACHINE_WAIT_S:.0f} s: start the same command "
                         "there with train.launch.machine_rank=0, on a runs_root both machines share")
        return store.StageRun(final, key, computed=False)
    resolved = {"stage": name, "stage_version": stage.version, "config": cfg.model_dump(mode="json")}
    started = time.monotonic()
    run = store.build_stage(
        cfg.runs_root,
        name,
        key,
        lambda work: stage.build(cfg, upstream_dir, work, progress),
        config_copy=resolved,
        key_parts=parts,
        force=force,
        resumable=stage.resumable,
    )
    # The build itself announced its start (it knows what it is about to do, e.g. the precision).
    if run.computed:
        announce(log, name, f"done in {format_duration(time.monotonic() - started)}: {RESULT_LINES[name](run.directory)}")
    else:
        announce(log, name, f"cached: {run.directory}")
    return run


def stage_stats(directory: Path) -> dict[str, Any] | None:
    import json

    path = directory / "stats.json"
    return json.loads(path.read_text()) if path.is_file() else None
