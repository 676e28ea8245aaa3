"""Preference losses over packed pairs (mft_core.align.losses): DPO, RPO, ORPO and the step balance.

Hand-built pairs used by the value tests (float64; β = 0.5, α = 0.7):

    pair  π_c  π_r  ρ_c  ρ_r  n_c  n_r   (π_c-ρ_c)-(π_r-ρ_r)   z = β·margin   regime
    A     -2   -9   -4   -5   4    3      2 - (-4) =  6          3            policy already prefers chosen
    B     -8   -3   -6   -4   2    6     -2 -   1  = -3         -1.5          policy prefers rejected
    C     -5   -7   -6   -8   5    7      1 -   1  =  0          0            zero margin: DPO loss = log 2

    dpo   ℓ = -log σ(z) = log(1 + e^-z)
    rpo   ℓ = dpo + α · (-π_c / n_c),        -π_c / n_c = 2/4, 8/2, 5/5
    orpo  m = π / n:  m_c = -1/2, -4, -1;  m_r = -3, -1/2, -1   (C: m_c = m_r, log odds 0)
          ℓ = -m_c - β log σ(L),  L = (m_c - m_r) - (log(1 - e^m_c) - log(1 - e^m_r))

Expected numbers are written with `math` from these formulas, never by calling the module.
The TRL 1.16 anchors run TRL's own code: `DPOTrainer.compute_loss` on a tiny random Llama (sigmoid and
sigmoid+sft) and `ORPOTrainer.odds_ratio_loss`.
"""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn.functional as F

from mft_core.align.losses import (
    BALANCES,
    PREFERENCE_METHODS,
    PairLogps,
    pair_coefficients,
    pair_logps,
    per_pair_loss,
    preference_loss,
    sample_logps,
)

torch.set_num_threads(1)
F64 = torch.float64

BETA = 0.5
ALPHA = 0.7

PI_C, PI_R = [-2.0, -8.0, -5.0], [-9.0, -3.0, -7.0]
RHO_C, RHO_R = [-4.0, -6.0, -6.0], [-5.0, -4.0, -8.0]
N_C, N_R = [4.0, 2.0, 5.0], [3.0, 6.0, 7.0]
TASK = [0, 1, 0]


def t64(values, requires_grad=False):
    return torch.tensor(values, dtype=F64, requires_grad=requires_grad)


def hand_pairs(chosen=PI_C, rejected=PI_R, requires_grad=False):
    return PairLogps(t64(chosen, requires_grad), t64(rejected, requires_grad), t64(N_C), t64(N_R), torch.tensor(TASK))


HAND_REFERENCE = PairLogps(t64(RHO_C), t64(RHO_R), t64(N_C), t64(N_R), torch.tensor(TASK))


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def orpo_by_hand(pi_c, pi_r, n_c, n_r, beta):
    m_c, m_r = pi_c / n_c, pi_r / n_r
    log_odds = (m_c - m_r) - (math.log(1 - math.exp(m_c)) - math.log(1 - math.exp(m_r)))
    return -m_c - beta * log_sigmoid(log_odds)


DPO_BY_HAND = [
    math.log(1 + math.exp(-3.0)),  # A: z = 0.5 * 6
    math.log(1 + math.exp(1.5)),  # B: z = 0.5 * -3
    math.log(2.0),  # C: z = 0
]
EXPECTED_LOSS = {
    "dpo": DPO_BY_HAND,
    "rpo": [DPO_BY_HAND[0] + ALPHA * 2 / 4, DPO_BY_HAND[1] + ALPHA * 8 / 2, DPO_BY_HAND[2] + ALPHA * 5 / 5],
    "orpo": [orpo_by_hand(c, r, nc, nr, BETA) for c, r, nc, nr in zip(PI_C, PI_R, N_C, N_R)],
}
# rewards: β (π - ρ) against the reference; ORPO has none and logs β m
EXPECTED_REWARDS = {
    "dpo": ([0.5 * 2, 0.5 * -2, 0.5 * 1], [0.5 * -4, 0.5 * 1, 0.5 * 1]),
    "rpo": ([0.5 * 2, 0.5 * -2, 0.5 * 1], [0.5 * -4, 0.5 * 1, 0.5 * 1]),
    "orpo": ([0.5 * -0.5, 0.5 * -4, 0.5 * -1], [0.5 * -3, 0.5 * -0.5, 0.5 * -1]),
}


