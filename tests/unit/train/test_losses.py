"""Per-token losses and the multi-task loss modes (mft_core.train.losses).

Hand-built batch used by the value tests (K = 3 tasks; task 2 is absent):

    sample  task  token losses   sum  mean
    s0      0     1 3              4  2
    s1      1     4 4 4 8         20  5
    s2      1     2                2  2
    s3      0     5 7 3           15  5
    s4      1     1 1 1            3  1

    task 0: 5 tokens, sum 19, token mean 3.8,   2 samples, sample mean (2+5)/2   = 3.5
    task 1: 8 tokens, sum 25, token mean 3.125, 3 samples, sample mean (5+2+1)/3 = 8/3

The focal losses take the arithmetic mean of the token probabilities p = exp(-loss) of a sample
(P_s) or of a task (P_t), and g(P) = (1 - P)^gamma * (-log P), written out below with `math`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mft_core.data.pack import IGNORE_INDEX, build_packed_row
from mft_core.train.losses import (
    LOSS_MODES,
    GroupCounts,
    all_reduce_counts,
    all_reduce_sum,
    group_counts,
    mft_loss,
    per_task_loss_sums,
    task_mean_losses,
    token_losses,
    token_losses_through_module,
    trained_positions,
    trained_values,
)

torch.set_num_threads(1)
F64 = torch.float64

# ----------------------------------------------------------------------------- hand-built batch

HAND_LOSS = [1.0, 3.0, 4.0, 4.0, 4.0, 8.0, 2.0, 5.0, 7.0, 3.0, 1.0, 1.0, 1.0]
HAND_TASK = [0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1]
HAND_SAMPLE = [0, 0, 1, 1, 1, 1, 2, 3, 3, 3, 4, 4, 4]
HAND_COUNTS = GroupCounts(torch.tensor([5, 8, 0]), torch.tensor([2, 3, 0]))

# The paper's focal losses by hand: mean token probability of each sample and task, then g.
SAMPLE_LOSSES = [[1, 3], [4, 4, 4, 8], [2], [5, 7, 3], [1, 1, 1]]
SAMPLE_TASK = [0, 1, 1, 0, 1]
TASK_LOSSES = [[1, 3, 5, 7, 3], [4, 4, 4, 8, 2, 1, 1, 1]]


def mean_p(losses):
    return sum(math.exp(-l) for l in losses) / len(losses)


def g(p, gamma=2.0):
    return (1 - p) ** gamma * -math.log(p)


P_SAMPLE = [mean_p(l) for l in SAMPLE_LOSSES]  # P_s0 = (e^-1 + e^-3) / 2, ...
P_TASK = [mean_p(l) for l in TASK_LOSSES]  # P_t0 = (e^-1 + e^-3 + e^-5 + e^-7 + e^-3) / 5, ...

UNWEIGHTED = {
    "case1": 44 / 13,  # (19 + 25) / (5 + 8)
    "case2": 3.0,  # (2 + 5 + 2 + 5 + 1) / 5
    "case3": 3.4625,  # (3.8 + 3.125) / 2
    "case4": 37 / 12,  # (3.5 + 8/3) / 2
    "focal_sample": sum(g(p) for p in P_SAMPLE) / 5,  # = 1.4951...
    "focal_task": (g(P_TASK[0]) + g(P_TASK[1])) / 2,
}
# Weights (1, 3, 5): task 2 is absent, so its weight 5 changes nothing.
WEIGHTED = {
    "case1": 94 / 29,  # (19 + 3*25) / (5 + 3*8)
    "case2": 31 / 11,  # (2 + 5 + 3*(5 + 2 + 1)) / (2 + 3*3)
    "case3": 3.29375,  # (3.8 + 3*3.125) / (1 + 3)
    "case4": 2.875,  # (3.5 + 3*8/3) / (1 + 3)
    "focal_sample": sum((1, 3)[t] * g(p) for t, p in zip(SAMPLE_TASK, P_SAMPLE)) / 11,
    "focal_task": (g(P_TASK[0]) + 3 * g(P_TASK[1])) / 4,
}
HAND_TASK_P = torch.tensor(P_TASK + [float("nan")], dtype=F64)


def hand_contribution(mode, indices, weights=None, counts=HAND_COUNTS, gamma=2.0):
    index = torch.tensor(indices, dtype=torch.long)
    return mft_loss(
        mode,
        torch.tensor(HAND_LOSS, dtype=F64)[index],
        torch.tensor(HAND_TASK)[index],
        torch.tensor(HAND_SAMPLE)[index],
        counts,
        task_weights=weights,
        gamma=gamma,
        task_reference=HAND_TASK_P,
    )


ALL_TOKENS = list(range(13))


@pytest.mark.parametrize("mode", LOSS_MODES)
def test_each_mode_matches_the_hand_computation(mode):
    assert hand_contribution(mode, ALL_TOKENS).item() == pytest.approx(UNWEIGHTED[mode], abs=1e-12)


@pytest.mark.parametrize("mode", LOSS_MODES)
def test_task_weights_combine_as_a_weighted_mean_over_present_tasks(mode):
    weights = torch.tensor([1.0, 3.0, 5.0], dtype=F64)
    assert hand_contribution(mode, ALL_TOKENS, weights).item() == pytest.approx(WEIGHTED[mode], abs=1e-12)
    # Only ratios matter: scaling every weight changes nothing.
    assert hand_contribution(mode, ALL_TOKENS, weights * 7).item() == pytest.approx(WEIGHTED[mode], abs=1e-12)


@pytest.mark.parametrize("mode", LOSS_MODES)
def test_micro_batch_contributions_sum_to_the_group_value(mode):
    # Whole samples per micro-batch: {s0, s1}, {s2}, {s3, s4}, as three micro-steps of one group.
    parts = [[0, 1, 2, 3, 4, 5], [6], [7, 8, 9, 10, 11, 12]]
    total = sum(hand_contribution(mode, part).item() for part in parts)
    assert total == pytest.approx(UNWEIGHTED[mode], abs=1e-12)


def test_focal_with_gamma_zero_is_minus_log_of_the_mean_probability_not_the_mean_loss():
    """The paper's P is the arithmetic mean of the token probabilities: with gamma = 0 the loss is
    -log P, below the mean token loss (Jensen) unless all of a sample's losses are equal."""
    focal_sample = hand_contribution("focal_sample", ALL_TOKENS, gamma=0.0).item()
    focal_task = hand_contribution("focal_task", ALL_TOKENS, gamma=0.0).item()
    assert focal_sample == pytest.approx(sum(-math.log(p) for p in P_SAMPLE) / 5, abs=1e-12)
    assert focal_task == pytest.approx((-math.log(P_TASK[0]) - math.log(P_TASK[1])) / 2, abs=1e-12)
    assert focal_sample < UNWEIGHTED["case2"] - 0.3 and focal_task < UNWEIGHTED["case3"] - 1.0
    # a sample of equal token losses: -log P_s is its loss (s4: three tokens of loss 1)
    assert -math.log(P_SAMPLE[4]) == pytest.approx(1.0, abs=1e-12)


