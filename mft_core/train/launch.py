"""Starting the trainer as a subprocess: plain `python -m` for one process, `accelerate launch`
for several (DDP on GPUs or on CPU with gloo), DeepSpeed ZeRO-2/3 or FSDP; the same command
spans several machines (num_machines, machine_rank, main_process_ip).

CPU traps this avoids (measured, reference/ml-stack.md §2-3): `accelerate launch --cpu
--num_processes 2` silently runs ONE process; several CPU processes need ACCELERATE_USE_CPU=true
with --multi_gpu; with DeepSpeed on CPU, ACCELERATE_USE_CPU must NOT be set (it disables
DeepSpeed) and the trainer must ask for the gloo backend. The trainer asserts the world size it
sees, so any other silent single-process mode fails loudly.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from mft_core.config import ClusterConfig, TrainConfig

log = logging.getLogger("mft.train")

# The trainer's report after each optimizer step (step 0: before the first; no loss yet).
PROGRESS = re.compile(r"^progress step=(\d+) total=(\d+)(?: loss=(\S+) tokens_per_s=(\S+))?")
# A warning or error of our own code in the trainer (its log format: "LEVEL name: message"): the
# console shows it; the rest of the trainer's output (libraries' warnings too) goes to the run log.
OWN_PROBLEM = re.compile(r"^(WARNING|ERROR|CRITICAL) mft[\w.]*: ")


@dataclass(frozen=True)
class StepReport:
    step: int
    total: int
    loss: float | None = None
    tokens_per_s: float | None = None


def parse_progress(line: str) -> StepReport | None:
    match = PROGRESS.match(line)
    if match is None:
        return None
    step, total, loss, speed = match.groups()
    return StepReport(int(step), int(total), float(loss) if loss else None, float(speed) if speed else None)


class TrainerFailed(RuntimeError):
    pass


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_config(cfg: TrainConfig, bf16: bool) -> dict:
    """ZeRO config with every value explicit (we prepare no dataloader, so no "auto" can be filled)."""
    zero: dict = {"stage": cfg.launch.zero_stage, "overlap_comm": False}
    if cfg.launch.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": cfg.rows_per_micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


TCMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
                  "/usr/lib64/libtcmalloc_minimal.so.4", "/usr/lib/libtcmalloc_minimal.so.4")


def find_tcmalloc() -> str | None:
    return next((path for path in TCMALLOC_PATHS if Path(path).is_file()), None)


def allocator_env(choice: str, env: dict[str, str]) -> dict[str, str]:
    """Environment that preloads tcmalloc into the trainer (and the processes it launches).

    Why: glibc malloc's heap fragments under the training loop's pattern of large, short-lived
    tensors: SmolLM2-135M, 1024-token rows on CPU peaked at 5.2 GB with glibc, 3.1 GB with
    tcmalloc, at the same or better speed (glibc with a fixed mmap threshold: 2.9 GB but 27%
    slower, from page faults). PyTorch's CPU performance guide recommends the same."""
    if choice == "system":
        return {}
    path = find_tcmalloc()
    if path is None:
        if choice == "tcmalloc":
            raise ValueError("train.allocator=tcmalloc, but libtcmalloc_minimal.so.4 is not installed: "
                             "`apt-get install libtcmalloc-minimal4` (scripts/install-toolchains.sh does it; make demo and make test "
                             "run that script), or set train.allocator: auto")
        log.info("allocator: glibc malloc (tcmalloc is not installed: apt-get install libtcmalloc-minimal4 lowers peak memory)")
        return {}
    log.info("allocator: tcmalloc (%s)", path)
    preload = " ".join(p for p in (path, env.get("LD_PRELOAD", "")) if p)
    # tcmalloc reports every allocation above 1 GB on stderr by default: not news here.
    return {"LD_PRELOAD": preload, "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


def trainer_command(cfg: TrainConfig, work_dir: Path, bf16: bool, launch_dir: Path | None = None,
                    recipe_module: str = "mft_core.train.recipe") -> tuple[list[str], dict[str, str]]:
    """argv and environment of the trainer (`recipe_module`: the fine-tuning recipe, or align's)
    for this config. The launch's own file (accelerate.yaml) goes to `launch_dir`
    (default: the work directory).

    Nothing of the user's own accelerate setup takes part: `accelerate launch` would merge
    ~/.cache/huggingface/accelerate/default_config.yaml into every setting its flags leave open,
    and the processes read ACCELERATE_* variables (a stray ACCELERATE_GRADIENT_ACCUMULATION_STEPS
    divides every loss). The environment loses every ACCELERATE_* variable, and the launch gets an
    explicit config file, work_dir/accelerate.yaml, holding the same settings as its flags."""
    launch = cfg.launch
    on_gpu = cuda_available()
    if launch.backend == "fsdp" and not on_gpu:
        raise ValueError("train.launch.backend=fsdp needs GPUs (accelerate enables FSDP only on GPU-like devices); "
                         "use ddp or deepspeed on CPU")
    cores = os.cpu_count() or 1
    threads = cfg.threads or max(1, cores // launch.num_processes)
    env = {key: value for key, value in os.environ.items() if not key.startswith("ACCELERATE_")}
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads), "MFT_TRAIN_THREADS": str(threads),
                "TOKENIZERS_PARALLELISM": "false"})
    env.update(allocator_env(cfg.allocator, env))
    recipe = ["-m", recipe_module, "--work-dir", str(work_dir)]
    single = launch.num_processes * launch.num_machines == 1
    if single and launch.backend == "ddp":
        return [sys.executable, *recipe], env

    settings = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": {"ddp": "MULTI_GPU", "deepspeed": "DEEPSPEED", "fsdp": "FSDP"}[launch.backend],
        "num_processes": launch.num_processes * launch.num_machines,
        "num_machines": launch.num_machines,
        "machine_rank": launch.machine_rank,
        "main_process_port": launch.main_process_port or free_port(),
        "mixed_precision": "bf16" if bf16 else "no",
        "gpu_ids": "all",
        "debug": False,
    }
    if launch.main_process_ip:
        settings["main_process_ip"] = launch.main_process_ip
    launch_dir = launch_dir or work_dir
    config_file = launch_dir / "accelerate.yaml"
    config_file.write_text(yaml.safe_dump(settings, sort_keys=False))
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file)]
    for key in ("num_processes", "num_machines", "machine_rank", "main_process_port", "mixed_precision"):
        argv += [f"--{key}", str(settings[key])]
    if launch.main_process_ip:
        argv += ["--main_process_ip", launch.main_process_ip]
    # DeepSpeed and FSDP themselves are set up by the recipe from train_job.json (recipe.make_accelerator),
    # as under every launcher; the flags below choose how `accelerate launch` starts the processes.
    if launch.backend == "deepspeed":
        argv += ["--use_deepspeed"]
        if launch.num_machines > 1:
            # accelerate's default for several machines is DeepSpeed's pdsh launcher, which starts every
            # machine's processes over ssh from machine 0; `standard` runs this machine's processes
            # here, like the other backends, each machine running the same command.
            argv += ["--deepspeed_multinode_launcher", "standard"]
    elif launch.backend == "fsdp":
        argv += ["--use_fsdp"]
    else:
        argv += ["--multi_gpu"]
        if not on_gpu:
            env["ACCELERATE_USE_CPU"] = "true"  # DDP over gloo
    return [*argv, *recipe], env