# ----------------------------------------------------------------------------- per-pair values


@pytest.mark.parametrize("method", PREFERENCE_METHODS)
def test_each_method_matches_the_hand_computation(method):
    loss, chosen_reward, rejected_reward = per_pair_loss(method, hand_pairs(), HAND_REFERENCE, BETA, rpo_alpha=ALPHA)
    assert loss.tolist() == pytest.approx(EXPECTED_LOSS[method], abs=1e-12)
    assert chosen_reward.tolist() == pytest.approx(EXPECTED_REWARDS[method][0], abs=1e-12)
    assert rejected_reward.tolist() == pytest.approx(EXPECTED_REWARDS[method][1], abs=1e-12)


def test_hand_values_sit_in_the_intended_regimes():
    """A guard on the fixture itself: the three pairs cover won, lost and tied DPO margins, and the
    ORPO pair C has equal mean log-probs (log odds 0: ℓ = -m_c + β log 2 = 1 + 0.5 log 2)."""
    assert DPO_BY_HAND[0] < math.log(2) < DPO_BY_HAND[1]
    assert EXPECTED_LOSS["orpo"][2] == pytest.approx(1 + 0.5 * math.log(2), abs=1e-12)
    loss, chosen_reward, rejected_reward = per_pair_loss("dpo", hand_pairs(), HAND_REFERENCE, BETA)
    assert (chosen_reward > rejected_reward).tolist() == [True, False, False]
    assert loss[2].item() == pytest.approx(math.log(2), abs=1e-15)


@pytest.mark.parametrize("method", PREFERENCE_METHODS)
def test_rewards_are_detached_and_the_loss_is_not(method):
    policy = hand_pairs(requires_grad=True)
    loss, chosen_reward, rejected_reward = per_pair_loss(method, policy, HAND_REFERENCE, BETA, rpo_alpha=ALPHA)
    assert loss.requires_grad
    assert not chosen_reward.requires_grad and not rejected_reward.requires_grad


def test_rpo_alpha_scales_only_the_chosen_nll_term():
    """rpo(α) - dpo = α · (-π_c / n_c) = α · (0.5, 4, 1): linear in α, zero at α = 0."""
    dpo = per_pair_loss("dpo", hand_pairs(), HAND_REFERENCE, BETA)[0]
    for alpha in (0.0, 1.0, 2.5):
        rpo = per_pair_loss("rpo", hand_pairs(), HAND_REFERENCE, BETA, rpo_alpha=alpha)[0]
        assert (rpo - dpo).tolist() == pytest.approx([alpha * 0.5, alpha * 4.0, alpha * 1.0], abs=1e-12)


def test_orpo_needs_no_reference_and_ignores_one():
    without = per_pair_loss("orpo", hand_pairs(), None, BETA)[0]
    with_reference = per_pair_loss("orpo", hand_pairs(), HAND_REFERENCE, BETA)[0]
    assert without.tolist() == pytest.approx(EXPECTED_LOSS["orpo"], abs=1e-12)
    assert with_reference.tolist() == pytest.approx(EXPECTED_LOSS["orpo"], abs=1e-12)


def test_orpo_is_finite_and_accurate_near_zero_and_for_very_negative_mean_log_probs():
    """m = -1e-12 (a near-certain answer) and m = -40 (e^m negligible against 1): log(1 - e^m) must stay
    accurate. Near 0 the naive log(1 - exp(m)) loses about 4 of 16 digits (1 - e^-1e-12 cancels); the
    hand value uses math.expm1, exact there. Pair 2 has log odds ≈ -67.6, so ℓ ≈ β·67.6 carries that
    error in full."""
    chosen, rejected = [-1e-12 * 3, -40.0 * 2], [-40.0 * 2, -1e-12 * 3]
    policy = PairLogps(t64(chosen), t64(rejected), t64([3.0, 2.0]), t64([2.0, 3.0]), torch.tensor([0, 0]))
    loss = per_pair_loss("orpo", policy, None, BETA)[0]

    def log1mexp(m):
        return math.log(-math.expm1(m))

    expected = []
    for m_c, m_r in ((-1e-12, -40.0), (-40.0, -1e-12)):
        log_odds = (m_c - m_r) - (log1mexp(m_c) - log1mexp(m_r))
        expected.append(-m_c - BETA * log_sigmoid(log_odds))
    assert torch.isfinite(loss).all()
    assert loss.tolist() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("method", ("dpo", "rpo"))