def test_focal_sample_is_finite_where_every_token_probability_underflows():
    """Losses of 200 and 300 nats: exp(-loss) is 0 in fp32, but log P_s is taken from the losses
    (log-mean-exp), so the loss is -log((e^-200 + e^-300) / 2) = 200 + log 2 (gamma: (1 - P)^2 = 1)."""
    loss = torch.tensor([200.0, 300.0], requires_grad=True)
    counts = GroupCounts(torch.tensor([2]), torch.tensor([1]))
    value = mft_loss("focal_sample", loss, torch.tensor([0, 0]), torch.tensor([0, 0]), counts)
    assert value.item() == pytest.approx(200 + math.log(2), rel=1e-6)
    value.backward()
    assert torch.isfinite(loss.grad).all() and loss.grad[0] == pytest.approx(1.0, rel=1e-6)


def test_absent_task_counts_nothing_and_empty_micro_batch_contributes_zero():
    # Task 2 never appears: same value with K=3 as with K=2.
    two_tasks = GroupCounts(torch.tensor([5, 8]), torch.tensor([2, 3]))
    loss, task, sample = torch.tensor(HAND_LOSS, dtype=F64), torch.tensor(HAND_TASK), torch.tensor(HAND_SAMPLE)
    value = mft_loss("case3", loss, task, sample, two_tasks)
    assert value.item() == pytest.approx(3.4625, abs=1e-12)
    # A micro-batch without trained tokens: zero, still differentiable.
    empty = torch.zeros(0, dtype=F64, requires_grad=True)
    zero = mft_loss("case4", empty, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), HAND_COUNTS)
    assert zero.item() == 0.0
    zero.backward()


