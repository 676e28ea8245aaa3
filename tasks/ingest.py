"""Prefect task of the ingest stage: a thin wrapper around mft_core.stages.run_stage."""

from __future__ import annotations

from prefect import task

from mft_core.config import PipelineConfig
from mft_core.stages import run_stage, stage_stats
from tasks._common import forward_mft_logs, publish_stats_table, stage_cache_key


@task(name="ingest", cache_key_fn=stage_cache_key, persist_result=True)
def ingest_task(cfg: PipelineConfig, upstream: str | None = None, force: bool = False) -> str:
    with forward_mft_logs():
        run = run_stage(cfg, "ingest", force=force)
        stats = stage_stats(run.directory) or {"tasks": {}}
        rows = [{"task": name, **{k: v for k, v in s.items() if k != "rejected_by_reason"}} for name, s in stats["tasks"].items()]
        publish_stats_table("ingest", rows, f"Ingest of {len(rows)} tasks into {run.directory}")
    return str(run.directory)