def test_reference_methods_refuse_a_missing_reference(method):
    with pytest.raises(ValueError, match="reference"):
        per_pair_loss(method, hand_pairs(), None, BETA)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown preference method"):
        per_pair_loss("ipo", hand_pairs(), HAND_REFERENCE, BETA)


@pytest.mark.parametrize("method", PREFERENCE_METHODS)
def test_gradient_raises_chosen_and_lowers_rejected_at_policy_equal_to_reference(method):
    """At π = ρ (z = 0, σ(-z) = 1/2), by hand:
      dpo  dℓ/dπ_c = -β/2,              dℓ/dπ_r = +β/2
      rpo  dℓ/dπ_c = -β/2 - α/n_c,      dℓ/dπ_r = +β/2
      orpo (m_c = m_r = m, log odds 0)  dℓ/dπ_c = (-1 - (β/2)/(1 - e^m_c)) / n_c,
                                        dℓ/dπ_r = ((β/2)/(1 - e^m_r)) / n_r
    so gradient descent raises π_c and lowers π_r for every method."""
    chosen, rejected = [-6.0, -2.0], [-9.0, -3.0]
    n_c, n_r = [2.0, 4.0], [3.0, 6.0]  # m_c = m_r = -3 and -0.5
    policy = PairLogps(t64(chosen, True), t64(rejected, True), t64(n_c), t64(n_r), torch.tensor([0, 0]))
    reference = PairLogps(t64(chosen), t64(rejected), t64(n_c), t64(n_r), torch.tensor([0, 0]))
    loss = per_pair_loss(method, policy, reference, BETA, rpo_alpha=ALPHA)[0]
    loss.sum().backward()
    assert (policy.chosen.grad < 0).all() and (policy.rejected.grad > 0).all()
    if method == "dpo":
        expected_c, expected_r = [-BETA / 2] * 2, [BETA / 2] * 2
    elif method == "rpo":
        expected_c, expected_r = [-BETA / 2 - ALPHA / 2, -BETA / 2 - ALPHA / 4], [BETA / 2] * 2
    else:
        m = [-3.0, -0.5]
        expected_c = [(-1 - (BETA / 2) / (1 - math.exp(mi))) / nc for mi, nc in zip(m, n_c)]
        expected_r = [((BETA / 2) / (1 - math.exp(mi))) / nr for mi, nr in zip(m, n_r)]
    assert policy.chosen.grad.tolist() == pytest.approx(expected_c, abs=1e-12)
    assert policy.rejected.grad.tolist() == pytest.approx(expected_r, abs=1e-12)


# ----------------------------------------------------------------------------- pair_logps


# Three pairs, samples numbered chosen 0, rejected 1, chosen 2, ...; tokens listed out of sample order.
#   sample  side        token losses     sum    count
#   0       chosen p0   1.0 0.5           1.5    2
#   1       rejected p0 2.0               2.0    1
#   2       chosen p1   0.25 0.25 0.5     1.0    3
#   3       rejected p1 3.0 1.0           4.0    2
#   4       chosen p2   0.75              0.75   1
#   5       rejected p2 1.5 1.5 1.5 1.5   6.0    4
TOKEN_LOSS = [1.0, 2.0, 0.25, 3.0, 0.5, 0.75, 1.5, 0.25, 1.5, 1.0, 0.5, 1.5, 1.5]
TOKEN_SAMPLE = [0, 1, 2, 3, 0, 4, 5, 2, 5, 3, 2, 5, 5]
# Rejected samples get task 9 so that reading tasks from the wrong side shows.
SAMPLE_TASK = [0, 9, 2, 9, 1, 9]


def test_sample_logps_sums_minus_the_token_losses_per_sample():
    sums, counts = sample_logps(t64(TOKEN_LOSS), torch.tensor(TOKEN_SAMPLE), 7)
    assert sums.tolist() == pytest.approx([-1.5, -2.0, -1.0, -4.0, -0.75, -6.0, 0.0], abs=1e-15)
    assert counts.tolist() == [2.0, 1.0, 3.0, 2.0, 1.0, 4.0, 0.0] and counts.dtype == F64


