"""Preference losses (DPO, RPO, ORPO) over packed pairs, as global objectives of an optimizer step.

A pair p is a chosen and a rejected answer to the same conversation. From `TokenLossModel`'s
per-token losses come per-sample sums (`sample_logps`): the summed log-probabilities of each
side's answer tokens, π_c and π_r under the policy, ρ_c and ρ_r under the reference, and the
answer lengths n_c, n_r. Per pair (σ = sigmoid, β = `beta`):

  dpo   ℓ = -log σ(β [(π_c - ρ_c) - (π_r - ρ_r)])                          (Rafailov et al. 2023)
  rpo   ℓ = dpo + α · (-π_c / n_c)                   (Pang et al. 2024: the chosen answer's NLL,
        normalized by its own length; TRL's `["sigmoid", "sft"]` instead takes the token mean over
        all chosen tokens of its batch: the two agree when every chosen answer has the same length)
  orpo  ℓ = -m_c - β log σ(log odds),  m = π / n (mean token log-prob),
        log odds = (m_c - m_r) - (log(1 - e^m_c) - log(1 - e^m_r))            (Hong et al. 2024)

The step's objective balances tasks as `mft_loss` does (w_t the task weights, P_t the step's
pairs of task t over all ranks and micro-batches, T the tasks present):
  pair  Σ_p w_t(p) ℓ_p / Σ_t w_t |P_t|                     (the weighted mean over pairs)
  task  Σ_{t∈T} w_t (Σ_{p∈P_t} ℓ_p / |P_t|) / Σ_{t∈T} w_t    (the weighted mean of task means)
Both are Σ_p c_{t(p)} ℓ_p with a per-task coefficient c computed from the global pair counts, so a
micro-step's contribution is its own pairs' Σ c ℓ, and the contributions of every micro-step on
every rank sum to the step objective whatever the packing (`preference_loss`).

Rewards, for logging as TRL logs them: r_c = β (π_c - ρ_c), r_r = β (π_r - ρ_r); margin r_c - r_r;
a pair is "won" when r_c > r_r. ORPO has no reference: its rewards are β m_c and β m_r.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PREFERENCE_METHODS = ("dpo", "rpo", "orpo")
BALANCES = ("pair", "task")
NEEDS_REFERENCE = ("dpo", "rpo")


@dataclass
class PairLogps:
    """Per pair of one micro-batch [P]: summed answer log-probs of each side, answer token counts
    (float64) and task ids (long)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    task: torch.Tensor


def sample_logps(token_loss: torch.Tensor, token_sample: torch.Tensor, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob [S], trained-token count [S] float64) of samples 0..S-1 of a micro-batch,
    from the per-token losses (-log p) of its trained positions and their sample ids."""
    token_sample = token_sample.to(token_loss.device)
    sums = torch.zeros(num_samples, dtype=token_loss.dtype, device=token_loss.device).index_add(0, token_sample, -token_loss)
    counts = torch.bincount(token_sample, minlength=num_samples).to(torch.float64)
    return sums, counts


def pair_logps(token_loss: torch.Tensor, token_sample: torch.Tensor, sample_task: torch.Tensor) -> PairLogps:
    """The pairs of a micro-batch whose samples are numbered chosen 0, rejected 1, chosen 2, ...
    (collate numbers the samples of expanded pair rows that way); sample_task [S]: each sample's task."""
    num_samples = int(sample_task.numel())
    if num_samples % 2:
        raise ValueError(f"a micro-batch of pairs holds an even number of samples, got {num_samples}")
    sums, counts = sample_logps(token_loss, token_sample, num_samples)
    if bool((counts == 0).any()):
        raise ValueError("a side of a pair has no trained token: the tokenize output is damaged; rerun tokenize with force")
    return PairLogps(sums[0::2], sums[1::2], counts[0::2], counts[1::2], sample_task[0::2].to(sums.device))


def per_pair_loss(method: str, policy: PairLogps, reference: PairLogps | None, beta: float,
                  rpo_alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss [P], chosen reward [P], rejected reward [P]) of each pair (module docstring)."""
    if method not in PREFERENCE_METHODS:
        raise ValueError(f"unknown preference method {method!r}; choose one of {', '.join(PREFERENCE_METHODS)}")
    if method == "orpo":
        mean_c = policy.chosen / policy.chosen_tokens.to(policy.chosen.dtype)
        mean_r = policy.rejected / policy.rejected_tokens.to(policy.rejected.dtype)
        log_odds = (mean_c - mean_r) - (_log1mexp(mean_c) - _log1mexp(mean_r))
        loss = -mean_c - beta * F.logsigmoid(log_odds)
        return loss, beta * mean_c.detach(), beta * mean_r.detach()
    if reference is None:
        raise ValueError(f"{method} needs the reference model's log-probs")
    chosen_ratio = policy.chosen - reference.chosen
    rejected_ratio = policy.rejected - reference.rejected
    loss = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    if method == "rpo":
        loss = loss + rpo_alpha * (-policy.chosen / policy.chosen_tokens.to(policy.chosen.dtype))
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def pair_coefficients(balance: str, task_pairs: torch.Tensor, task_weights: torch.Tensor) -> torch.Tensor:
    """c [K] such that the step objective is Σ_p c_{t(p)} ℓ_p; task_pairs [K]: the GLOBAL pair
    count of each task in the step (all ranks, all micro-batches)."""
    if balance not in BALANCES:
        raise ValueError(f"unknown balance {balance!r}; choose one of {', '.join(BALANCES)}")
    counts = task_pairs.to(torch.float64)
    weights = task_weights.to(torch.float64)
    present = counts > 0
    if not bool(present.any()):
        raise ValueError("the step holds no pair")
    if balance == "pair":
        return torch.where(present, weights / (weights * counts).sum(), torch.zeros_like(weights))
    return torch.where(present, weights / counts.clamp(min=1) / weights[present].sum(), torch.zeros_like(weights))


def preference_loss(pair_loss: torch.Tensor, pair_task: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """This micro-step's contribution to the step objective: Σ over its pairs of c_{t(p)} ℓ_p."""
    return (coefficients.to(pair_loss.device, pair_loss.dtype)[pair_task.to(pair_loss.device)] * pair_loss).sum()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, accurate near 0 and for very negative x (Mächler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
