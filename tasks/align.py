"""Prefect task of the align stage (preference alignment). Its recipe runs as a subprocess, as
train's does; its output streams into this task's log and a progress artifact follows the steps."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from mft_core.config import PipelineConfig
from mft_core.stages import run_stage
from tasks._common import forward_mft_logs, publish_stats_table, stage_cache_key


@task(name="align", cache_key_fn=stage_cache_key, persist_result=True)
def align_task(cfg: PipelineConfig, upstream: str | None = None, force: bool = False) -> str:
    with forward_mft_logs():
        artifact_id = create_progress_artifact(progress=0.0, key="align-progress", description="optimizer steps done")

        def on_progress(done: int, total: int, line: str) -> None:
            update_progress_artifact(artifact_id=artifact_id, progress=100.0 * done / max(total, 1), description=line)

        run = run_stage(cfg, "align", upstream_dir=Path(upstream) if upstream else None, force=force, progress=on_progress)
        update_progress_artifact(artifact_id=artifact_id, progress=100.0)
        summary = json.loads((run.directory / "train_summary.json").read_text())
        before, after = summary.get("valid_before") or {}, summary.get("valid_after") or {}
        publish_stats_table("align", [
            {"task": t, "accuracy_before": before.get("logp_accuracy", {}).get(t),
             "accuracy_after": after.get("logp_accuracy", {}).get(t),
             "reward_margin": after.get("reward_margin", {}).get(t), "valid_pair_loss": after.get("loss", {}).get(t)}
            for t in summary["preference_tasks"]],
            f"Validation preference accuracy before and after {summary['method']} ({summary['steps']} steps), {run.directory}")
    return str(run.directory)