def test_pair_logps_splits_chosen_and_rejected_and_takes_the_chosen_task():
    token_loss = t64(TOKEN_LOSS, requires_grad=True)
    pairs = pair_logps(token_loss, torch.tensor(TOKEN_SAMPLE), torch.tensor(SAMPLE_TASK))
    assert pairs.chosen.tolist() == pytest.approx([-1.5, -1.0, -0.75], abs=1e-15)
    assert pairs.rejected.tolist() == pytest.approx([-2.0, -4.0, -6.0], abs=1e-15)
    assert pairs.chosen_tokens.tolist() == [2.0, 3.0, 1.0]
    assert pairs.rejected_tokens.tolist() == [1.0, 2.0, 4.0]
    assert pairs.chosen_tokens.dtype == F64 and pairs.rejected_tokens.dtype == F64
    assert pairs.task.tolist() == [0, 2, 1]
    # d π_c(p1) / d token_loss = -1 on sample 2's tokens (positions 2, 7, 10), 0 elsewhere
    pairs.chosen[1].backward()
    expected = [0.0] * len(TOKEN_LOSS)
    for position in (2, 7, 10):
        expected[position] = -1.0
    assert token_loss.grad.tolist() == expected


def test_pair_logps_refuses_a_side_without_trained_token():
    # drop sample 3's tokens (positions 3 and 9): rejected side of pair 1 is empty
    keep = [i for i, s in enumerate(TOKEN_SAMPLE) if s != 3]
    with pytest.raises(ValueError, match="no trained token"):
        pair_logps(t64(TOKEN_LOSS)[keep], torch.tensor(TOKEN_SAMPLE)[keep], torch.tensor(SAMPLE_TASK))


def test_pair_logps_refuses_an_odd_sample_count():
    keep = [i for i, s in enumerate(TOKEN_SAMPLE) if s != 5]
    with pytest.raises(ValueError, match="even number"):
        pair_logps(t64(TOKEN_LOSS)[keep], torch.tensor(TOKEN_SAMPLE)[keep], torch.tensor(SAMPLE_TASK[:5]))


# ----------------------------------------------------------------------------- balancing

# One optimizer step's pairs (all ranks, all micro-batches), K = 3 tasks; task 2 is absent.
#   pair     0    1    2    3     4    5    6
#   task     0    1    1    0     1    0    1
#   loss     0.5  1.5  2.0  0.25  3.0  1.0  0.75
#   task 0: 3 pairs, Σℓ = 1.75, mean 1.75/3;   task 1: 4 pairs, Σℓ = 7.25, mean 7.25/4
STEP_TASK = [0, 1, 1, 0, 1, 0, 1]
STEP_LOSS = [0.5, 1.5, 2.0, 0.25, 3.0, 1.0, 0.75]
STEP_COUNTS = torch.tensor([3, 4, 0])
MICRO_BATCHES = [[0], [1, 2, 3, 4], [5, 6]]  # uneven micro-steps

STEP_OBJECTIVE = {
    # weights (1, 1, 1): pair = plain mean over pairs, task = mean of task means
    "unweighted": {
        "pair": (1.75 + 7.25) / 7,
        "task": (1.75 / 3 + 7.25 / 4) / 2,
    },
    # weights (2, 1, 5): task 2 is absent, its weight 5 must change nothing
    "weighted": {
        "pair": (2 * 1.75 + 1 * 7.25) / (2 * 3 + 1 * 4),  # = 1.075
        "task": (2 * 1.75 / 3 + 1 * 7.25 / 4) / (2 + 1),
    },
}
STEP_WEIGHTS = {"unweighted": [1.0, 1.0, 1.0], "weighted": [2.0, 1.0, 5.0]}
# c_t by hand: pair w_t / Σ w n; task w_t / n_t / Σ_present w; absent task 0
STEP_COEFFICIENTS = {
    "unweighted": {"pair": [1 / 7, 1 / 7, 0.0], "task": [1 / 3 / 2, 1 / 4 / 2, 0.0]},
    "weighted": {"pair": [2 / 10, 1 / 10, 0.0], "task": [2 / 3 / 3, 1 / 4 / 3, 0.0]},
}


