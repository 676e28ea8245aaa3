"""Prefect task of the tokenize stage: a thin wrapper around mft_core.stages.run_stage."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from mft_core.config import PipelineConfig
from mft_core.stages import run_stage, stage_stats
from tasks._common import forward_mft_logs, publish_stats_table, stage_cache_key


@task(name="tokenize", cache_key_fn=stage_cache_key, persist_result=True)
def tokenize_task(cfg: PipelineConfig, upstream: str | None = None, force: bool = False) -> str:
    with forward_mft_logs():
        run = run_stage(cfg, "tokenize", upstream_dir=Path(upstream) if upstream else None, force=force)
        stats = stage_stats(run.directory) or {"tasks": {}}
        rows = [
            {"task": task_name, "split": split, **{k: v for k, v in s.items() if k != "histogram"}}
            for task_name, splits in stats["tasks"].items()
            for split, s in splits.items()
        ]
        publish_stats_table("tokenize", rows, f"Tokenized shards in {run.directory}")
    return str(run.directory)
