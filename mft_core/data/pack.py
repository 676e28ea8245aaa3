"""Packing whole samples into fixed-length rows, and building a packed row's tensors.

MFTCoder packs with next-fit, shares one buffer across tasks (so a row can carry the wrong
task id), drops the last buffer, and lets packed samples attend to each other
(reference/mftcoder.md §2.2). Here:
  * ``pack_best_fit_decreasing`` plans rows with best-fit decreasing (fewer pad slots);
    ``pack_next_fit`` is MFTCoder's baseline, kept for comparison;
  * ``build_packed_row`` labels every token with its own sample's task id and restarts
    position ids per sample, from which attention isolates the samples.

Lengths must already fit ``seq_length`` (see ``mft_core.data.render.fit_to_length``).
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

IGNORE_INDEX = -100  # label value that HF / torch cross-entropy skip
PAD_TASK_ID = -1  # task id of padding tokens (belongs to no task)


# ----------------------------------------------------------------------------- planning


def pack_best_fit_decreasing(lengths: Sequence[int], seq_length: int, seed: int) -> list[list[int]]:
    """Assign sample indices to rows of at most ``seq_length`` tokens, best-fit decreasing.

    Samples are taken longest first; each goes into the open row whose free space is the
    smallest that still holds it, or opens a new row. Equal lengths are ordered by a seeded
    shuffle, so the result is deterministic for a seed while identical lengths do not always
    pack in input order. Free spaces are integers in [0, seq_length], so rows are bucketed by
    free space and the non-empty buckets kept in a sorted list: each placement is a bisect,
    O(n log seq_length) overall (10^5 samples in about a tenth of a second).
    """
    lengths_array = _checked_lengths(lengths, seq_length)
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(len(lengths_array))
    # Stable sort of the shuffled order by decreasing length: ties stay in shuffled order.
    order = shuffled[np.argsort(-lengths_array[shuffled], kind="stable")]

    rows: list[list[int]] = []
    rows_by_free: dict[int, list[int]] = {}  # free space -> row numbers with exactly that space
    free_spaces: list[int] = []  # sorted distinct free spaces that have at least one row
    for index in order.tolist():
        length = int(lengths_array[index])
        position = bisect.bisect_left(free_spaces, length)
        if position < len(free_spaces):
            free = free_spaces[position]
            bucket = rows_by_free[free]
            row = bucket.pop()
            if not bucket:
                del rows_by_free[free]
                free_spaces.pop(position)
        else:
            free = seq_length
            row = len(rows)
            rows.append([])
        rows[row].append(index)
        remaining = free - length
        if remaining > 0:  # full rows can take nothing more: stop tracking them
            if remaining not in rows_by_free:
                rows_by_free[remaining] = []
                bisect.insort(free_spaces, remaining)
            rows_by_free[remaining].append(row)
    return rows


def pack_next_fit(lengths: Sequence[int], seq_length: int) -> list[list[int]]:
    """MFTCoder's baseline: in input order, append to the current row while it fits, else start a new one.

    Unlike MFTCoder, the last row is kept and nothing is dropped silently.
    """
    lengths_array = _checked_lengths(lengths, seq_length)
    rows: list[list[int]] = []
    used = seq_length  # forces a new row for the first sample
    for index, length in enumerate(lengths_array.tolist()):
        if used + length > seq_length:
            rows.append([])
            used = 0
        rows[-1].append(index)
        used += length
    return rows


@dataclass(frozen=True)
class PackingStats:
    rows: int
    samples: int
    real_tokens: int
    token_slots: int
    efficiency: float  # real_tokens / token_slots
    samples_per_row_mean: float
    samples_per_row_max: int

    def as_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)


def packing_stats(rows: Sequence[Sequence[int]], lengths: Sequence[int], seq_length: int) -> PackingStats:
    """Real tokens over token slots (rows x seq_length), and samples per row. `lengths` is indexed
    by the sample indices the rows hold; vectorized, for epoch plans of a million samples."""
    lengths_array = np.asarray(lengths, dtype=np.int64)
    per_row = np.fromiter((len(row) for row in rows), dtype=np.int64, count=len(rows))
    members = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(per_row.sum()))
    real_tokens = int(lengths_array[members].sum())
    slots = len(rows) * seq_length
    return PackingStats(
        rows=len(rows),
        samples=int(per_row.sum()),
        real_tokens=real_tokens,
        token_slots=slots,
        efficiency=real_tokens / slots if slots else 0.0,
        samples_per_row_mean=float(per_row.mean()) if rows else 0.0,
        samples_per_row_max=int(per_row.max()) if rows else 0,
    )


def _checked_lengths(lengths: Sequence[int], seq_length: int) -> np.ndarray:
    if seq_length < 1:
        raise ValueError(f"seq_length must be positive, got {seq_length}")
    lengths_array = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if lengths_array.size:
        bad = np.flatnonzero((lengths_array < 1) | (lengths_array > seq_length))
        if bad.size:
            first = int(bad[0])
            raise ValueError(
                f"{bad.size} sample length(s) outside [1, {seq_length}], first: sample {first} has "
                f"{int(lengths_array[first])} tokens; apply fit_to_length (drop or truncate) before packing"
            )
    return lengths_array


# ----------------------------------------------------------------------------- packed rows


@dataclass(frozen=True)
class PackedRow:
    """One training row of ``seq_length`` tokens holding whole samples, then padding.

    ``labels`` follow the HF convention (not shifted; the model shifts): -100 where a token is
    not trained, and always at each sample's first token, which has nothing before it inside
    its own sample to be predicted from. ``position_ids`` restart at 0 for every sample (and
    for the padding tail), so the attention finds the packed samples from them (the segments,
    also for flash-attention's varlen kernel: ``mft_core.train.attention``). ``sample_bounds``
    are the samples' (start, end) token ranges, without the padding.
    """

    input_ids: np.ndarray  # int64 [seq_length]
    labels: np.ndarray  # int64 [seq_length]
    task_ids: np.ndarray  # int64 [seq_length], PAD_TASK_ID on padding
    position_ids: np.ndarray  # int64 [seq_length]
    sample_bounds: list[tuple[int, int]]

    @property
    def num_real_tokens(self) -> int:
        return self.sample_bounds[-1][1] if self.sample_bounds else 0


def build_packed_row(samples: Sequence[Mapping[str, Any]], seq_length: int, pad_id: int) -> PackedRow:
    """Concatenate samples (mappings with ``input_ids``, ``loss_mask``, ``task_id``) into one row."""
    input_ids = np.full(seq_length, pad_id, dtype=np.int64)
    labels = np.full(seq_length, IGNORE_INDEX, dtype=np.int64)
    task_ids = np.full(seq_length, PAD_TASK_ID, dtype=np.int64)
    position_ids = np.zeros(seq_length, dtype=np.int64)
    bounds: list[tuple[int, int]] = []
    start = 0
    for number, sample in enumerate(samples):
        ids = np.asarray(sample["input_ids"], dtype=np.int64)
        mask = np.asarray(sample["loss_mask"], dtype=np.int64)
        if ids.shape != mask.shape or ids.ndim != 1 or ids.size == 0:
            raise ValueError(
                f"sample {number} of the row: input_ids and loss_mask must be non-empty 1-D and of equal "
                f"length, got {ids.shape} and {mask.shape}"
            )
        end = start + ids.size
        if end > seq_length:
            raise ValueError(
                f"samples of this row hold {sum(len(s['input_ids']) for s in samples)} tokens, more than "
                f"seq_length {seq_length}; plan rows with pack_best_fit_decreasing first"
            )
        input_ids[start:end] = ids
        sample_labels = np.where(mask != 0, ids, IGNORE_INDEX)
        sample_labels[0] = IGNORE_INDEX
        labels[start:end] = sample_labels
        task_ids[start:end] = int(sample["task_id"])
        position_ids[start:end] = np.arange(ids.size)
        bounds.append((start, end))
        start = end
    position_ids[start:] = np.arange(seq_length - start)
    return PackedRow(
        input_ids=input_ids,
        labels=labels,
        task_ids=task_ids,
        position_ids=position_ids,
        sample_bounds=bounds,
    )
