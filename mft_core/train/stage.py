"""Train stage: tokenized shards + base model -> fine-tuned adapter or model.

The stage writes `train_job.json` into its work directory and runs the trainer (recipe.py) as a
subprocess. The work directory survives a crash (the store keeps `<key>.partial/`), so the next
run with the same key resumes from the newest complete checkpoint. When training succeeds, the
checkpoints (optimizer state: large) are removed; the model, metrics and summary are published.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mft_core import store
from mft_core.config import PipelineConfig, TrainConfig
from mft_core.console import TrainingProgress, announce
from mft_core.hub import snapshot_of
from mft_core.modeling import resolve_model
from mft_core.store import FileHashCache
from mft_core.train.launch import StepReport, cuda_available, run_trainer, start_trainer, trainer_command

log = logging.getLogger("mft.train")

STAGE_VERSION = 4  # 4: the paper's focal losses, CoBa on fixed measurement batches, MoE balance over real tokens (3: bf16 base, fp32 logits, DeepSpeed accumulation; 2: sdpa_varlen)
# Keys that change how training runs, not what it computes.
_NOT_IN_KEY = ("threads", "allocator", "checkpoint_every", "keep_checkpoints")
_LAUNCH_NOT_IN_KEY = ("machine_rank", "main_process_ip", "main_process_port")


def model_digest(model_dir: Path, hashes: FileHashCache) -> str:
    """Content of the base model: weights and config (by (size, mtime)-cached sha256); for a
    snapshot in the Hugging Face cache, ``hub:<repo_id>@<commit>`` (its blobs are content-addressed
    and the commit pins them, so a moved branch changes the digest and a pinned commit never does)."""
    hub_snapshot = snapshot_of(model_dir)
    if hub_snapshot is not None and hub_snapshot[1] == "":
        return f"hub:{hub_snapshot[0].pinned}"
    parts = []
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and (path.suffix in (".safetensors", ".bin") or path.name == "config.json"):
            parts.append(f"{path.name}:{hashes.digest(path)}")
    return ";".join(parts)


def train_key_parts(cfg: PipelineConfig, hashes: FileHashCache) -> tuple[dict[str, Any], list[str]]:
    section = cfg.stage_section("train")
    for key in _NOT_IN_KEY:
        section.pop(key)
    for key in _LAUNCH_NOT_IN_KEY:
        section["launch"].pop(key)
    # Settings that have no effect in the chosen mode stay out of the key (they are kept beside the
    # output, in config.json): changing them must not retrain.
    train = cfg.train
    if train.loss not in ("focal_sample", "focal_task"):
        section.pop("focal_gamma")
    if train.loss != "coba":
        section.pop("coba")
    if train.sampling != "temperature":
        section.pop("sampling_alpha")
    if train.launch.backend != "deepspeed":
        section["launch"].pop("zero_stage")
    if train.method == "full":
        section.pop("lora")
    if train.tasks is None:
        section.pop("tasks")  # every task, as before the key existed: earlier outputs stay valid
    section["task_weights"] = {t.task_name: t.weight for t in cfg.data.tasks if t.kind == "sft"}
    model_dir = resolve_model(cfg.model.path, cfg.runs_root)
    return section, [f"model:{model_digest(model_dir, hashes)}"]


def describe_training(cfg: PipelineConfig, precision: str) -> str:
    """The start line: `16 steps, LoRA r16 on smollm2-135m-instruct, fp32, 1 process`."""
    train, launch = cfg.train, cfg.train.launch
    length = f"{train.max_steps} steps" if train.max_steps else f"{train.epochs} epoch(s)"
    if train.method == "full":
        method = "full fine-tuning"
    else:
        method = f"{'Q' if train.method == 'qlora' else ''}{'DoRA' if train.lora.dora else 'LoRA'} r{train.lora.r}"
    processes = launch.num_processes * launch.num_machines
    where = f"{processes} process{'es' if processes > 1 else ''}"
    if cfg.cluster is not None:
        where = f"{processes} Ray Train worker{'s' if processes > 1 else ''} on the cluster {cfg.cluster.address}"
    if launch.backend == "deepspeed":
        where += f" (DeepSpeed ZeRO-{launch.zero_stage})"
    elif launch.backend == "fsdp":
        where += " (FSDP)"
    tasks = f" (tasks {', '.join(train.tasks)})" if train.tasks is not None else ""
    return f"{length}, {method} on {cfg.model.path}{tasks}, {precision}, {where}"


def write_train_job(cfg: PipelineConfig, tokenize_dir: Path, work_dir: Path) -> dict[str, Any]:
    """train_job.json, everything the trainer reads (recipe.main(work_dir) runs from it alone)."""
    model_dir = resolve_model(cfg.model.path, cfg.runs_root)
    weights = {t.task_name: t.weight for t in cfg.data.tasks}
    tasks = [{**t, "weight": weights[t["name"]]} for t in _tokenized_tasks(tokenize_dir)]
    from mft_core.train.model import resolve_precision  # imports torch: only when training

    # Resolved once, here: `auto` may measure the CPU, and every process must train in the same
    # precision; a resumed run keeps the precision its checkpoints were trained in.
    job_file = work_dir / "train_job.json"
    earlier = json.loads(job_file.read_text()).get("precision") if job_file.is_file() else None
    precision = earlier if earlier and cfg.train.precision == "auto" else resolve_precision(
        cfg.train.precision, cuda_available(), cfg.train.method)
    # Paths inside the runs root are stored relative to it: the train output (and so the keys of
    # the stages after it) must not depend on where the project is checked out.
    job = {
        "model_dir": _relative_to_runs(model_dir, cfg.runs_root),
        "tokenize_dir": _relative_to_runs(tokenize_dir, cfg.runs_root),
        "tasks": tasks,
        "train": cfg.stage_section("train"),
        "precision": precision,
        "trust_remote_code": cfg.model.trust_remote_code,  # allows the model's own code (not in the key)
    }
    # Atomically: the other machines of a multi-machine run read it to join (join_training).
    store.write_text_atomic(job_file, json.dumps(job, indent=1) + "\n")
    return job


def step_reporter(on_progress: Callable[[int, int, str], None] | None, stage: str = "train") -> Callable[[StepReport], None]:
    """The trainer's step reports -> a throttled progress line on the console and to `on_progress`."""
    progress = TrainingProgress()

    def on_report(report: StepReport) -> None:
        line = progress.update(report.step, report.total, report.loss, report.tokens_per_s)
        if line is not None:
            announce(log, stage, line)
            if on_progress is not None:
                on_progress(report.step, report.total, line)

    return on_report


