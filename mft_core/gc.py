"""`mft gc`: stage outputs that no current config or deployment refers to.

Every config change leaves full outputs behind (a merged model, a training's checkpoints). The
configs that count: the one given with --config, pipeline.yaml, configs/*.yaml, the arms of
experiments/*.yaml and the configs (with their overrides) of prefect.yaml's deployments, all
relative to the project root. For each, the key of every stage is computed as a run would
(mft_core.status); an output in one of their runs roots under any other key is garbage, with
its `.partial` work directory, its lock file and its Prefect result record (`.prefect-results/<key>`).

Never removed: the outputs of stages whose key could not be computed for some config (they may
be that config's), and anything whose lock a running build holds (a `.partial` being written).
A config that does not load stops `--delete`: its runs root and keys are unknown.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mft_core import store
from mft_core.config import load_config
from mft_core.eval.stage import BASE_STAGE
from mft_core.experiment import load_experiment
from mft_core.stages import STAGE_ORDER
from mft_core.status import built_time, format_size, lock_path, pipeline_status, tree_size

_ENTRY = re.compile(r"^([0-9a-f]{%d})(\.partial|\.lock|\.stale-\d+)?$" % store.KEY_LENGTH)


@dataclass
class Garbage:
    stage: str
    key16: str
    output: Path  # runs/<stage>/<key16>, present or not
    paths: list[Path]  # the output, its .partial and .stale- directories, the lock file, result records
    size: int
    what: str  # output | partial | output + partial | ...
    built: str | None


@dataclass
class Plan:
    garbage: list[Garbage] = field(default_factory=list)
    in_use: list[Path] = field(default_factory=list)  # unreferenced, but a build holds the lock
    configs: list[str] = field(default_factory=list)  # what was taken as referenced
    protected: list[str] = field(default_factory=list)  # stages kept whole, and why
    unloadable: list[str] = field(default_factory=list)  # configs that did not load: no --delete

    @property
    def size(self) -> int:
        return sum(g.size for g in self.garbage)


def referring_configs(project: Path, extra: str | None = None) -> tuple[list[tuple[Path, dict[str, Any], str]], list[str]]:
    """(config path, overrides, where it comes from) of every config that keeps its outputs, the
    arms of every experiment included; and the experiments that did not load."""
    found: list[tuple[Path, dict[str, Any], str]] = []
    experiments: list[tuple[Path, dict[str, Any], str]] = []
    if extra:
        found.append((Path(extra), {}, "--config"))
    found.append((project / "pipeline.yaml", {}, "pipeline.yaml"))
    found.extend((path, {}, f"configs/{path.name}") for path in sorted((project / "configs").glob("*.yaml")))
    experiments.extend((path, {}, f"experiments/{path.name}") for path in sorted((project / "experiments").glob("*.yaml")))
    deployments_file = project / "prefect.yaml"
    if deployments_file.is_file():
        for deployment in yaml.safe_load(deployments_file.read_text()).get("deployments") or []:
            parameters = deployment.get("parameters") or {}
            origin = f"deployment {deployment.get('name')}"
            if deployment.get("entrypoint", "").endswith(":mft_experiment"):
                experiments.append((project / parameters.get("config", "experiments/paper.yaml"),
                                    parameters.get("overrides") or {}, origin))
            else:
                config = project / parameters.get("config", "pipeline.yaml")  # the flow's default
                found.append((config, parameters.get("overrides") or {}, origin))
    failed = []
    for path, overrides, origin in experiments:
        try:
            experiment = load_experiment(path, overrides)
        except Exception as err:  # noqa: BLE001 - reported; it blocks --delete
            failed.append(f"{origin} ({path}): {type(err).__name__}: {err}")
            continue
        found.extend((experiment.base_config, run.overrides, f"{origin} arm {run.label}") for run in experiment.runs)
    unique: dict[tuple[str, str], tuple[Path, dict[str, Any], str]] = {}
    for path, overrides, origin in found:
        unique.setdefault((str(path.resolve()), json.dumps(overrides, sort_keys=True)), (path, overrides, origin))
    return list(unique.values()), failed


def plan_gc(project: Path, extra: str | None = None) -> Plan:
    plan = Plan()
    configs, plan.unloadable = referring_configs(project, extra)
    keep: dict[Path, set[tuple[str, str]]] = {}
    protect: dict[Path, set[str]] = {}
    for path, overrides, origin in configs:
        try:
            cfg = load_config(path, overrides)
        except Exception as err:  # noqa: BLE001 - reported; it blocks --delete
            plan.unloadable.append(f"{origin} ({path}): {type(err).__name__}: {err}")
            continue
        plan.configs.append(origin)
        root = cfg.runs_root.resolve()
        keep.setdefault(root, set())
        protect.setdefault(root, set())
        for status in pipeline_status(cfg, convert_models=True):
            if status.key:
                keep[root].add((status.stage, status.key[: store.KEY_LENGTH]))
            if status.stage == "evaluate":
                base = _base_evaluation_of(status)
                if base is not None:
                    keep[root].add((BASE_STAGE, base))
                elif status.state != "complete" and cfg.evaluate.evaluate_base:
                    protect[root].add(BASE_STAGE)  # its coming evaluation may reuse any of them
            if status.state == "error":
                later = STAGE_ORDER[STAGE_ORDER.index(status.stage):]
                protect[root].update(later)
                plan.protected.append(f"{', '.join(later)} in {root}: {origin}: {status.note}")
                break
    for root in sorted(keep):
        for stage in (*STAGE_ORDER, BASE_STAGE):
            if stage not in protect[root]:
                _scan(plan, root, stage, keep[root])
    return plan


def _base_evaluation_of(status) -> str | None:
    """The key16 of the base model's shared evaluation (mft_core/eval/stage.py) that a finished
    evaluate output reports in its summary; None when there is none."""
    if status.state != "complete" or not status.directory:
        return None
    summary = Path(status.directory) / "summary.json"
    try:
        output = json.loads(summary.read_text())["models"]["base"]["evaluation_output"]
    except (OSError, KeyError, json.JSONDecodeError):
        return None
    return Path(output).name


def _scan(plan: Plan, root: Path, stage: str, keep: set[tuple[str, str]]) -> None:
    stage_root = root / stage
    if not stage_root.is_dir():
        return
    groups: dict[str, list[Path]] = {}
    for entry in stage_root.iterdir():
        match = _ENTRY.match(entry.name)
        if match and (stage, match.group(1)) not in keep:
            groups.setdefault(match.group(1), []).append(entry)
    records = root / store.PREFECT_RESULTS
    for key16, paths in sorted(groups.items()):
        final = stage_root / key16
        if store.lock_held(lock_path(final)):
            plan.in_use.append(partial_of(final))
            continue
        if records.is_dir():
            paths += sorted(records.glob(key16 + "*"))
        kinds = [name for name, present in (("output", store.is_complete(final)),
                                            ("partial", (stage_root / f"{key16}.partial").is_dir())) if present]
        plan.garbage.append(Garbage(stage, key16, final, sorted(paths), sum(_size(p) for p in paths),
                                    " + ".join(kinds) or "leftovers", built_time(final)))


def partial_of(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def _size(path: Path) -> int:
    return tree_size(path) if path.is_dir() else path.stat().st_size


def delete(plan: Plan) -> tuple[int, list[Garbage]]:
    """Remove the plan's garbage; returns (bytes freed, what a build started on meanwhile: kept)."""
    freed, skipped = 0, []
    for item in plan.garbage:
        lock = lock_path(item.output)
        # Held while removing: a build of this key that starts now waits, then builds afresh.
        with store.lock_or_skip(lock) as locked:
            if not locked:
                skipped.append(item)
                continue
            for path in item.paths:
                if path == lock:
                    continue
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
            lock.unlink(missing_ok=True)
            freed += item.size
    return freed, skipped


def format_plan(plan: Plan, deleted: bool) -> str:
    lines = []
    if plan.garbage:
        verb = "removed" if deleted else "no config refers to"
        lines.append(f"{len(plan.garbage)} stage output(s) {verb}, {format_size(plan.size)}:")
        rows = [("stage", "key", "what", "size", "built")] + [
            (g.stage, g.key16, g.what, format_size(g.size), g.built or "-") for g in plan.garbage]
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines.extend("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
        if not deleted:
            lines.append("Dry run: nothing removed. `mft gc --delete` removes them.")
    else:
        lines.append("Nothing to remove: every stage output belongs to a current config.")
    lines.extend(f"kept, a run is writing it: {path}" for path in plan.in_use)
    lines.extend(f"kept whole, key unknown: {text}" for text in plan.protected)
    lines.extend(f"config not loaded: {text}" for text in plan.unloadable)
    lines.append("Referring configs: " + ", ".join(plan.configs))
    return "\n".join(lines) + "\n"
