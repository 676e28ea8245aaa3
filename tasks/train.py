"""Prefect task of the train stage. The trainer runs as a subprocess; its output streams into
this task's log line by line and a progress artifact follows the optimizer steps."""

from __future__ import annotations

import base64
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact

from mft_core.config import PipelineConfig
from mft_core.stages import run_stage
from tasks._common import forward_mft_logs, publish_stats_table, stage_cache_key


@task(name="train", cache_key_fn=stage_cache_key, persist_result=True)
def train_task(cfg: PipelineConfig, upstream: str | None = None, force: bool = False) -> str:
    with forward_mft_logs():
        artifact_id = create_progress_artifact(progress=0.0, key="train-progress", description="optimizer steps done")

        def on_progress(done: int, total: int, line: str) -> None:  # the console's line: loss, tokens/s, ETA
            update_progress_artifact(artifact_id=artifact_id, progress=100.0 * done / max(total, 1), description=line)

        run = run_stage(cfg, "train", upstream_dir=Path(upstream) if upstream else None, force=force, progress=on_progress)
        update_progress_artifact(artifact_id=artifact_id, progress=100.0)
        summary = _read_json(run.directory / "train_summary.json")
        losses = summary.get("final_valid_task_loss") or {}
        publish_stats_table("train", [{"task": t, "valid_loss": v} for t, v in losses.items()],
                            f"Final per-task validation loss ({summary.get('steps')} steps), {run.directory}")
        curves = run.directory / "loss_curves.png"
        if curves.is_file():
            # Artifacts hold text: the PNG travels inline as a data URI.
            encoded = base64.b64encode(curves.read_bytes()).decode()
            create_markdown_artifact(key="train-loss-curves", markdown=f"![per-task loss](data:image/png;base64,{encoded})",
                                     description="Per-task train and validation loss")
    return str(run.directory)


def _read_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text()) if path.is_file() else {}
