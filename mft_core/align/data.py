"""Preference pairs as the packing unit: the tokenize output's pair shards seen as pairs.

A preference task's shard holds pair p as samples 2p (chosen) and 2p + 1 (rejected), each with
only its final answer trained (mft_core/data/tokenize.py). `PairSplit` shows those samples as
pairs, with a pair's length the sum of its two sides, so that `epoch_plan` and `validation_plan`
plan pairs exactly as they plan fine-tuning samples (sampled per task, packed whole into rows,
sharded once over ranks) and `pair_rows` turns the planned rows back into samples for `collate`:
both sides of a pair always sit in the same row, next to each other, so the collated sample ids
number them chosen 0, rejected 1, chosen 2, ...
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mft_core.train.data import TokenizedSplit


class PairSplit:
    """The pairs of the preference tasks `task_ids` in one split (the attributes epoch_plan and
    validation_plan read: split, num_tasks, lengths, task_ids, task_counts, len)."""

    def __init__(self, samples: TokenizedSplit, task_ids: Sequence[int]):
        samples.keep_tasks(task_ids)
        if len(samples) % 2 or not np.array_equal(samples.task_ids[0::2], samples.task_ids[1::2]):
            raise ValueError(f"{samples.directory}: the {samples.split} pair shards do not hold (chosen, rejected) "
                             "pairs of one task; rerun the tokenize stage with force")
        self.samples = samples
        self.split = samples.split
        self.num_tasks = samples.num_tasks
        self.lengths = samples.lengths[0::2] + samples.lengths[1::2]
        self.task_ids = samples.task_ids[0::2]
        self.task_counts = np.bincount(self.task_ids, minlength=self.num_tasks).astype(np.int64)

    def __len__(self) -> int:
        return int(self.lengths.size)


def pair_rows(rows: Sequence[Sequence[int]]) -> list[list[int]]:
    """Rows of pair indices -> rows of sample indices (each pair's chosen, then its rejected side)."""
    return [[sample for pair in row for sample in (2 * pair, 2 * pair + 1)] for row in rows]