def step_total(balance, weights, losses=None):
    losses = t64(STEP_LOSS) if losses is None else losses
    task = torch.tensor(STEP_TASK)
    coefficients = pair_coefficients(balance, STEP_COUNTS, t64(weights))
    return sum(preference_loss(losses[part], task[part], coefficients) for part in MICRO_BATCHES)


@pytest.mark.parametrize("weighting", ("unweighted", "weighted"))
@pytest.mark.parametrize("balance", BALANCES)
def test_coefficients_match_the_hand_computation(balance, weighting):
    coefficients = pair_coefficients(balance, STEP_COUNTS, t64(STEP_WEIGHTS[weighting]))
    assert coefficients.tolist() == pytest.approx(STEP_COEFFICIENTS[weighting][balance], abs=1e-15)


@pytest.mark.parametrize("weighting", ("unweighted", "weighted"))
@pytest.mark.parametrize("balance", BALANCES)
def test_micro_step_contributions_sum_to_the_step_objective(balance, weighting):
    total = step_total(balance, STEP_WEIGHTS[weighting])
    assert total.item() == pytest.approx(STEP_OBJECTIVE[weighting][balance], abs=1e-12)


@pytest.mark.parametrize("balance", BALANCES)
def test_absent_task_weight_and_weight_scale_do_not_matter(balance):
    expected = STEP_OBJECTIVE["weighted"][balance]
    assert step_total(balance, [2.0, 1.0, 1000.0]).item() == pytest.approx(expected, abs=1e-12)
    assert step_total(balance, [2.0, 1.0, 0.0]).item() == pytest.approx(expected, abs=1e-12)
    assert step_total(balance, [14.0, 7.0, 5.0]).item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("balance", BALANCES)
def test_balances_differ_where_tasks_have_unequal_counts(balance):
    """pair and task agree only when every task has the same pair count: here 3 vs 4, so the two
    objectives must differ (a guard against a balance silently falling back to the other)."""
    other = [b for b in BALANCES if b != balance][0]
    assert abs(step_total(balance, [1.0, 1.0, 1.0]).item() - step_total(other, [1.0, 1.0, 1.0]).item()) > 1e-3


@pytest.mark.parametrize("balance", BALANCES)
def test_gradient_of_the_summed_contributions_is_the_coefficient_of_each_pair(balance):
    losses = t64(STEP_LOSS, requires_grad=True)
    step_total(balance, STEP_WEIGHTS["weighted"], losses).backward()
    coefficient = STEP_COEFFICIENTS["weighted"][balance]
    assert losses.grad.tolist() == pytest.approx([coefficient[t] for t in STEP_TASK], abs=1e-15)


def test_coefficients_refuse_an_empty_step_and_an_unknown_balance():
    with pytest.raises(ValueError, match="no pair"):
        pair_coefficients("pair", torch.tensor([0, 0]), t64([1.0, 1.0]))
    with pytest.raises(ValueError, match="unknown balance"):
        pair_coefficients("token", STEP_COUNTS, t64([1.0, 1.0, 1.0]))


# ----------------------------------------------------------------------------- TRL 1.16 anchors

# Two pairs as TRL's DataCollatorForPreference takes them (token ids < 512; 2 is eos).
UNEQUAL_CHOSEN = [
    {"prompt_ids": [1, 40, 41, 42], "chosen_ids": [50, 51, 2], "rejected_ids": [60, 2]},
    {"prompt_ids": [1, 70], "chosen_ids": [80, 81, 82, 83, 84, 85, 2], "rejected_ids": [90, 91, 92, 2]},
]
EQUAL_CHOSEN = [
    {"prompt_ids": [1, 40, 41, 42], "chosen_ids": [50, 51, 2], "rejected_ids": [60, 2]},
    {"prompt_ids": [1, 70], "chosen_ids": [80, 81, 2], "rejected_ids": [90, 91, 92, 2]},
]