def test_bad_inputs_get_clear_errors():
    loss, task, sample = torch.tensor(HAND_LOSS), torch.tensor(HAND_TASK), torch.tensor(HAND_SAMPLE)
    with pytest.raises(ValueError, match="unknown loss mode"):
        mft_loss("case9", loss, task, sample, HAND_COUNTS)
    with pytest.raises(ValueError, match="group counts do not have"):
        mft_loss("case3", loss, task, sample, GroupCounts(torch.tensor([5, 0, 0]), torch.tensor([2, 0, 0])))
    with pytest.raises(ValueError, match="needs task_reference"):
        mft_loss("focal_task", loss, task, sample, HAND_COUNTS)
    with pytest.raises(ValueError, match=r"no probability in \(0, 1\] for task\(s\) \[1\]"):
        mft_loss("focal_task", loss, task, sample, HAND_COUNTS, task_reference=torch.tensor([0.5, float("nan"), 1.0]))
    with pytest.raises(ValueError, match=r"no probability in \(0, 1\] for task\(s\) \[0\]"):
        mft_loss("focal_task", loss, task, sample, HAND_COUNTS, task_reference=torch.tensor([3.8, 0.5, 1.0]))  # a loss
    with pytest.raises(ValueError, match="shape \\[3\\]"):
        mft_loss("case3", loss, task, sample, HAND_COUNTS, task_weights=torch.ones(2))
    with pytest.raises(ValueError, match="sum to 0"):
        mft_loss("case3", loss, task, sample, HAND_COUNTS, task_weights=torch.tensor([0.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="outside \\[0, 3\\)"):
        mft_loss("case1", loss, torch.full_like(task, 3), sample, HAND_COUNTS)
    with pytest.raises(ValueError, match="two tasks"):
        mft_loss("case2", loss, task, torch.zeros_like(sample), HAND_COUNTS)


def test_per_task_sums_and_means_for_logging():
    sums, counts = per_task_loss_sums(torch.tensor(HAND_LOSS, dtype=F64), torch.tensor(HAND_TASK), 3)
    assert sums.tolist() == [19.0, 25.0, 0.0]
    assert counts.tolist() == [5, 8, 0]
    means = task_mean_losses(sums, counts)
    assert means[:2].tolist() == [3.8, 3.125] and torch.isnan(means[2])


# ----------------------------------------------------------------------------- token losses


def full_logits_losses(hidden, weight, labels, bias=None, transform=None):
    """The plain computation: all logits, shifted cross-entropy, trained positions only."""
    logits = hidden[:, :-1] @ weight.T + (0 if bias is None else bias)
    if transform is not None:
        logits = transform(logits)
    targets = labels[:, 1:]
    per_position = F.cross_entropy(logits.reshape(-1, weight.shape[0]), targets.reshape(-1), reduction="none",
                                   ignore_index=IGNORE_INDEX)
    return per_position[(targets != IGNORE_INDEX).reshape(-1)]


def random_problem(dtype, seed=0, batch=2, length=9, hidden_size=5, vocab=13):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, hidden_size, generator=generator, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, generator=generator, dtype=dtype, requires_grad=True)
    bias = torch.randn(vocab, generator=generator, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    labels[0, :3] = IGNORE_INDEX
    labels[1, 5:7] = IGNORE_INDEX
    labels[:, 0] = IGNORE_INDEX
    return hidden, weight, bias, labels


def soft_cap(logits):
    return torch.tanh(logits / 3.0) * 3.0


@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
@pytest.mark.parametrize("with_bias_and_transform", [False, True])
def test_chunked_token_losses_equal_full_logits_in_value_and_gradient(chunk_size, with_bias_and_transform):
    hidden, weight, bias, labels = random_problem(F64)
    extra = {"bias": bias, "transform": soft_cap} if with_bias_and_transform else {}
    ours = token_losses(hidden, weight, labels, chunk_size=chunk_size, **extra)
    reference = full_logits_losses(hidden, weight, labels, **extra)
    assert ours.shape == (int(trained_positions(labels).sum()),)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)

    upstream = torch.linspace(0.5, 2.0, ours.numel(), dtype=F64)  # any linear use of the losses
    inputs = (hidden, weight, bias) if with_bias_and_transform else (hidden, weight)
    ours_grad = torch.autograd.grad((ours * upstream).sum(), inputs)
    reference_grad = torch.autograd.grad((reference * upstream).sum(), inputs)
    for got, expected in zip(ours_grad, reference_grad):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_token_losses_fp32_and_bf16_inputs_compute_in_fp32():
    hidden, weight, _, labels = random_problem(torch.float32, seed=1)
    ours = token_losses(hidden, weight, labels, chunk_size=3)
    reference = full_logits_losses(hidden, weight, labels)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    grads = torch.autograd.grad(ours.sum(), (hidden, weight))
    reference_grads = torch.autograd.grad(reference.sum(), (hidden, weight))
    for got, expected in zip(grads, reference_grads):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)

    low_hidden, low_weight = hidden.detach().bfloat16(), weight.detach().bfloat16()
    ours_low = token_losses(low_hidden, low_weight, labels, chunk_size=3)
    assert ours_low.dtype == torch.float32
    upcast_reference = full_logits_losses(low_hidden.float(), low_weight.float(), labels)
    torch.testing.assert_close(ours_low, upcast_reference, rtol=0, atol=1e-5)


