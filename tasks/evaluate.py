"""Prefect task of the evaluate stage: a thin wrapper around mft_core.stages.run_stage, with a
progress artifact (samples generated and executed), pass@k per model and language as a table
artifact and report.md as a markdown artifact."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact

from mft_core.config import PipelineConfig
from mft_core.eval.stage import REPORT, SUMMARY, pass_at_k_rows
from mft_core.stages import run_stage
from tasks._common import forward_mft_logs, publish_stats_table, stage_cache_key


@task(name="evaluate", cache_key_fn=stage_cache_key, persist_result=True)
def evaluate_task(cfg: PipelineConfig, upstream: str | None = None, force: bool = False) -> str:
    with forward_mft_logs():
        artifact_id = create_progress_artifact(progress=0.0, key="evaluate-progress",
                                               description="HumanEval-X samples generated and executed")

        def on_progress(done: int, total: int, line: str) -> None:  # the console's line: done/total per language
            update_progress_artifact(artifact_id=artifact_id, progress=100.0 * done / max(total, 1), description=line)

        run = run_stage(cfg, "evaluate", upstream_dir=Path(upstream) if upstream else None, force=force,
                        progress=on_progress)
        update_progress_artifact(artifact_id=artifact_id, progress=100.0)
        summary = json.loads((run.directory / SUMMARY).read_text())
        publish_stats_table("evaluate", pass_at_k_rows(summary),
                            f"HumanEval-X pass@k (%) per model and language, {run.directory}")
        create_markdown_artifact(key="evaluate-report", markdown=(run.directory / REPORT).read_text(),
                                 description="HumanEval-X evaluation report")
    return str(run.directory)