@pytest.fixture
def trl_dpo(tiny_llama, tiny_llama_dir, tiny_tokenizer, tmp_path):
    """make(loss_type, loss_weights) -> a real trl.DPOTrainer on the tiny random Llama, with a reference
    model that differs from the policy (different seeded noise on the same weights), so the log ratios
    are not 0."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="sdpa").eval()
    # Seeded noise on both: the policy's next-token distributions are far from uniform (so per-token
    # log-probs differ between answers), and the reference differs from the policy.
    for seed, model in ((1, reference), (2, tiny_llama)):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    dataset = Dataset.from_list([{"prompt": "def f():", "chosen": " return 1", "rejected": " pass"}])

    def make(loss_type, loss_weights=None):
        args = DPOConfig(
            output_dir=str(tmp_path / "trl"),
            beta=0.3,
            loss_type=loss_type,
            loss_weights=loss_weights,
            report_to=[],
            use_cpu=True,
            disable_dropout=True,
        )
        trainer = DPOTrainer(model=tiny_llama, ref_model=reference, args=args, train_dataset=dataset,
                             processing_class=tiny_tokenizer)
        trainer.model.eval()
        return trainer

    return make


def ours_from_model(trainer, batch, method, alpha=1.0):
    """Our loss on TRL's collated batch: per-token -log p from each model's plain (unfused) forward,
    numbered as our collate does (chosen 0, rejected 1, ...), then pair_logps, per_pair_loss and the
    step objective of one task (pair balance). TRL's batch rows are [chosen..., rejected...]."""
    num_pairs = batch["input_ids"].shape[0] // 2
    row_sample = torch.tensor([2 * i for i in range(num_pairs)] + [2 * i + 1 for i in range(num_pairs)])
    mask = batch["completion_mask"][:, 1:].bool()
    rows = torch.arange(mask.shape[0])[:, None].expand_as(mask)[mask]
    sample_task = torch.zeros(2 * num_pairs, dtype=torch.long)

    def side(model):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        token_nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")
        return pair_logps(token_nll[mask], row_sample[rows], sample_task)

    policy = side(trainer.model)
    with torch.no_grad():
        reference = side(trainer.ref_model)
    loss, chosen_reward, rejected_reward = per_pair_loss(method, policy, reference, trainer.beta, rpo_alpha=alpha)
    coefficients = pair_coefficients("pair", torch.tensor([num_pairs]), torch.ones(1, dtype=F64))
    return preference_loss(loss, policy.task, coefficients), policy, chosen_reward, rejected_reward


def test_dpo_matches_trl_dpo_trainer_sigmoid_loss(trl_dpo):
    """TRL 1.16 `DPOTrainer.compute_loss` with loss_type ["sigmoid"] (its fused LM head, its summed
    completion log-probs, `-F.logsigmoid(beta * delta_score)` averaged over pairs) on a 2-pair batch
    from its own `DataCollatorForPreference`: the value, the gradient on the (tied) embedding, and the
    rewards TRL logs (rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies) equal ours."""
    trainer = trl_dpo(["sigmoid"])
    batch = trainer.data_collator(UNEQUAL_CHOSEN)
    weight = trainer.model.get_input_embeddings().weight

    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()
    trl_grad = weight.grad.clone()
    weight.grad = None

    ours, _, chosen_reward, rejected_reward = ours_from_model(trainer, batch, "dpo")
    ours.backward()
    assert ours.item() == pytest.approx(trl_loss.item(), rel=1e-5)
    assert torch.allclose(weight.grad.float(), trl_grad, rtol=1e-4, atol=1e-7)
    # the pair is not a trivial tie: the reference differs, so β·margin is away from 0 (loss ≠ log 2)
    assert (chosen_reward - rejected_reward).abs().min().item() > 1e-2
    metrics = trainer._metrics["eval"]
    assert metrics["rewards/chosen"][-1] == pytest.approx(chosen_reward.mean().item(), rel=1e-4, abs=1e-6)
    assert metrics["rewards/rejected"][-1] == pytest.approx(rejected_reward.mean().item(), rel=1e-4, abs=1e-6)
    assert metrics["rewards/margins"][-1] == pytest.approx((chosen_reward - rejected_reward).mean().item(),
                                                          rel=1e-4, abs=1e-6)
    assert metrics["rewards/accuracies"][-1] == pytest.approx((chosen_reward > rejected_reward).double().mean().item())


