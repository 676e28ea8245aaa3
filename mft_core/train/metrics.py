"""Training metrics: `metrics.jsonl` (the source of truth), TensorBoard events, and a PNG of the
per-task train and validation loss curves."""

from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Any


def peak_rss_mb() -> float:
    """This process's own peak resident memory (MB): VmHWM, the high-water mark of its address
    space. Not getrusage's ru_maxrss: after fork/vfork + exec that keeps the *parent's* RSS at
    spawn time (a trainer started by a 3 GB process reports 3 GB before it allocates anything)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


class MetricsLog:
    """Appends one JSON object per line. On resume, lines of steps after the checkpoint (written
    before a crash, then redone) are dropped first, so every step appears once."""

    def __init__(self, work_dir: Path, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = work_dir / "metrics.jsonl"
        self.writer = None
        self._last_validation: dict[str, float] | None = None
        if not enabled:
            return
        kept = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                record = json.loads(line)
                if record["step"] <= resume_step:
                    kept.append(line)
                    if "valid_task_loss" in record:
                        self._last_validation = record["valid_task_loss"]
        self.path.write_text("".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(work_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
        except ImportError:  # tensorboard is a dependency; a broken install should not stop training
            self.writer = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if "valid_task_loss" in record:
            self._last_validation = record["valid_task_loss"]
        if self.writer is not None:
            step = record["step"]
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(key, value, step)
                elif isinstance(value, dict):
                    for name, v in value.items():
                        if isinstance(v, (int, float)):
                            self.writer.add_scalar(f"{key}/{name}", v, step)

    def last_validation(self) -> dict[str, float] | None:
        return self._last_validation

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curves(metrics_path: Path, png_path: Path) -> None:
    """Per-task training loss (thin) and validation loss (markers) against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    weights = [r for r in records if "task_weight" in r]
    if weights:  # convergence balancing: the task weights under the losses
        fig, (ax, wax) = plt.subplots(2, 1, figsize=(8, 7), dpi=100, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    else:
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    tasks = sorted({t for r in records for t in r.get("task_loss", {})} | {t for r in records for t in r.get("valid_task_loss", {})})
    for index, task in enumerate(tasks):
        color = f"C{index % 10}"
        train = [(r["step"], r["task_loss"][task]) for r in records if task in r.get("task_loss", {})]
        valid = [(r["step"], r["valid_task_loss"][task]) for r in records if task in r.get("valid_task_loss", {})]
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.45, linewidth=1, label=f"{task} (train)")
        if valid:
            ax.plot(*zip(*valid), color=color, marker="o", linewidth=2, label=f"{task} (valid)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("token-mean loss")
    ax.set_title("per-task loss")
    ax.grid(alpha=0.3)
    if tasks:
        ax.legend(fontsize=8)
    if weights:
        for index, task in enumerate(tasks):
            points = [(r["step"], r["task_weight"][task]) for r in weights if task in r["task_weight"]]
            if points:
                wax.plot(*zip(*points), color=f"C{index % 10}", linewidth=1.5, label=task)
        wax.set_ylabel("task weight")
        wax.set_xlabel("optimizer step")
        wax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
