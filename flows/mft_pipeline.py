"""The flow `mft-pipeline`: the stages in order, each a cached Prefect task.

Parameters (the same in `mft run`, `prefect deployment run mft-pipeline/<name> -p ...` and
prefect.yaml):
  config     path of the pipeline config (relative to the working directory)
  stages     the stages to run (default: all; align only with align.enabled); a stage not listed is only *located*: its
             finished output for this config must exist, or the flow fails saying what to run
  force      stages to recompute even when their output exists
  overrides  {"dotted.key": value} applied on top of the config file (like `--set`)
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact

from mft_core.config import load_config
from mft_core.console import run_log
from mft_core.preflight import preflight
from mft_core.report import pipeline_summary
from mft_core.run_report import write_report
from mft_core.stages import STAGE_ORDER, check_enabled, locate_stage, stage_chain
from tasks._common import results_dir
from tasks.align import align_task
from tasks.evaluate import evaluate_task
from tasks.ingest import ingest_task
from tasks.merge import merge_task
from tasks.tokenize import tokenize_task
from tasks.train import train_task

STAGE_TASKS = {
    "ingest": ingest_task,
    "tokenize": tokenize_task,
    "train": train_task,
    "align": align_task,
    "merge": merge_task,
    "evaluate": evaluate_task,
}
assert list(STAGE_TASKS) == STAGE_ORDER, "every stage of mft_core.stages needs its task here"


def _check_names(kind: str, names: list[str]) -> None:
    unknown = [n for n in names if n not in STAGE_ORDER]
    if unknown:
        raise ValueError(f"{kind}: unknown stage(s) {unknown}; the stages are {STAGE_ORDER}")


@flow(name="mft-pipeline", log_prints=True)
def mft_pipeline(
    config: str = "pipeline.yaml",
    stages: list[str] | None = None,
    force: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, str]:
    logger = get_run_logger()
    cfg = load_config(config, overrides)
    chain = stage_chain(cfg)  # the stages this config runs (align only when enabled)
    selected = list(stages) if stages else chain
    forced = list(force or [])
    _check_names("stages", selected)
    _check_names("force", forced)
    for name in selected:
        check_enabled(cfg, name)
    rank = cfg.train.launch.machine_rank
    if rank > 0:  # a multi-machine run: machine 0 publishes the trainings and runs what comes after them
        trained = [name for name in ("train", "align") if name in chain]
        after = [name for name in selected if chain.index(name) > chain.index(trained[-1])]
        if after:
            logger.info("machine rank %d joins the training only; %s run on machine 0", rank, ", ".join(after))
        selected = [name for name in selected if name not in after]
        if not selected:
            return {}
    started = datetime.now(timezone.utc)  # outputs built after this were computed by this run
    # `mft run` opened the run log already; under a worker (a deployment) it opens here.
    with run_log(cfg.runs_root):
        preflight(cfg, selected, forced)  # a missing toolchain, model or disk costs seconds, not a training run
        last = max(chain.index(name) for name in selected)

        outputs: dict[str, str] = {}
        upstream: str | None = None
        for name in chain[: last + 1]:
            if name in selected:
                stage_task = STAGE_TASKS[name].with_options(
                    refresh_cache=name in forced, result_storage=results_dir(cfg)
                )
                upstream = stage_task(cfg, upstream, force=name in forced)
            else:
                upstream = str(locate_stage(cfg, name))
                logger.info("%s: not selected, using its existing output %s", name, upstream)
            outputs[name] = upstream
        output_dirs = {name: Path(path) for name, path in outputs.items()}
        print(pipeline_summary(output_dirs))
        report = write_report(cfg, output_dirs, started)
        create_link_artifact(key="run-report", link=report.as_uri(), link_text=report.name,
                             description="the run's report.html (open it in a browser; it needs no network)")
        print(f"run report: {report}")
    return outputs
