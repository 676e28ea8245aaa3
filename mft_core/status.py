"""`mft status`: where each stage of a config stands, read from the runs root alone.

For each stage, in order: its key for the config, and whether that output is complete (size, when
it was built), partial (`<key16>.partial/`: what is done so far, and whether a run is writing it
now: the store holds `<key16>.lock` while it builds) or missing. When the newest finished output
of a stage has another key, the key components that differ are listed: each output keeps what its
key hashed in key_parts.json (store.KEY_PARTS).

A stage's key needs its upstream output (the key hashes the upstream manifest), so below the first
missing stage the keys are unknown. Nothing is built or downloaded: a model the train key needs
that is not converted yet leaves the key unknown (`convert_models=True`, used by `mft gc`, converts it).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mft_core import store
from mft_core.config import PipelineConfig
from mft_core.stages import key_components, stage_chain, upstream_name

MODEL_STAGES = ("train", "align", "merge", "evaluate")  # their keys hash the base model's weights


@dataclass
class OtherOutput:
    """The newest finished output of a stage under another key, and why its key differs."""

    key16: str
    built: str | None
    differences: list[str]


@dataclass
class StageStatus:
    stage: str
    # complete | partial (unfinished, no run on it) | building (a run holds its lock) | missing;
    # key unknown: waiting (the upstream output is missing) | unknown (model not converted) | error
    state: str
    key: str | None = None  # the full key for this config (None: unknown, see `note`)
    directory: str | None = None
    size_bytes: int | None = None
    built: str | None = None  # UTC, from the output's _SUCCESS
    progress: str | None = None  # a partial output: what is done
    note: str | None = None  # why the key is unknown
    other: OtherOutput | None = None
    parts: dict[str, Any] | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("parts")
        return data


def pipeline_status(cfg: PipelineConfig, convert_models: bool = False) -> list[StageStatus]:
    """The status of every stage for `cfg`."""
    result: list[StageStatus] = []
    upstream_dir: Path | None = None
    for name in stage_chain(cfg):
        parent = upstream_name(cfg, name)
        if parent is not None and upstream_dir is None:
            status = StageStatus(name, "waiting", note=f"its key needs {parent}'s output")
        else:
            try:
                if name in MODEL_STAGES and not convert_models and model_pending(cfg):
                    status = StageStatus(name, "unknown", note=f"the model {cfg.model.path} is not converted yet (training converts it)")
                else:
                    status = _stage_status(cfg, name, key_components(cfg, name, upstream_dir), upstream_dir)
            except Exception as err:  # noqa: BLE001 - a status reports, it does not stop
                status = StageStatus(name, "error", note=f"key not computable: {type(err).__name__}: {err}")
        status.other = _newest_other(cfg.runs_root, name, status)
        result.append(status)
        upstream_dir = Path(status.directory) if status.state == "complete" else None
    return result


def model_pending(cfg: PipelineConfig) -> bool:
    from mft_core.modeling import conversion_pending

    return conversion_pending(cfg.model.path, cfg.runs_root)


def _stage_status(cfg: PipelineConfig, name: str, parts: dict[str, Any], upstream_dir: Path | None) -> StageStatus:
    key = store.stage_key(**parts)
    final = store.stage_dir(cfg.runs_root, name, key)
    status = StageStatus(name, "missing", key=key, parts=_as_json(parts))
    if store.is_complete(final):
        status.state, status.directory = "complete", str(final)
        status.size_bytes, status.built = tree_size(final), built_time(final)
        return status
    partial = final.with_name(final.name + ".partial")
    if partial.is_dir():
        status.state = "building" if store.lock_held(lock_path(final)) else "partial"
        status.directory, status.size_bytes = str(partial), tree_size(partial)
        status.progress = describe_partial(name, partial, cfg, upstream_dir)
    return status


def lock_path(output: Path) -> Path:
    """The lock file the store holds while it builds `output` (store.build_stage)."""
    return output.with_name(output.name + ".lock")


def tree_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:  # a file removed while we walk (a build is running)
                pass
    return total


def built_time(directory: Path) -> str | None:
    """When the output was published: the timestamp its _SUCCESS holds, in UTC."""
    try:
        stamp = datetime.strptime((directory / store.SUCCESS).read_text().strip(), "%Y-%m-%dT%H:%M:%S%z")
    except (OSError, ValueError):
        return None
    return stamp.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def describe_partial(name: str, work: Path, cfg: PipelineConfig, upstream_dir: Path | None) -> str:
    """What an unfinished build has done so far, from the files the stage writes as it goes."""
    try:
        if name == "tokenize":
            return _tokenize_progress(work, cfg, upstream_dir)
        if name == "train":
            return _train_progress(work)
        if name == "evaluate":
            return _evaluate_progress(work, cfg)
    except Exception as err:  # noqa: BLE001 - a status reports, it does not stop
        return f"progress unknown ({type(err).__name__}: {err})"
    return "not resumable: a rerun starts it again"


def _tokenize_progress(work: Path, cfg: PipelineConfig, ingest_dir: Path | None) -> str:
    from mft_core.data.tokenize import plan_chunks

    # A shard is done when its .stats.json (written last) and its .arrow are there.
    done = [p for p in work.glob("*/*.stats.json") if p.with_name(p.name[: -len(".stats.json")] + ".arrow").is_file()]
    total = len(plan_chunks(ingest_dir, cfg.tokenize.shard_size_mb)) if ingest_dir else "?"
    return f"{len(done)} of {total} shards done"


def _train_progress(work: Path) -> str:
    from mft_core.train.checkpoint import complete_checkpoints

    total = None
    hyper = work / "hyperparameters.json"
    if hyper.is_file():
        total = json.loads(hyper.read_text()).get("total_steps")
    step = 0
    metrics = work / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the line being written
                continue
            if "loss" in record:
                step = max(step, int(record["step"]))
    checkpoints = complete_checkpoints(work)
    text = f"step {step} of {total if total is not None else '?'}"
    if checkpoints:
        newest = checkpoints[-1]
        text += f", newest checkpoint {newest.name} ({int(newest.name.split('-')[1])} steps: a rerun resumes there)"
    else:
        text += ", no checkpoint yet (a rerun starts from step 0)"
    return text


def _evaluate_progress(work: Path, cfg: PipelineConfig) -> str:
    from mft_core.eval.stage import EXECUTION_DIR, GENERATIONS, select_evaluation_problems

    # The fine-tuned model's samples (the base model's evaluation is its own output, evaluate-base).
    total = len(select_evaluation_problems(cfg)) * cfg.evaluate.samples_per_problem
    generated = _count_lines(work / GENERATIONS)
    executed = sum(_count_lines(path) for path in (work / EXECUTION_DIR).glob("*.jsonl"))
    return f"{generated} of {total} samples generated, {executed} of {total} executed"


def _count_lines(path: Path) -> int:
    if not path.is_file():
        return 0
    with open(path, "rb") as fh:
        return sum(1 for line in fh if line.endswith(b"\n"))


# ----------------------------------------------------------------------------- other keys


def _newest_other(runs_root: Path, name: str, status: StageStatus) -> OtherOutput | None:
    """The newest finished output of `name` whose key is not this config's, with the differences."""
    stage_root = runs_root / name
    if not stage_root.is_dir():
        return None
    own = status.key[: store.KEY_LENGTH] if status.key else None
    finished = [d for d in stage_root.iterdir()
                if d.name != own and len(d.name) == store.KEY_LENGTH and store.is_complete(d)]
    if not finished:
        return None
    newest = max(finished, key=lambda d: (d / store.SUCCESS).stat().st_mtime_ns)
    if status.state == "complete" and (newest / store.SUCCESS).stat().st_mtime_ns <= (Path(status.directory) / store.SUCCESS).stat().st_mtime_ns:
        return None  # this config's output is the newest one
    recorded = newest / store.KEY_PARTS
    if not recorded.is_file():
        differences = ["its key components were not recorded (built before key_parts.json existed)"]
    elif status.parts is None:
        differences = [f"this config's key is unknown ({status.note})"]
    else:
        differences = key_differences(json.loads(recorded.read_text()), status.parts)
    return OtherOutput(newest.name, built_time(newest), differences)


