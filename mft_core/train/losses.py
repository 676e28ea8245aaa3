"""Per-token losses and the multi-task loss modes, as global objectives of an optimizer step.

Vocabulary used below:
  * a *micro-batch* holds packed rows (several whole samples per row; a sample never spans rows,
    so never spans micro-batches);
  * an *accumulation group* (one optimizer step) is G micro-batches on each of W ranks;
  * a *trained token* is a position whose label is not IGNORE_INDEX (see `trained_positions`).

MFTCoder balances tasks inside one micro-batch on one rank (reference/mftcoder.md §3.2), so its
"task-balanced" loss depends on the batch size, G and W. Here the per-task token and sample counts
of the whole group are computed before the group starts (the loop knows all its micro-batches)
and summed over ranks (`group_counts`, `all_reduce_counts`). With those global denominators every
loss mode splits into per-micro-step contributions (`mft_loss`) that SUM, over the micro-steps
and ranks of the group, to the group's objective: the objective, and its gradient, do not depend
on how the group is cut into micro-batches and ranks. Under DDP the gradients are averaged over
ranks, so the loop multiplies each contribution by W before backward.

Loss modes (w_t = task weight; only the tasks present in the group count, T = that set; l_i is a
token's cross-entropy and p_i = exp(-l_i) the probability the model gives that target token):
  case1         token mean:          sum_i w_t(i) l_i / sum_i w_t(i)
  case2         sample mean:         sum_s w_t(s) L_s / sum_s w_t(s),   L_s = token mean of sample s
  case3         task token mean:     sum_{t in T} w_t L_t / sum_{t in T} w_t,  L_t = token mean of task t
  case4         task sample mean:    as case3 with L_t = mean over the task's samples of L_s
  focal_sample  sample focal:        sum_s w_t(s) g(P_s) / sum_s w_t(s),  P_s = mean of p_i over sample s
  focal_task    task focal:          sum_{t in T} w_t g(P_t) / sum_{t in T} w_t,  P_t = mean of p_i over task t
where g(P) = (1 - P)^gamma * (-log P): the MFTCoder paper's sample- and task-level focal losses
(arXiv 2311.02303; reference/mftcoder.md §3.9) on the ARITHMETIC mean of the token probabilities,
as the paper defines them (exp(-L_s), the geometric mean, would be another loss: it weighs a
sample's hardest tokens more). gamma = 0 gives -log P, not case2/case3 (by Jensen, -log P_s <=
L_s). With all weights 1, case1..case4 are MFTCoder's modes, computed over the whole group instead
of one micro-batch; MFTCoder's code has no focal loss. Weights combine as in MFTCoder: a weighted
mean normalized by the weights of what is present, so only weight ratios matter and a task absent
from the group changes nothing. In case1/case2 (where MFTCoder ignores the weights) a task weight
reweights that task's tokens or samples, so that every config key has an effect.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mft_core.data.pack import IGNORE_INDEX

LOSS_MODES = ("case1", "case2", "case3", "case4", "focal_sample", "focal_task")
_SAMPLE_MODES = ("case2", "case4", "focal_sample")

# ----------------------------------------------------------------------------- per-token losses


def trained_positions(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Bool [B, T]: True where labels[b, t] is a trained target.

    Labels follow the Hugging Face convention (not shifted in the batch, as `build_packed_row`
    writes them): labels[b, t] is the token to predict at position t, from the hidden state at
    position t - 1. Column 0 has nothing before it and is never trained, whatever its label
    (packed rows always hold IGNORE_INDEX there, and at every sample's first token, so no
    prediction crosses a sample boundary).
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be [batch, seq_length], got shape {tuple(labels.shape)}")
    mask = labels != ignore_index
    mask[:, 0] = False
    return mask


def trained_values(values: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """values[b, t] at the trained positions, flattened in row-major order: [N].

    The order matches `token_losses`, so `trained_values(task_ids, labels)` are the task ids of
    the per-token losses (task and sample ids are taken at the target token's position).
    """
    if values.shape != labels.shape:
        raise ValueError(f"values {tuple(values.shape)} and labels {tuple(labels.shape)} must have the same shape")
    mask = trained_positions(labels, ignore_index)
    return values[:, 1:][mask[:, 1:].to(values.device)]


def token_losses(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_size: int = 1024,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Cross-entropy of every trained token, [N] (order of `trained_values`), in fp32 or better.

    hidden: final hidden states [B, T, H]; weight: output embedding [V, H] (tied or not); bias:
    optional [V]; transform: optional map applied to each chunk of logits (logit scaling or
    soft-capping of some model families). The hidden state at t - 1 predicts labels[:, t].

    Only the trained positions are gathered, then processed chunk_size tokens at a time: logits
    in fp32 (fp64 if the inputs are fp64; a bf16 head weight is cast per chunk, a transient [V, H]
    copy), log-softmax, loss. Each chunk runs under non-reentrant activation checkpointing, so
    backward recomputes its logits instead of keeping them: peak extra memory is O(chunk_size x V)
    plus that weight copy, never [N, V]. Gradients equal those of the plain full-logits loss.
    A micro-batch with no trained token gives an empty tensor that is still attached to the graph,
    so backward reaches every parameter (DDP needs that on every rank).
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [batch, seq_length, hidden_size], got shape {tuple(hidden.shape)}")
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"labels {tuple(labels.shape)} must match hidden's [batch, seq_length] {tuple(hidden.shape[:2])}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(
            f"output weight must be [vocab, {hidden.shape[2]}], got shape {tuple(weight.shape)} (under DeepSpeed "
            "ZeRO-3 the head weight is partitioned outside its forward: gather it with deepspeed.zero.GatheredParameters)"
        )
    vocab = weight.shape[0]
    if bias is not None and bias.shape != (vocab,):
        raise ValueError(f"output bias must be [{vocab}], got shape {tuple(bias.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")

    mask = trained_positions(labels)[:, 1:].to(hidden.device)
    states = hidden[:, :-1][mask]  # [N, H]
    targets = labels[:, 1:].to(hidden.device)[mask]  # [N]
    compute_dtype = torch.promote_types(hidden.dtype, torch.float32)
    if targets.numel() == 0:
        return states.sum(dim=-1).to(compute_dtype)  # empty, but part of the graph
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise ValueError(
            f"label {bad} is outside the vocabulary [0, {vocab}) (only {IGNORE_INDEX} marks untrained positions)"
        )

    chunk_loss = partial(_chunk_cross_entropy, transform=transform, dtype=compute_dtype)
    recompute = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (states, weight, bias)
    )
    pieces = []
    for start in range(0, targets.numel(), chunk_size):
        args = (states[start : start + chunk_size], weight, bias, targets[start : start + chunk_size])
        pieces.append(checkpoint(chunk_loss, *args, use_reentrant=False) if recompute else chunk_loss(*args))
    return torch.cat(pieces)


def token_losses_through_module(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """`token_losses`, calling the output head module on each chunk instead of using its weight.

    For DeepSpeed ZeRO-3, where the head's weight is partitioned outside its module's own
    forward: calling the module lets ZeRO gather it (and again when backward recomputes the
    chunk). The logits come out in the head's dtype, outside autocast, and are cast to fp32.
    """
    mask = trained_positions(labels)[:, 1:].to(hidden.device)
    states = hidden[:, :-1][mask]
    targets = labels[:, 1:].to(hidden.device)[mask]
    if targets.numel() == 0:
        return states.sum(dim=-1).float()

    def chunk_loss(chunk_states: torch.Tensor, chunk_targets: torch.Tensor) -> torch.Tensor:
        # Outside autocast, in the head's own dtype: fp32 logits for an fp32 head; a bf16 engine's
        # head gives bf16 logits (its weight holds no more than that).
        with torch.autocast(chunk_states.device.type, enabled=False):
            logits = head(chunk_states.to(head.weight.dtype)).float()
            if transform is not None:
                logits = transform(logits)
            return F.cross_entropy(logits, chunk_targets, reduction="none")

    # Reentrant checkpointing: the recomputation calls the head module again inside backward,
    # where ZeRO-3's hooks gather its weight anew (the non-reentrant variant rejects that). Only for
    # a frozen head: each recomputation is a backward of its own, and a trainable head's gradient
    # would reach ZeRO-3 once per chunk (and once more through tied input embeddings), which it
    # refuses. A trainable head (full fine-tuning) keeps every chunk's logits for backward.
    recompute = torch.is_grad_enabled() and states.requires_grad and not any(p.requires_grad for p in head.parameters())
    pieces = []
    for start in range(0, targets.numel(), chunk_size):
        args = (states[start : start + chunk_size], targets[start : start + chunk_size])
        pieces.append(checkpoint(chunk_loss, *args, use_reentrant=True) if recompute else chunk_loss(*args))
    return torch.cat(pieces)


def _chunk_cross_entropy(states, weight, bias, targets, *, transform, dtype):
    # Autocast (accelerate's bf16 mixed precision) would run this matmul in bf16 whatever the
    # inputs' dtype: 0.1-0.5 nat off on CPU. The logits are the one place that needs fp32.
    with torch.autocast(states.device.type, enabled=False):
        logits = F.linear(states.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
        if transform is not None:
            logits = transform(logits)
        return F.cross_entropy(logits, targets, reduction="none")


# ----------------------------------------------------------------------------- group counts


@dataclass(frozen=True)
class GroupCounts:
    """Per-task trained-token and sample counts of an accumulation group (int64 [K] each).

    Local after `group_counts`, global (all ranks) after `all_reduce_counts`. A sample counts
    once if it has at least one trained token. Per-sample token counts are not stored: a sample
    lies inside one micro-batch, so `mft_loss` counts them locally.
    """

    task_tokens: torch.Tensor
    task_samples: torch.Tensor

    @property
    def num_tasks(self) -> int:
        return int(self.task_tokens.numel())

    @property
    def total_tokens(self) -> int:
        return int(self.task_tokens.sum())

    @property
    def total_samples(self) -> int:
        return int(self.task_samples.sum())

    @property
    def present(self) -> torch.Tensor:
        """Bool [K]: tasks with at least one trained token in the group."""
        return self.task_tokens > 0

    def to(self, device: torch.device | str) -> "GroupCounts":
        return GroupCounts(self.task_tokens.to(device), self.task_samples.to(device))


def group_counts(micro_batches: Sequence[Mapping[str, torch.Tensor]], num_tasks: int) -> GroupCounts:
    """Local counts of one rank's micro-batches of a group, before any forward pass.

    Each micro-batch is a mapping with `labels`, `task_ids` and `sample_ids`, all [B, T]
    (`sample_ids`: any id that is distinct per sample within the micro-batch, as `collate`
    numbers them). Every trained token must carry a task id in [0, num_tasks).
    """
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be positive, got {num_tasks}")
    tokens = torch.zeros(num_tasks, dtype=torch.int64)
    samples = torch.zeros(num_tasks, dtype=torch.int64)
    for number, batch in enumerate(micro_batches):
        missing = [key for key in ("labels", "task_ids", "sample_ids") if key not in batch]
        if missing:
            raise ValueError(f"micro-batch {number} lacks {missing}: group_counts needs labels, task_ids and sample_ids")
        token_task = trained_values(batch["task_ids"], batch["labels"]).cpu()
        token_sample = trained_values(batch["sample_ids"], batch["labels"]).cpu()
        _check_task_ids(token_task, num_tasks, where=f"micro-batch {number}")
        tokens += torch.bincount(token_task, minlength=num_tasks)
        _, inverse, _ = torch.unique(token_sample, return_inverse=True, return_counts=True)
        sample_task = _task_of_each_sample(inverse, token_task, where=f"micro-batch {number}")
        samples += torch.bincount(sample_task, minlength=num_tasks)
    return GroupCounts(tokens, samples)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks with torch.distributed when it is initialized, else the tensor itself.

    Returns a new tensor on the input's device (the input is not modified). CPU tensors are
    moved to the current CUDA device for a NCCL-only process group, and back.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    backend = str(dist.get_backend())
    device = tensor.device
    if device.type == "cpu" and "nccl" in backend and "gloo" not in backend:
        device = torch.device("cuda", torch.cuda.current_device())
    work = tensor.detach().to(device, copy=True)
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(tensor.device)


def all_reduce_counts(counts: GroupCounts) -> GroupCounts:
    """Global counts of the group: the local counts summed over ranks (one collective)."""
    both = all_reduce_sum(torch.stack([counts.task_tokens, counts.task_samples]))
    return GroupCounts(both[0].clone(), both[1].clone())


# ----------------------------------------------------------------------------- loss modes


def mft_loss(
    mode: str,
    token_loss: torch.Tensor,
    token_task: torch.Tensor,
    token_sample: torch.Tensor,
    counts: GroupCounts,
    task_weights: torch.Tensor | None = None,
    gamma: float = 2.0,
    task_reference: torch.Tensor | None = None,
) -> torch.Tensor:
    """This micro-step's contribution (a scalar) to the group objective of `mode`.

    token_loss [N]: this micro-batch's per-token losses (`token_losses`); token_task,
    token_sample [N]: their task and sample ids (`trained_values`); counts: the GLOBAL counts of
    the group (`all_reduce_counts(group_counts(...))`); task_weights [K]: >= 0, default ones.

    The contributions of all micro-steps on all ranks SUM to the group objective (module doc),
    and so do their gradients. case1..case4 are linear in the token losses: each token gets a
    coefficient from the global counts. focal_sample is exact too: g is applied to a sample's
    mean token probability, and a sample lies in one micro-batch; the gradient flows through the
    focal factor (the true derivative of the objective).

    focal_task needs the task's mean token probability over the whole group, which a micro-step
    cannot see. It takes task_reference [K] (detached per-task mean token probabilities, nan
    allowed for absent tasks) and uses the first-order expansion of g around it:
        g(P_t) ~ g(R_t) + g'(R_t) (P_t - R_t),
    whose pieces are linear in the token probabilities (P_t is their mean over the group). The
    step's gradient is sum_t w_t g'(R_t) grad P_t / sum w_t, exactly the gradient of the
    focal_task objective when R_t = P_t, and the summed value then equals the objective. So the
    exact recipe is a no-grad pre-pass over the group's micro-batches with the same parameters
    (`per_task_loss_sums` of exp(-token_loss), `all_reduce_sum`, `task_mean_losses`).
    """
    if mode not in LOSS_MODES:
        raise ValueError(f"unknown loss mode {mode!r}; choose one of {', '.join(LOSS_MODES)}")
    if not (gamma >= 0 and gamma != float("inf")):
        raise ValueError(f"focal gamma must be finite and >= 0, got {gamma}")
    if token_loss.dim() != 1 or token_task.shape != token_loss.shape or token_sample.shape != token_loss.shape:
        raise ValueError(
            f"token_loss, token_task and token_sample must be 1-D of equal length, got {tuple(token_loss.shape)}, "
            f"{tuple(token_task.shape)} and {tuple(token_sample.shape)}"
        )
    num_tasks = counts.num_tasks
    device, dtype = token_loss.device, token_loss.dtype
    weights = _checked_task_weights(task_weights, num_tasks).to(device=device, dtype=dtype)
    counts = counts.to(device)
    if token_loss.numel() == 0:
        return token_loss.sum()  # zero, attached to the graph

    token_task = token_task.to(device)
    _check_task_ids(token_task, num_tasks, where="this micro-batch")
    if bool((counts.task_tokens[token_task] == 0).any()):
        raise ValueError(
            "this micro-batch has trained tokens of a task that the group counts do not have: pass the counts "
            "of the group this micro-batch belongs to (all_reduce_counts(group_counts(group_batches, K)))"
        )
    task_tokens = counts.task_tokens.to(dtype)
    task_samples = counts.task_samples.to(dtype)
    present = counts.present
    present_weight = (weights * present).sum()
    if not present_weight > 0:
        raise ValueError("the task weights of the tasks present in this group sum to 0: give them a positive weight")
    token_weight = weights[token_task]

    if mode in _SAMPLE_MODES:
        _, inverse, sample_sizes = torch.unique(token_sample.to(device), return_inverse=True, return_counts=True)
        sample_task = _task_of_each_sample(inverse, token_task, where="this micro-batch")
        tokens_of_my_sample = sample_sizes.to(dtype)[inverse]
        sample_weight_total = (weights * task_samples).sum()

    if mode == "case1":
        coefficient = token_weight / (weights * task_tokens).sum()
    elif mode == "case2":
        coefficient = token_weight / (tokens_of_my_sample * sample_weight_total)
    elif mode == "case3":
        coefficient = token_weight / (task_tokens[token_task] * present_weight)
    elif mode == "case4":
        coefficient = token_weight / (tokens_of_my_sample * task_samples[token_task] * present_weight)
    elif mode == "focal_sample":
        log_mean_p = _log_mean_exp(-token_loss, inverse, sample_sizes)  # log P_s, exact from the losses
        return (weights[sample_task] * _focal(log_mean_p, gamma)).sum() / sample_weight_total
    else:  # focal_task
        reference = _checked_reference(task_reference, present, num_tasks).to(device=device, dtype=dtype)
        slope = torch.where(present, _focal_derivative(reference, gamma), torch.zeros_like(reference))
        at_reference = _focal(reference.clamp_min(torch.finfo(dtype).tiny).log(), gamma)
        intercept = torch.where(present, at_reference - slope * reference, torch.zeros_like(reference))
        # P_t = sum of the task's token probabilities / its token count: each token brings its share
        per_token = (weights / torch.where(present, task_tokens, torch.ones_like(task_tokens)) / present_weight)[token_task]
        return (per_token * (slope[token_task] * torch.exp(-token_loss) + intercept[token_task])).sum()
    return (coefficient * token_loss).sum()


def per_task_loss_sums(
    token_loss: torch.Tensor, token_task: torch.Tensor, num_tasks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses [K], trained-token count [K] int64) per task, detached, for logging
    and for token-weighted per-task means (sum them over micro-steps and ranks, then divide)."""
    if token_loss.shape != token_task.shape or token_loss.dim() != 1:
        raise ValueError(f"token_loss {tuple(token_loss.shape)} and token_task {tuple(token_task.shape)} must be equal 1-D")
    token_task = token_task.to(token_loss.device)
    _check_task_ids(token_task, num_tasks, where="per_task_loss_sums")
    sums = torch.zeros(num_tasks, device=token_loss.device, dtype=token_loss.dtype)
    sums.index_add_(0, token_task, token_loss.detach())
    return sums, torch.bincount(token_task, minlength=num_tasks)


def task_mean_losses(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Token-weighted per-task means [K] from summed `per_task_loss_sums` (of the losses: CoBa's
    input; of the token probabilities: focal_task's reference); nan where a task has no token."""
    if sums.shape != counts.shape:
        raise ValueError(f"sums {tuple(sums.shape)} and counts {tuple(counts.shape)} must have the same shape")
    means = sums.to(torch.float64) / counts.to(torch.float64)
    return torch.where(counts > 0, means, torch.full_like(means, float("nan")))


# ----------------------------------------------------------------------------- helpers


def _log_mean_exp(values: torch.Tensor, inverse: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """log of the mean of exp(values) within each group (inverse: each value's group; sizes: the
    groups' sizes), shifted by each group's max so that no exp underflows: a sample whose every
    token has a loss above ~87 (fp32) still gets a finite log P."""
    groups = sizes.numel()
    top = torch.full((groups,), float("-inf"), device=values.device, dtype=values.dtype)
    top = top.scatter_reduce(0, inverse, values.detach(), reduce="amax")  # the result does not depend on it
    sums = torch.zeros(groups, device=values.device, dtype=values.dtype).index_add(0, inverse, torch.exp(values - top[inverse]))
    return top + sums.log() - sizes.to(values.dtype).log()


def _focal(log_p: torch.Tensor, gamma: float) -> torch.Tensor:
    """g(P) = (1 - P)^gamma * (-log P), from log P. 1 - P is floored at the smallest normal float
    so that P = 1 gives 0 and a finite gradient for any gamma >= 0."""
    one_minus_p = (-torch.expm1(log_p)).clamp_min(torch.finfo(log_p.dtype).tiny)
    return one_minus_p.pow(gamma) * -log_p


def _focal_derivative(p: torch.Tensor, gamma: float) -> torch.Tensor:
    """g'(P) = -gamma (1 - P)^(gamma - 1) (-log P) - (1 - P)^gamma / P."""
    tiny = torch.finfo(p.dtype).tiny
    p = p.clamp_min(tiny)
    one_minus_p = (1 - p).clamp_min(tiny)
    return -gamma * one_minus_p.pow(gamma - 1) * -p.log() - one_minus_p.pow(gamma) / p


def _check_task_ids(token_task: torch.Tensor, num_tasks: int, where: str) -> None:
    if token_task.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"{where}: task ids must be integers, got {token_task.dtype}")
    if token_task.numel() and (int(token_task.min()) < 0 or int(token_task.max()) >= num_tasks):
        bad = int(token_task.min()) if int(token_task.min()) < 0 else int(token_task.max())
        raise ValueError(
            f"{where}: a trained token has task id {bad}, outside [0, {num_tasks}) (padding must not be trained; "
            "task ids must index the configured tasks)"
        )


def _task_of_each_sample(inverse: torch.Tensor, token_task: torch.Tensor, where: str) -> torch.Tensor:
    """Task id of each sample (indexed like torch.unique's output); every sample has one task."""
    num_samples = int(inverse.max()) + 1 if inverse.numel() else 0
    token_task = token_task.long()
    lowest = torch.full((num_samples,), torch.iinfo(torch.int64).max, device=token_task.device)
    highest = torch.full((num_samples,), -1, device=token_task.device, dtype=torch.int64)
    lowest = lowest.scatter_reduce(0, inverse, token_task, reduce="amin")
    highest = highest.scatter_reduce(0, inverse, token_task, reduce="amax")
    if bool((lowest != highest).any()):
        raise ValueError(f"{where}: a sample id has tokens of two tasks; sample ids must be distinct per sample")
    return lowest


def _checked_task_weights(task_weights: torch.Tensor | None, num_tasks: int) -> torch.Tensor:
    if task_weights is None:
        return torch.ones(num_tasks)
    weights = torch.as_tensor(task_weights)
    if weights.shape != (num_tasks,):
        raise ValueError(f"task_weights must have shape [{num_tasks}] (one per task), got {tuple(weights.shape)}")
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError(f"task_weights must be finite and >= 0, got {weights.tolist()}")
    return weights


def _checked_reference(reference: torch.Tensor | None, present: torch.Tensor, num_tasks: int) -> torch.Tensor:
    if reference is None:
        raise ValueError(
            "loss mode focal_task needs task_reference: the per-task mean token probabilities of this group "
            "(a no-grad pre-pass); see mft_loss's docstring"
        )
    reference = torch.as_tensor(reference).detach()
    if reference.shape != (num_tasks,):
        raise ValueError(f"task_reference must have shape [{num_tasks}], got {tuple(reference.shape)}")
    usable = torch.isfinite(reference) & (reference > 0) & (reference <= 1)
    missing = (present.cpu() & ~usable.cpu()).nonzero().flatten().tolist()
    if missing:
        raise ValueError(f"task_reference has no probability in (0, 1] for task(s) {missing} present in this group")
    return reference
