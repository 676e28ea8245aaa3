"""What every stage task shares: the cache key (the stage key), result storage under the runs
root, log forwarding into Prefect, and the stats artifact. The work itself lives in mft_core."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.context import TaskRunContext

from mft_core import store
from mft_core.config import PipelineConfig
from mft_core.console import MFT_LOGGERS, on_console
from mft_core.stages import compute_key

RESULTS_DIR = store.PREFECT_RESULTS


def results_dir(cfg: PipelineConfig) -> Path:
    """Prefect's result records live under the runs root, so deleting runs/ is a clean slate."""
    path = cfg.runs_root / RESULTS_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def stage_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """The Prefect cache key of a stage task is the stage key itself.

    None (no cache hit) when Prefect holds a result for the key but the output directory is gone
    or unfinished: the cached path would point at nothing (the stale-cache trap).
    """
    cfg: PipelineConfig = parameters["cfg"]
    upstream = parameters.get("upstream")
    name = context.task.name
    key = compute_key(cfg, name, Path(upstream) if upstream else None)
    done = store.is_complete(store.stage_dir(cfg.runs_root, name, key))
    has_record = (results_dir(cfg) / key).exists()
    return key if done or not has_record else None


class _ToPrefect(logging.Handler):
    def __init__(self, target: logging.LoggerAdapter):
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        # Prefect's UI gets every record; its console handler only what console.on_console lets through.
        self.target.log(record.levelno, "%s", record.getMessage(), exc_info=record.exc_info,
                        extra={"console": on_console(record), "mft_logger": record.name})


@contextlib.contextmanager
def forward_mft_logs() -> Iterator[logging.LoggerAdapter]:
    """Send the library's `mft.*` log records to the task's Prefect logger (UI, `prefect flow-run logs`,
    and the run log); the console shows only those mft_core.console.on_console lets through."""
    run_logger = get_run_logger()
    handler = _ToPrefect(run_logger)
    roots = [logging.getLogger(name) for name in MFT_LOGGERS]
    previous = [(root.level, root.propagate) for root in roots]
    for root in roots:
        root.setLevel(logging.INFO)
        root.propagate = False  # the Prefect logger prints it already; no second console line
        root.addHandler(handler)
    try:
        yield run_logger
    finally:
        for root, (level, propagate) in zip(roots, previous):
            root.removeHandler(handler)
            root.setLevel(level)
            root.propagate = propagate


def publish_stats_table(stage: str, rows: list[dict[str, Any]], description: str) -> None:
    """One Prefect table artifact per stage run (keys: lowercase letters, digits, dashes)."""
    if rows:
        create_table_artifact(key=f"{stage}-stats", table=rows, description=description)