def key_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two keys' components (key_parts.json), one line per difference."""
    stage = new["stage"]
    lines = []
    if old.get("version") != new.get("version"):
        lines.append(f"{stage} STAGE_VERSION: {old.get('version')} -> {new.get('version')}")
    before, after = _flatten(old.get("config")), _flatten(new.get("config"))
    for path in sorted(set(before) | set(after)):
        if before.get(path, _ABSENT) != after.get(path, _ABSENT):
            label = path if path.split(".")[0] == stage else f"{stage}.{path}" if path else stage
            lines.append(f"config {label}: {_show(before.get(path, _ABSENT))} -> {_show(after.get(path, _ABSENT))}")
    inputs_before, inputs_after = _inputs(old.get("inputs", [])), _inputs(new.get("inputs", []))
    for label in sorted(set(inputs_before) | set(inputs_after)):
        if label not in inputs_after:
            lines.append(f"input {label}: gone")
        elif label not in inputs_before:
            lines.append(f"input {label}: new")
        elif inputs_before[label] != inputs_after[label]:
            if label == "upstream":
                lines.append("input upstream: the output of the stage before it differs (see that stage)")
            else:
                lines.append(f"input {label}: content changed")
    return lines or ["the same components (the key was computed differently: a STAGE_VERSION bump without a record?)"]


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


_ABSENT = _Absent()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def _show(value: Any) -> str:
    if value is _ABSENT:
        return "(absent)"
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _inputs(items: list[str]) -> dict[str, str]:
    """Input digests by label: `model:<...>`, `upstream:<sha>`, `<task>/<file>:<sha>` (a file name
    may hold a colon: task files split at the last one)."""
    labelled = {}
    for item in items:
        label, _, value = item.partition(":")
        if "/" in label:
            label, value = item.rsplit(":", 1)
        labelled[label] = value
    return labelled


def _as_json(value: Any) -> Any:
    """As it reads back from key_parts.json (paths and other values as strings)."""
    return json.loads(json.dumps(value, default=str))


# ----------------------------------------------------------------------------- printing


def format_size(size: int | None) -> str:
    if size is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return "-"


def format_status(statuses: list[StageStatus], config: str, runs_root: Path) -> str:
    lines = [f"config {config}, runs root {runs_root}", ""]
    rows = [("stage", "key", "state", "size", "built", "")]
    for s in statuses:
        details = s.progress or s.note or ""
        rows.append((s.stage, s.key[: store.KEY_LENGTH] if s.key else "-", s.state, format_size(s.size_bytes),
                     s.built or "-", details))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row, status in zip(rows, [None, *statuses]):
        lines.append(("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[5]).rstrip())
        if status is not None and status.other is not None:
            other = status.other
            lines.append(f"    newest {status.stage} output is another key, {other.key16} (built {other.built or '?'}):")
            lines.extend(f"      {difference}" for difference in other.differences)
    return "\n".join(lines).rstrip() + "\n"
