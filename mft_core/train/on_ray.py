"""Training under Ray Train (config section `cluster:`): the same recipe, started by the workers
of Ray Train's TorchTrainer instead of `accelerate launch`.

Ray places train.launch.num_processes workers on the cluster's nodes (cluster.placement), sets
up their process group (gloo on CPU, NCCL on GPUs) and their RANK / WORLD_SIZE / LOCAL_RANK, which
the recipe's accelerator picks up; DeepSpeed and FSDP come from train_job.json
(recipe.make_accelerator), as under every launcher. The workers read and write the stage's work
folder on shared storage (runs_root): checkpoints go there and a later run resumes from the newest
complete one, as on one machine. This process, the driver, alone publishes the output.

A worker lost mid-run fails the run (Ray restarts nothing: max_failures 0) with the reason; the
checkpoints stay, and the next run of the same key resumes from the newest. Rank 0 writes its
output to the stage's log in the work folder; the driver follows that file for the progress
reports and the run's log. Each worker adds a line to ray-workers.jsonl in the work folder (kept
in the output): its rank, Ray node, host and process id.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from mft_core.cluster import connect
from mft_core.config import ClusterConfig, TrainConfig
from mft_core.train.launch import StepReport, TrainerFailed, TrainerOutput

log = logging.getLogger("mft.train")

WORKERS_FILE = "ray-workers.jsonl"  # where each rank ran: {"rank", "node_id", "host", "pid"} per worker start


class _Tee:
    """Rank 0's stdout: to Ray's worker log, as before, and to the stage's log the driver follows."""

    def __init__(self, stream, path: Path):
        self.stream, self.file = stream, open(path, "a", encoding="utf-8", buffering=1)

    def write(self, text: str) -> int:
        self.file.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.file.flush()
        self.stream.flush()


def worker_loop(settings: dict) -> None:
    """One Ray Train worker: the recipe's main on the work folder, in the trainer's environment."""
    for key in [k for k in os.environ if k.startswith("ACCELERATE_") and k != "ACCELERATE_TORCH_DEVICE"]:
        del os.environ[key]  # as trainer_command: nothing of a node's own accelerate setup takes part
    os.environ.update(settings["env"])
    import ray

    where = {"rank": int(os.environ["RANK"]), "node_id": ray.get_runtime_context().get_node_id(),
             "host": platform.node(), "pid": os.getpid()}
    with open(Path(settings["work_dir"]) / WORKERS_FILE, "a", encoding="utf-8") as file:
        file.write(json.dumps(where) + "\n")
    if where["rank"] == 0:
        sys.stdout = _Tee(sys.stdout, Path(settings["log_path"]))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout, force=True)
    importlib.import_module(settings["recipe"]).main(Path(settings["work_dir"]))
    sys.stdout.flush()


def worker_env(cfg: TrainConfig, cluster: ClusterConfig) -> dict[str, str]:
    threads = cfg.threads or max(1, int(cluster.cpus_per_worker))
    env = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads), "MFT_TRAIN_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    if cluster.gpus_per_worker == 0 and cfg.launch.backend == "ddp":
        env["ACCELERATE_USE_CPU"] = "true"  # DDP over gloo, as trainer_command on CPU
    return env


def follow(path: Path, output: TrainerOutput, stop: threading.Event) -> None:
    """Feed the lines appended to `path` into `output` until `stop` is set (then the rest)."""
    while not path.exists() and not stop.is_set():
        time.sleep(0.2)
    if not path.exists():
        return
    with open(path, encoding="utf-8") as file:
        pending = ""
        while True:
            chunk = file.read()
            pending += chunk
            *lines, pending = pending.split("\n")
            for line in lines:
                output.line(line)
            if not chunk:
                if stop.is_set():
                    return
                time.sleep(0.2)


def run_on_ray(cluster: ClusterConfig, cfg: TrainConfig, work_dir: Path, bf16: bool, log_path: Path,
               on_progress: Callable[[StepReport], None] | None, recipe_module: str) -> None:
    """The recipe on train.launch.num_processes Ray Train workers; returns when they are done."""
    if cfg.launch.backend == "fsdp" and cluster.gpus_per_worker == 0:
        raise ValueError("train.launch.backend=fsdp needs GPUs: set cluster.gpus_per_worker (or use ddp or deepspeed on CPU)")
    connect(cluster)
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    workers = cfg.launch.num_processes
    use_gpu = cluster.gpus_per_worker > 0
    resources = {"CPU": cluster.cpus_per_worker, **({"GPU": cluster.gpus_per_worker} if use_gpu else {})}
    storage = cluster.storage or work_dir.resolve().parent.parent / ".ray"
    settings = {"work_dir": str(work_dir.resolve()), "log_path": str(log_path.resolve()), "recipe": recipe_module,
                "env": worker_env(cfg, cluster)}
    trainer = TorchTrainer(
        worker_loop, train_loop_config=settings,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources,
                                     placement_strategy=cluster.placement.upper()),
        run_config=RunConfig(name=f"{work_dir.parent.name}-{work_dir.name}", storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=0)),
    )
    log.info("training on the Ray cluster %s: %d worker(s) of %s (placement %s)", cluster.address,
             workers, resources, cluster.placement)
    output, stop = TrainerOutput(on_progress), threading.Event()
    follower = threading.Thread(target=follow, args=(log_path, output, stop), daemon=True)
    follower.start()
    try:
        trainer.fit()
    except Exception as error:
        raise TrainerFailed(f"training on the Ray cluster failed: {type(error).__name__}: {error}\nlast lines of "
                            f"rank 0:\n{output.last_lines()}\nThe checkpoints stay in {work_dir}: the next run "
                            "resumes from the newest") from None
    finally:
        stop.set()
        follower.join()