def test_token_losses_under_bf16_autocast_equal_the_fp32_computation():
    """accelerate's bf16 mixed precision runs the forward under autocast, which would turn the
    chunk's fp32 logits matmul into a bf16 one (0.1-0.5 nat off on CPU): both loss paths (the head
    weight, and the head module under ZeRO-3) must give the fp32 values under autocast too."""
    hidden, weight, _, labels = random_problem(torch.float32, seed=3, hidden_size=64, vocab=256)
    hidden = hidden * 4  # logits of a trained model's size, where bf16 rounding shows
    head = torch.nn.Linear(64, 256, bias=False)
    with torch.no_grad():
        head.weight.copy_(weight)
    expected = full_logits_losses(hidden, weight, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        through_weight = token_losses(hidden, weight, labels, chunk_size=4)
        through_module = token_losses_through_module(hidden, head, labels, chunk_size=4)
    for got in (through_weight, through_module):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_no_tokens_by_vocab_tensor_is_kept_for_backward():
    # 70 trained tokens, vocabulary 64, chunks of 8: full logits would keep [70, 64] tensors.
    hidden, weight, _, labels = random_problem(torch.float32, seed=2, batch=2, length=40, hidden_size=4, vocab=64)
    labels[:, :4] = IGNORE_INDEX
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        chunked = token_losses(hidden, weight, labels, chunk_size=8)
    assert chunked.numel() == 70
    assert max(sizes) <= weight.numel() < 8 * 64  # at most the [V, H] weight itself, never logits
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        full_logits_losses(hidden, weight, labels)
    assert max(sizes) >= 70 * 64  # what the chunking avoids


def test_token_losses_edge_cases():
    hidden, weight, _, labels = random_problem(F64)
    nothing = torch.full_like(labels, IGNORE_INDEX)
    empty = token_losses(hidden, weight, nothing)
    assert empty.shape == (0,) and empty.requires_grad
    empty.sum().backward()  # reaches the parameters (DDP needs a backward on every rank)
    assert hidden.grad is not None and float(hidden.grad.abs().sum()) == 0.0

    too_big = labels.clone()
    too_big[1, 3] = 13
    with pytest.raises(ValueError, match="label 13 is outside the vocabulary"):
        token_losses(hidden, weight, too_big)
    with pytest.raises(ValueError, match="output weight must be"):
        token_losses(hidden, weight[:, :3], labels)
    # Column 0 is never a target (nothing precedes it), whatever its label.
    assert not trained_positions(torch.zeros(2, 4, dtype=torch.long))[:, 0].any()


# ----------------------------------------------------------------------------- packed groups


def packed_micro_batch(samples_per_row, seq_length=16):
    """Real packed rows (build_packed_row) -> the [B, T] tensors the loop has."""
    rows = [build_packed_row(samples, seq_length, pad_id=0) for samples in samples_per_row]
    sample_ids = torch.full((len(rows), seq_length), -1, dtype=torch.long)
    numbered = 0
    for r, row in enumerate(rows):  # 0, 1, 2, ... over the micro-batch, as collate numbers them
        for start, end in row.sample_bounds:
            sample_ids[r, start:end] = numbered
            numbered += 1
    return {
        "input_ids": torch.from_numpy(np.stack([row.input_ids for row in rows])),
        "labels": torch.from_numpy(np.stack([row.labels for row in rows])),
        "task_ids": torch.from_numpy(np.stack([row.task_ids for row in rows])),
        "position_ids": torch.from_numpy(np.stack([row.position_ids for row in rows])),
        "sample_ids": sample_ids,
    }


def random_rows(seed, num_rows, num_tasks=3, vocab=17, seq_length=16):
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(num_rows):
        used, row = 0, []
        while True:
            length = int(torch.randint(2, 7, (1,), generator=generator))
            if used + length > seq_length:
                break
            ids = torch.randint(1, vocab, (length,), generator=generator).tolist()
            mask = (torch.rand(length, generator=generator) < 0.7).long().tolist()
            task = int(torch.randint(0, num_tasks, (1,), generator=generator))
            row.append({"input_ids": ids, "loss_mask": mask, "task_id": task})
            used += length
        rows.append(row)
    return rows


def test_group_counts_of_packed_rows_by_hand():
    batch = packed_micro_batch([
        [{"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1], "task_id": 1},  # 2 trained tokens, task 1
         {"input_ids": [8, 9], "loss_mask": [1, 1], "task_id": 0}],  # first token never trained: 1
        [{"input_ids": [3, 4, 5, 6], "loss_mask": [0, 0, 0, 0], "task_id": 2},  # no trained token
         {"input_ids": [7, 8, 9], "loss_mask": [1, 1, 1], "task_id": 1}],  # 2
    ])
    assert trained_values(batch["task_ids"], batch["labels"]).tolist() == [1, 1, 0, 1, 1]
    counts = group_counts([batch, batch], num_tasks=3)
    assert counts.task_tokens.tolist() == [2, 8, 0]
    assert counts.task_samples.tolist() == [2, 4, 0]  # the untrained sample counts nowhere
    assert (counts.total_tokens, counts.total_samples) == (10, 6)
    assert all_reduce_counts(counts).task_tokens.tolist() == [2, 8, 0]  # no process group: identity

    bad = dict(batch, task_ids=torch.full_like(batch["task_ids"], -1))
    with pytest.raises(ValueError, match="micro-batch 0: a trained token has task id -1"):
        group_counts([bad], num_tasks=3)
    with pytest.raises(ValueError, match="lacks \\['sample_ids'\\]"):
        group_counts([{k: v for k, v in batch.items() if k != "sample_ids"}], num_tasks=3)


def summed(counts_list):
    """What all_reduce_counts returns on every rank: the sum of the ranks' local counts."""
    return GroupCounts(sum(c.task_tokens for c in counts_list), sum(c.task_samples for c in counts_list))


@pytest.mark.parametrize("mode", LOSS_MODES)
def test_objective_and_gradient_do_not_depend_on_ranks_and_accumulation(mode):
    """8 packed rows as 1 micro-batch on 1 rank, or as 2 ranks x 2 micro-steps of 2 rows."""
    torch.manual_seed(0)
    vocab, hidden_size = 17, 6
    embedding = torch.randn(vocab, hidden_size, dtype=F64, requires_grad=True)
    head = torch.randn(vocab, hidden_size, dtype=F64, requires_grad=True)
    weights = torch.tensor([1.0, 2.0, 0.5], dtype=F64)
    rows = random_rows(seed=3, num_rows=8)

    def forward(batch):
        hidden = torch.tanh(embedding[batch["input_ids"]])
        loss = token_losses(hidden, head, batch["labels"], chunk_size=5)
        return loss, trained_values(batch["task_ids"], batch["labels"]), trained_values(batch["sample_ids"], batch["labels"])

    def reference_losses(batches):
        # The exact focal_task recipe: a no-grad pre-pass over the group, all ranks summed: each
        # task's mean token probability.
        sums, counts = torch.zeros(3, dtype=F64), torch.zeros(3, dtype=torch.long)
        with torch.no_grad():
            for batch in batches:
                loss, task, _ = forward(batch)
                s, c = per_task_loss_sums(torch.exp(-loss), task, 3)
                sums, counts = sums + s, counts + c
        return task_mean_losses(sums, counts)

    def contribution(batch, counts, reference):
        loss, task, sample = forward(batch)
        return mft_loss(mode, loss, task, sample, counts, weights, gamma=2.0, task_reference=reference)

    whole = packed_micro_batch(rows)
    whole_counts = group_counts([whole], 3)
    one = contribution(whole, whole_counts, reference_losses([whole]))
    one_grads = torch.autograd.grad(one, (embedding, head))

    ranks = [[packed_micro_batch(rows[0:2]), packed_micro_batch(rows[2:4])],
             [packed_micro_batch(rows[4:6]), packed_micro_batch(rows[6:8])]]
    counts = summed([group_counts(batches, 3) for batches in ranks])
    assert torch.equal(counts.task_tokens, whole_counts.task_tokens)
    reference = reference_losses([b for batches in ranks for b in batches])
    split = sum(contribution(batch, counts, reference) for batches in ranks for batch in batches)
    split_grads = torch.autograd.grad(split, (embedding, head))

    torch.testing.assert_close(split, one, rtol=0, atol=1e-12)
    for got, expected in zip(split_grads, one_grads):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["focal_sample", "focal_task"])
def test_focal_modes_have_the_exact_gradient_of_the_focal_objective(mode):
    """Against the objective written directly with autograd (the factor is differentiated)."""
    torch.manual_seed(1)
    token_loss = (torch.rand(13, dtype=F64) * 3 + 0.1).requires_grad_()
    task, sample = torch.tensor(HAND_TASK), torch.tensor(HAND_SAMPLE)
    weights = torch.tensor([1.0, 3.0, 5.0], dtype=F64)
    gamma = 1.5

    def focal(mean_p):  # the paper's g, on the arithmetic mean of the token probabilities
        return (1 - mean_p) ** gamma * -torch.log(mean_p)

    p = torch.exp(-token_loss)
    if mode == "focal_sample":
        means = torch.stack([p[sample == s].mean() for s in range(5)])
        sample_task = torch.tensor([0, 1, 1, 0, 1])
        direct = (weights[sample_task] * focal(means)).sum() / weights[sample_task].sum()
    else:
        means = torch.stack([p[task == t].mean() for t in range(2)])
        direct = (weights[:2] * focal(means)).sum() / weights[:2].sum()
    reference = task_mean_losses(*per_task_loss_sums(p, task, 3))
    ours = mft_loss(mode, token_loss, task, sample, HAND_COUNTS, weights, gamma=gamma, task_reference=reference)
    torch.testing.assert_close(ours, direct, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(ours, token_loss)[0], torch.autograd.grad(direct, token_loss)[0],
                               rtol=0, atol=1e-12)


def test_all_reduce_with_an_initialized_process_group(gloo_group):
    local = GroupCounts(torch.tensor([3, 0, 2]), torch.tensor([1, 0, 1]))
    reduced = all_reduce_counts(local)
    assert reduced.task_tokens.tolist() == [3, 0, 2] and reduced.task_samples.tolist() == [1, 0, 1]
    values = torch.tensor([1.5, 2.5], dtype=F64)
    out = all_reduce_sum(values)
    assert out.tolist() == [1.5, 2.5] and out is not values