def test_rpo_matches_trl_sigmoid_plus_sft_when_chosen_answers_have_equal_lengths(trl_dpo):
    """TRL 1.16 `DPOTrainer.compute_loss` with loss_type ["sigmoid", "sft"], loss_weights [1, α]: its sft
    term is the token mean over all chosen tokens of the batch; ours is -π_c/n_c per pair averaged over
    pairs. With every chosen answer 3 tokens long the two are the same number."""
    alpha = 0.7
    trainer = trl_dpo(["sigmoid", "sft"], [1.0, alpha])
    batch = trainer.data_collator(EQUAL_CHOSEN)
    trl_loss = trainer.compute_loss(trainer.model, batch)
    ours, policy, _, _ = ours_from_model(trainer, batch, "rpo", alpha)
    assert policy.chosen_tokens.tolist() == [3.0, 3.0]
    assert ours.item() == pytest.approx(trl_loss.item(), rel=1e-5)


def test_rpo_differs_from_trl_sft_by_the_length_normalization_when_chosen_lengths_differ(trl_dpo):
    """Ours follows the RPO paper (Pang et al. 2024): the chosen NLL of each pair normalized by its own
    length, -π_c/n_c, averaged over pairs. TRL's "sft" takes -Σ_p π_c / Σ_p n_c over the batch. With
    chosen lengths 3 and 7 they differ by exactly
        α · [ mean_p(-π_c / n_c) - (-Σ π_c / Σ n_c) ],
    and that gap is not negligible here."""
    alpha = 0.7
    trainer = trl_dpo(["sigmoid", "sft"], [1.0, alpha])
    batch = trainer.data_collator(UNEQUAL_CHOSEN)
    trl_loss = trainer.compute_loss(trainer.model, batch)
    ours, policy, _, _ = ours_from_model(trainer, batch, "rpo", alpha)
    pi_c, n_c = policy.chosen.detach().double(), policy.chosen_tokens
    assert n_c.tolist() == [3.0, 7.0]
    gap = alpha * ((-pi_c / n_c).mean() - (-pi_c.sum() / n_c.sum())).item()
    assert abs(gap) > 0.05
    assert ours.item() - trl_loss.item() == pytest.approx(gap, rel=1e-3, abs=1e-5)


def test_orpo_odds_ratio_term_matches_trl_odds_ratio_loss():
    """TRL 1.16 `trl.experimental.orpo.ORPOTrainer.odds_ratio_loss` (called unbound: it reads only
    self.beta and self.accelerator.device) on mean log-probs returns losses = β log σ(log odds) per pair
    (its total is nll - losses.mean(), with nll the chosen token-mean NLL of the batch). So
    ours - (-m_c) = -losses, and its rewards β m equal ours. TRL computes in float32."""
    from trl.experimental.orpo import ORPOTrainer

    chosen, rejected = [-2.0, -8.0, -5.0, -0.01, -90.0], [-9.0, -3.0, -7.0, -60.0, -0.02]
    n_c, n_r = [4.0, 2.0, 5.0, 5.0, 3.0], [3.0, 6.0, 7.0, 4.0, 2.0]
    policy = PairLogps(t64(chosen), t64(rejected), t64(n_c), t64(n_r), torch.zeros(5, dtype=torch.long))
    beta = 0.25
    loss, chosen_reward, rejected_reward = per_pair_loss("orpo", policy, None, beta)

    mean_c, mean_r = policy.chosen / policy.chosen_tokens, policy.rejected / policy.rejected_tokens
    fake_self = types.SimpleNamespace(beta=beta, accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    trl_losses, trl_chosen_reward, trl_rejected_reward, _, _ = ORPOTrainer.odds_ratio_loss(fake_self, mean_c, mean_r)

    assert (loss - (-mean_c)).tolist() == pytest.approx((-trl_losses.double()).tolist(), rel=1e-5, abs=1e-7)
    assert chosen_reward.tolist() == pytest.approx(trl_chosen_reward.double().tolist(), rel=1e-6)
    assert rejected_reward.tolist() == pytest.approx(trl_rejected_reward.double().tolist(), rel=1e-6)
    # and the odds-ratio term really varies across these pairs (not a constant that any sign would match)
    assert trl_losses.max().item() - trl_losses.min().item() > 0.1
