"""Full-state checkpoints: model (trainable weights only), optimizer, scheduler, every rank's
RNG (through accelerate's save_state), plus the trainer state (data position, best validation
loss, early-stopping counter, metric history) as JSON.

Atomic: written into `checkpoints/.tmp-step-N/`, marked COMPLETE, then renamed to
`checkpoints/step-N/`. A crash mid-save leaves only a `.tmp-` directory, which is never loaded
and is removed by the next save.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"


def checkpoints_dir(work_dir: Path) -> Path:
    return work_dir / "checkpoints"


def checkpoint_path(work_dir: Path, step: int) -> Path:
    return checkpoints_dir(work_dir) / f"step-{step:07d}"


def complete_checkpoints(work_dir: Path) -> list[Path]:
    root = checkpoints_dir(work_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / COMPLETE).is_file() and (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(work_dir: Path) -> Path | None:
    done = complete_checkpoints(work_dir)
    return done[-1] if done else None


def trainable_names(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def install_trainable_only_hooks(accelerator) -> None:
    """accelerate's save_state writes the whole state dict; for LoRA that is the frozen base
    model again at every checkpoint. Keep only the trainable weights (the base comes from the
    base model on resume). DeepSpeed saves through its engine and is left as it is."""

    def keep_trainable(models, weights, output_dir):
        for model, state in zip(models, weights):
            names = trainable_names(model)
            for key in [k for k in state if k not in names]:
                del state[key]

    accelerator.register_save_state_pre_hook(keep_trainable)


def save_checkpoint(accelerator, work_dir: Path, step: int, trainer_state: dict[str, Any], keep: int,
                    protect: int | None, deepspeed: bool) -> Path:
    """Save on every rank; the main process publishes it and prunes to the newest `keep`
    checkpoints plus `protect` (the best one). DeepSpeed's engine saves without the frozen base
    (for LoRA the base model supplies it on resume; the trainable weights are all it saves)."""
    final = checkpoint_path(work_dir, step)
    tmp = final.with_name(".tmp-" + final.name)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        for stale in checkpoints_dir(work_dir).glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), **({"exclude_frozen_parameters": True} if deepspeed else {}))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1) + "\n")
        (tmp / COMPLETE).write_text("ok\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        done = complete_checkpoints(work_dir)
        keep_set = set(done[-keep:]) | ({checkpoint_path(work_dir, protect)} if protect else set())
        for old in done:
            if old not in keep_set:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, checkpoint: Path, strict_keys: set[str], deepspeed: bool) -> dict[str, Any]:
    """Restore everything saved by save_checkpoint; returns the trainer state. The model's state
    dict holds only the trainable weights: loaded non-strictly (DeepSpeed's engine names that
    `load_module_strict`; given `strict` it fails with a TypeError), then checked here."""
    if deepspeed:
        accelerator.load_state(str(checkpoint), load_module_strict=False)
    else:
        accelerator.load_state(str(checkpoint), strict=False)
    saved = _saved_model_keys(checkpoint)
    if saved is not None and saved != strict_keys:
        missing, unexpected = sorted(strict_keys - saved)[:5], sorted(saved - strict_keys)[:5]
        raise RuntimeError(f"checkpoint {checkpoint} does not match the model's trainable weights "
                           f"(missing {missing}, unexpected {unexpected}); was the config changed?")
    return json.loads((checkpoint / STATE_FILE).read_text())


def _saved_model_keys(checkpoint: Path) -> set[str] | None:
    path = checkpoint / "model.safetensors"
    if not path.is_file():
        return None  # DeepSpeed layout: the engine checks its own state
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())