class TrainerOutput:
    """The trainer's output, line by line: into the run's log (our own code's warnings at their
    level), its progress reports to `on_progress`; the last lines are kept for an error message."""

    def __init__(self, on_progress: Callable[[StepReport], None] | None):
        self.on_progress = on_progress
        self.tail: collections.deque[str] = collections.deque(maxlen=40)

    def line(self, line: str) -> None:
        self.tail.append(line)
        problem = OWN_PROBLEM.match(line)
        log.log(logging.getLevelName(problem.group(1)) if problem else logging.INFO, "[trainer] %s", line)
        report = parse_progress(line)
        if report is not None and self.on_progress is not None:
            self.on_progress(report)

    def last_lines(self) -> str:
        return "\n".join(self.tail)


def run_trainer(argv: list[str], env: dict[str, str], log_path: Path,
                on_progress: Callable[[StepReport], None] | None = None) -> None:
    """Run the trainer, streaming its output line by line into the log (and `log_path`), its
    progress reports into `on_progress`; a non-zero exit raises TrainerFailed with the tail of the
    output."""
    log.info("launching trainer: %s", " ".join(argv))
    output = TrainerOutput(on_progress)
    # Not a new session: cancelling the flow run kills the worker's process group, trainer included.
    with open(log_path, "a", encoding="utf-8", buffering=1) as log_file, subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        try:
            for line in proc.stdout:
                line = line.rstrip("\n")
                log_file.write(line + "\n")
                output.line(line)
        except BaseException:
            proc.kill()
            raise
        code = proc.wait()
    if code != 0:
        raise TrainerFailed(f"trainer exited with code {code}; last lines:\n" + output.last_lines())


def start_trainer(cluster: ClusterConfig | None, cfg: TrainConfig, work_dir: Path, bf16: bool, log_path: Path,
                  on_progress: Callable[[StepReport], None] | None = None,
                  recipe_module: str = "mft_core.train.recipe") -> None:
    """Run a recipe on the work directory to the end: on this machine (`trainer_command`), or as
    Ray Train workers on the cluster of the `cluster:` section (train.on_ray)."""
    if cluster is not None:
        from mft_core.train.on_ray import run_on_ray

        run_on_ray(cluster, cfg, work_dir, bf16, log_path, on_progress, recipe_module)
        return
    argv, env = trainer_command(cfg, work_dir, bf16, recipe_module=recipe_module)
    run_trainer(argv, env, log_path, on_progress)