def run_train(cfg: PipelineConfig, tokenize_dir: Path, work_dir: Path,
              on_progress: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
    precision = write_train_job(cfg, tokenize_dir, work_dir)["precision"]
    announce(log, "train", "start: " + describe_training(cfg, precision))
    start_trainer(cfg.cluster, cfg.train, work_dir, precision == "bf16", work_dir / "train.log", step_reporter(on_progress))
    for required in ("model", "train_summary.json", "metrics.jsonl"):
        if not (work_dir / required).exists():
            raise RuntimeError(f"the trainer exited 0 but wrote no {required} in {work_dir}")
    shutil.rmtree(work_dir / "checkpoints", ignore_errors=True)
    (work_dir / "train.log").unlink(missing_ok=True)  # streamed into the run's log already
    (work_dir / "accelerate.yaml").unlink(missing_ok=True)
    return json.loads((work_dir / "train_summary.json").read_text())


def join_training(cfg: PipelineConfig, key: str, on_progress: Callable[[int, int, str], None] | None = None,
                  stage: str = "train", trainer_cfg: TrainConfig | None = None,
                  recipe_module: str = "mft_core.train.recipe") -> store.StageRun:
    """Machine rank > 0 of a multi-machine run: join the training machine 0 builds (train's, or
    align's with its trainer config and recipe). Machine 0 is
    the only one that takes the store's lock and publishes (two machines building the same key on
    shared storage would wait on each other's lock forever, or both publish); this one waits for
    machine 0's train_job.json in the key's work directory, runs its own processes of the same
    launch into that directory (checkpoint shards and RNG states are per process), and returns
    once machine 0 has published the output. Its launch files and log stay on this machine."""
    rank = cfg.train.launch.machine_rank
    final = store.stage_dir(cfg.runs_root, stage, key)
    work = final.with_name(final.name + ".partial")
    job_file = work / "train_job.json"
    announce(log, stage, f"machine {rank}: waiting for machine 0 to start training {final.name} in {work}")
    store.wait_until(lambda: store.is_complete(final) or job_file.is_file(),
                     f"machine 0 did not start training {final.name} within {store.MACHINE_WAIT_S:.0f} s ({job_file} is "
                     "missing): start the same command there with train.launch.machine_rank=0, on the same shared runs_root")
    if store.is_complete(final):
        announce(log, stage, f"machine {rank}: already trained by machine 0: {final}")
        return store.StageRun(final, key, computed=False)
    precision = json.loads(job_file.read_text())["precision"]
    local = Path(tempfile.mkdtemp(prefix=f"mft-{stage}-machine{rank}-"))
    argv, env = trainer_command(trainer_cfg or cfg.train, work, precision == "bf16", launch_dir=local,
                                recipe_module=recipe_module)
    announce(log, stage, f"machine {rank}: joining: " + describe_training(cfg, precision))
    try:
        run_trainer(argv, env, local / f"{stage}.log", step_reporter(on_progress, stage))
    finally:
        shutil.rmtree(local, ignore_errors=True)
    store.wait_until(lambda: store.is_complete(final),
                     f"machine 0 did not publish {final} within {store.MACHINE_WAIT_S:.0f} s after training ended: see its log")
    announce(log, stage, f"machine {rank}: done; machine 0 published {final}")
    return store.StageRun(final, key, computed=False)


def _relative_to_runs(path: Path, runs_root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(runs_root.resolve()).as_posix()
    except ValueError:
        return str(path)


def job_path(value: str, work_dir: Path) -> Path:
    """A path of train_job.json: relative ones are inside the runs root (runs/train/<key>/..)."""
    path = Path(value)
    return path if path.is_absolute() else work_dir.resolve().parent.parent / path


def _tokenized_tasks(tokenize_dir: Path) -> list[dict[str, Any]]:
    """Task names, ids (in id order) and kinds (preference tasks only), from the shard index of
    the tokenize stage."""
    seen: dict[int, dict[str, Any]] = {}
    for shard in json.loads((tokenize_dir / "shards.json").read_text()):
        seen[shard["task_id"]] = {"name": shard["task"], "id": shard["task_id"],
                                  **({"kind": "preference"} if shard.get("kind") == "preference" else {})}
    return [seen[i] for i in sorted(seen)]


def trained_task_ids(job: dict[str, Any], kind: str, names: list[str] | None = None) -> list[int]:
    """The ids of the tasks of `kind` (sft: train's; preference: align's), among `names` when given."""
    return [t["id"] for t in job["tasks"] if t.get("kind", "sft") == kind and (names is None or t["name"] in names)]
