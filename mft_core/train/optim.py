"""Optimizer parameter groups and the learning-rate schedule.

MFTCoder decays every parameter (norms and biases included), sizes its schedule in scheduler
ticks that accelerate advances N times per optimizer step (so with 8 processes the cosine
bottoms out at 1/8 of training and then climbs back up), and applies `min_lr` as a clamp on
group 0 only, which also lifts the start of the warmup (reference/mftcoder.md §4.3). Here:

  * weight decay applies to parameters of 2 or more dimensions (matrices: linear and embedding
    weights, LoRA A/B) and never to 1-D ones (biases, LayerNorm/RMSNorm weights, DoRA
    magnitudes), decided by shape so that every norm implementation is covered; embeddings are
    decayed, as in nanoGPT, torchtune and the HF Trainer;
  * the schedule's horizon is the number of optimizer steps, and it must be stepped once per
    optimizer step. Do not let accelerate step it: `accelerator.prepare(scheduler)` wraps it
    in an AcceleratedScheduler that steps it num_processes times per call unless the
    Accelerator was built with step_scheduler_with_optimizer=False (MFTCoder's defect);
  * `min_lr` is absolute and a true floor for every group: the decay ends exactly at it on the
    last step and stays there beyond.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import nn

log = logging.getLogger("mft.train")

SCHEDULES = ("cosine", "linear", "constant")


# ----------------------------------------------------------------------------- parameter groups


def split_decay_parameters(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of the trainable parameters (requires_grad) with and without weight decay.

    Shared (tied) parameters are listed once, under their first name.
    """
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(name)
    return decay, no_decay


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups of the trainable parameters: decayed (ndim >= 2) and not (ndim < 2).

    Frozen parameters (the base model under LoRA) are left out; empty groups are left out.
    The groups hold tensors only (no names, which some optimizer wrappers mishandle); the
    names are logged and available from `split_decay_parameters`.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    decay, no_decay = split_decay_parameters(model)
    if not decay and not no_decay:
        raise ValueError(
            "the model has no trainable parameter (requires_grad is False everywhere): with LoRA, check that "
            "train.lora target modules exist in the model"
        )
    by_name = dict(model.named_parameters())
    size = lambda names: sum(by_name[n].numel() for n in names)
    shown = ", ".join(no_decay[:8]) + (", ..." if len(no_decay) > 8 else "")
    log.info("weight decay %g on %d tensors (%d values); none on %d tensors (%d values): %s",
             weight_decay, len(decay), size(decay), len(no_decay), size(no_decay), shown)
    groups = [
        {"params": [by_name[n] for n in decay], "weight_decay": weight_decay},
        {"params": [by_name[n] for n in no_decay], "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


# ----------------------------------------------------------------------------- schedule


def total_optimizer_steps(epoch_steps: Sequence[int], max_steps: int | None) -> int:
    """Optimizer steps of the whole run: the sum of each epoch's own steps, capped by max_steps.

    Each epoch re-samples and re-packs, so epochs can pack to different step counts (temperature
    or weight sampling, and best-fit ties): taking one epoch's count times the epochs would stop
    early or leave the last validation out.
    """
    if not epoch_steps or any(steps < 0 for steps in epoch_steps):
        raise ValueError(f"need one step count >= 0 per epoch, got {list(epoch_steps)}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be at least 1 (or None for no cap), got {max_steps}")
    total = sum(epoch_steps)
    total = min(total, max_steps) if max_steps is not None else total
    if total < 1:
        raise ValueError(
            f"no optimizer step: {len(epoch_steps)} epoch(s) of {list(epoch_steps)} steps; add data or lower "
            "train.grad_accum / train.rows_per_micro_batch"
        )
    return total


def lr_at(step: int, base_lr: float, kind: str, warmup_steps: int, total_steps: int, min_lr: float) -> float:
    """The learning rate of optimizer step `step` (1-based: the first update is step 1).

    Warmup rises linearly from 0 at step 0 (before any update) to `base_lr` at step
    `warmup_steps`, so no update is spent at lr 0. Then cosine or linear decay from `base_lr`
    at the peak step (max(warmup_steps, 1)) to exactly `min_lr` at step `total_steps`, and
    `min_lr` after it. "constant" holds `base_lr` after the warmup (min_lr unused). A run of a
    single step with no warmup uses `base_lr`.
    """
    if warmup_steps > 0 and step <= warmup_steps:
        return base_lr * max(step, 0) / warmup_steps
    if kind == "constant":
        return base_lr
    peak = max(warmup_steps, 1)
    if total_steps <= peak:
        return base_lr
    progress = min(1.0, max(0.0, (step - peak) / (total_steps - peak)))
    if kind == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif kind == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
    return min_lr + (base_lr - min_lr) * shape


def make_scheduler(
    optimizer: torch.optim.Optimizer, kind: str, warmup_steps: int, total_steps: int, min_lr: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over exactly `total_steps` optimizer steps; call `.step()` once after each
    `optimizer.step()`. After k calls the groups' lr is that of update k + 1 (`lr_at(k + 1)`),
    scaled from each group's own base lr, with the same absolute `min_lr` floor for every group.

    On resume, rebuild it with the same arguments and load its state_dict: the factors are
    plain closures, so the state holds only the step count.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be at least 1, got {total_steps}")
    if warmup_steps < 0 or min_lr < 0:
        raise ValueError(f"warmup_steps and min_lr must be >= 0, got {warmup_steps} and {min_lr}")
    if kind != "constant" and warmup_steps >= total_steps:
        raise ValueError(
            f"warmup_steps ({warmup_steps}) must be fewer than the run's {total_steps} optimizer steps, or the "
            "decay never happens: lower train.warmup_steps (or train more steps)"
        )

    factors = []
    for number, group in enumerate(optimizer.param_groups):
        base_lr = float(group.get("initial_lr", group["lr"]))
        if kind != "constant" and base_lr < min_lr:
            raise ValueError(f"min_lr {min_lr} exceeds the lr {base_lr} of parameter group {number}: it cannot be a floor")
        factors.append(_factor(base_lr, kind, warmup_steps, total_steps, min_lr))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


def _factor(base_lr: float, kind: str, warmup_steps: int, total_steps: int, min_lr: float):
    # LambdaLR multiplies a group's base lr by factor(k) after k scheduler steps; k updates are
    # done, so the next one is update k + 1.
    def factor(k: int) -> float:
        return lr_at(k + 1, base_lr, kind, warmup_steps, total_steps, min_lr) / base_lr if base_lr else 0.0

    return factor
