"""Prefect task of the merge stage: a thin wrapper around mft_core.stages.run_stage, with the
equivalence check of merge_report.json as a table artifact."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task

from mft_core.config import PipelineConfig
from mft_core.merge import REPORT
from mft_core.stages import run_stage
from tasks._common import forward_mft_logs, publish_stats_table, stage_cache_key


@task(name="merge", cache_key_fn=stage_cache_key, persist_result=True)
def merge_task(cfg: PipelineConfig, upstream: str | None = None, force: bool = False) -> str:
    with forward_mft_logs():
        run = run_stage(cfg, "merge", upstream_dir=Path(upstream) if upstream else None, force=force)
        report = json.loads((run.directory / REPORT).read_text())
        check = report["check"]
        publish_stats_table("merge", [{
            "method": report["method"],
            "dtype": report["dtype"],
            "samples": check["samples"],
            "max_abs_diff": check["max_abs_diff"],
            "mean_abs_diff": check["mean_abs_diff"],
            "argmax_agreement": check["argmax_agreement"],
            "tolerance": check["tolerance"],
            "finetune_max_abs_diff": check["finetune_effect"]["max_abs_diff"],
            "finetune_argmax_changed": check["finetune_effect"]["argmax_changed"],
        }], f"Saved model vs {check['reference']} (logits), {run.directory / report['model_dir']}")
    return str(run.directory)
