"""Packing planners and packed rows (mft_core.data.pack)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mft_core.data.pack import (
    IGNORE_INDEX,
    PAD_TASK_ID,
    build_packed_row,
    pack_best_fit_decreasing,
    pack_next_fit,
    packing_stats,
)


def lognormal_lengths(count: int, seq_length: int, seed: int) -> np.ndarray:
    """Sample lengths shaped like real SFT data: lognormal, median ~400 tokens, capped."""
    rng = np.random.default_rng(seed)
    lengths = np.rint(rng.lognormal(mean=6.0, sigma=0.8, size=count)).astype(np.int64)
    return np.clip(lengths, 1, seq_length)


def assert_valid_packing(rows, lengths, seq_length):
    placed = sorted(index for row in rows for index in row)
    assert placed == list(range(len(lengths))), "every sample exactly once"
    assert all(row for row in rows), "no empty rows"
    assert max(sum(lengths[i] for i in row) for row in rows) <= seq_length


# ----------------------------------------------------------------------------- planners


@pytest.mark.parametrize("seq_length, seed", [(2048, 0), (2048, 1), (512, 2), (4096, 3)])
def test_best_fit_decreasing_is_valid_and_beats_next_fit(seq_length, seed):
    lengths = lognormal_lengths(3000, seq_length, seed)
    best_fit = pack_best_fit_decreasing(lengths, seq_length, seed=seed)
    next_fit = pack_next_fit(lengths, seq_length)
    assert_valid_packing(best_fit, lengths, seq_length)
    assert_valid_packing(next_fit, lengths, seq_length)
    bfd = packing_stats(best_fit, lengths, seq_length)
    nf = packing_stats(next_fit, lengths, seq_length)
    assert bfd.real_tokens == nf.real_tokens == int(lengths.sum())
    assert bfd.efficiency >= nf.efficiency
    assert bfd.rows >= -(-int(lengths.sum()) // seq_length)  # never below the lower bound


def test_best_fit_decreasing_handles_a_hundred_thousand_samples():
    lengths = lognormal_lengths(100_000, 2048, seed=7)
    rows = pack_best_fit_decreasing(lengths, 2048, seed=7)
    assert_valid_packing(rows, lengths, 2048)
    assert packing_stats(rows, lengths, 2048).efficiency > 0.99


def test_best_fit_picks_the_tightest_row():
    # 6 -> row0 (free 4); 5 -> row1 (free 5); 4 -> row0, the tightest that fits; 3 -> row1 (free 2);
    # 2 -> row1 (free 2 fits exactly); 1 -> new row2.
    assert pack_best_fit_decreasing([4, 2, 6, 1, 5, 3], 10, seed=0) == [[2, 0], [4, 5, 1], [3]]


def test_best_fit_decreasing_is_deterministic_for_a_seed():
    lengths = lognormal_lengths(2000, 1024, seed=3)
    assert pack_best_fit_decreasing(lengths, 1024, seed=11) == pack_best_fit_decreasing(lengths, 1024, seed=11)


def test_ties_are_broken_by_the_seeded_shuffle():
    lengths = [3] * 12  # three samples per row of 10, in some order
    by_seed = {seed: pack_best_fit_decreasing(lengths, 10, seed=seed) for seed in range(5)}
    assert len({str(rows) for rows in by_seed.values()}) > 1, "different seeds order equal lengths differently"
    for rows in by_seed.values():
        assert [len(row) for row in rows] == [3, 3, 3, 3]
    assert by_seed[0] != [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]


def test_next_fit_is_mftcoders_greedy_order_and_keeps_the_last_row():
    assert pack_next_fit([5, 5, 3, 8, 2], 10) == [[0, 1], [2], [3, 4]]


@pytest.mark.parametrize("planner", [pack_next_fit, lambda lengths, seq: pack_best_fit_decreasing(lengths, seq, 0)])
def test_planners_reject_lengths_that_do_not_fit(planner):
    with pytest.raises(ValueError, match="sample 1 has 11 tokens; apply fit_to_length"):
        planner([3, 11, 4], 10)
    with pytest.raises(ValueError, match="outside \\[1, 10\\]"):
        planner([3, 0], 10)
    assert planner([], 10) == []


def test_packing_stats_counts_tokens_slots_and_samples_per_row():
    stats = packing_stats([[0, 1], [2]], [6, 3, 5], 10)
    assert stats.as_dict() == {
        "rows": 2,
        "samples": 3,
        "real_tokens": 14,
        "token_slots": 20,
        "efficiency": 0.7,
        "samples_per_row_mean": 1.5,
        "samples_per_row_max": 2,
    }


# ----------------------------------------------------------------------------- packed rows


def test_packed_row_fields():
    samples = [
        {"input_ids": [11, 12, 13, 14], "loss_mask": [0, 0, 1, 1], "task_id": 0},
        {"input_ids": [21, 22, 23], "loss_mask": [1, 1, 1], "task_id": 2},
    ]
    row = build_packed_row(samples, seq_length=10, pad_id=99)
    assert row.input_ids.tolist() == [11, 12, 13, 14, 21, 22, 23, 99, 99, 99]
    # Untrained tokens, every sample's first token and the padding are -100.
    assert row.labels.tolist() == [-100, -100, 13, 14, -100, 22, 23, -100, -100, -100]
    assert row.task_ids.tolist() == [0, 0, 0, 0, 2, 2, 2, PAD_TASK_ID, PAD_TASK_ID, PAD_TASK_ID]
    assert row.position_ids.tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2]
    assert row.sample_bounds == [(0, 4), (4, 7)]
    assert row.num_real_tokens == 7
    assert row.input_ids.dtype == row.labels.dtype == np.int64


def test_full_packed_row_has_no_padding_segment():
    samples = [{"input_ids": [1, 2], "loss_mask": [1, 1], "task_id": 1}] * 2
    row = build_packed_row(samples, seq_length=4, pad_id=0)
    assert row.position_ids.tolist() == [0, 1, 0, 1]
    assert (row.labels == IGNORE_INDEX).sum() == 2


def test_packed_row_rejects_bad_samples():
    with pytest.raises(ValueError, match="more than seq_length 4"):
        build_packed_row([{"input_ids": [1, 2, 3], "loss_mask": [1, 1, 1], "task_id": 0}] * 2, 4, 0)
    with pytest.raises(ValueError, match="sample 0 of the row: input_ids and loss_mask"):
        build_packed_row([{"input_ids": [1, 2, 3], "loss_mask": [1, 1], "task_id": 0}], 4, 0)


def test_packed_row_isolates_samples_in_a_real_model(tiny_llama):
    """Position ids that restart per sample make HF build a block-diagonal mask (no cache,
    no attention_mask), so each packed sample's loss equals its loss alone."""
    generator = torch.Generator().manual_seed(0)
    samples = [
        {"input_ids": torch.randint(4, 512, (n,), generator=generator).tolist(), "loss_mask": [0] * 3 + [1] * (n - 3), "task_id": t}
        for n, t in [(9, 0), (6, 1), (12, 0)]
    ]
    row = build_packed_row(samples, seq_length=32, pad_id=2)

    def per_token_loss(input_ids, labels, position_ids=None):
        with torch.no_grad():
            logits = tiny_llama(
                input_ids=torch.as_tensor(input_ids)[None],
                position_ids=None if position_ids is None else torch.as_tensor(position_ids)[None],
                use_cache=False,
            ).logits[0]
        return torch.nn.functional.cross_entropy(
            logits[:-1], torch.as_tensor(labels)[1:], ignore_index=IGNORE_INDEX, reduction="none"
        )

    packed = per_token_loss(row.input_ids, row.labels, row.position_ids)
    for (start, end), sample in zip(row.sample_bounds, samples):
        alone_row = build_packed_row([sample], seq_length=end - start, pad_id=2)
        alone = per_token_loss(alone_row.input_ids, alone_row.labels)
        # packed[k] predicts token k+1; inside a sample that is positions start..end-2.
        torch.testing.assert_close(packed[start : end - 1], alone, atol=1e-5, rtol=1e-5)
        assert (packed[start : end - 1] > 0).sum() == sum(sample["loss_mask"][1:])
