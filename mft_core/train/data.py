"""Training data: the tokenize stage's shards, memory-mapped; per-epoch plans; packed micro-batches.

MFTCoder shards its data twice (by JSONL line in the loader, then again by accelerate), so with 8
processes about a third of the rows go unseen each epoch and validation sees about 1/8 of its
rows (reference/mftcoder.md §2.5). Here a plan is computed identically in every process from
(seed, epoch) alone, and sharded exactly once:

  sample the task mix of the epoch -> shuffle -> pack whole samples into rows (best-fit
  decreasing) -> shuffle the rows -> group rows into micro-batches -> trim the tail so that
  every rank gets the same number of micro-batches, a multiple of grad_accum -> rank r takes
  the global micro-batches r, r + W, r + 2W, ...

Why strided (rank r takes every W-th micro-batch) rather than contiguous blocks: optimizer step
s then consumes the contiguous block of global micro-batches [s*G*W, (s+1)*G*W), whatever W and
G are, as long as their product is the same. So W processes x G accumulation steps train on
exactly the same micro-batches, step by step, as 1 process x W*G steps: the property the
recipe's loss normalization is built for (DESIGN.md §7).

Resuming needs only a cursor (epoch, optimizer step within it): the plan of an epoch is a pure
function of its arguments, so the resumed process rebuilds it and continues there. Epochs
re-sample and re-pack, so they can hold different numbers of optimizer steps.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mft_core.data.pack import PackingStats, build_packed_row, pack_best_fit_decreasing, packing_stats
from mft_core.data.tokenize import open_shard

log = logging.getLogger("mft.train")

SAMPLING_POLICIES = ("proportional", "temperature", "weights")

MicroBatch = list[list[int]]  # rows, each a list of sample indices of the split


# ----------------------------------------------------------------------------- the split


class TokenizedSplit:
    """One split ("train" or "valid") of a tokenize output directory, memory-mapped.

    Every shard listed in shards.json for the split is mapped (zero-copy: no token is read
    into process memory until a sample is used). Per sample, numpy arrays hold its shard, its
    row in the shard, its length and its task id; `sample(i)` returns views of the mapped
    buffers. Task ids and names come from shards.json over all splits, so "train" and "valid"
    agree on `num_tasks` even when a task has no sample in one of them.
    """

    def __init__(self, tokenize_dir: Path | str, split: str) -> None:
        self.directory = Path(tokenize_dir)
        self.split = split
        listing_path = self.directory / "shards.json"
        if not listing_path.is_file():
            raise FileNotFoundError(
                f"{listing_path} not found: {self.directory} is not a finished tokenize output; "
                "run the tokenize stage first"
            )
        listing = json.loads(listing_path.read_text())
        splits = sorted({entry["split"] for entry in listing})
        if split not in splits:
            raise ValueError(f"{listing_path} lists no split {split!r}; it has: {', '.join(splits) or 'none'}")

        names: dict[int, str] = {}
        for entry in listing:
            known = names.setdefault(int(entry["task_id"]), entry["task"])
            if known != entry["task"]:
                raise ValueError(f"{listing_path}: task id {entry['task_id']} is both {known!r} and {entry['task']!r}")
        self.num_tasks = max(names) + 1 if names else 0
        self.task_names = [names.get(k, f"task{k}") for k in range(self.num_tasks)]

        self.shard_files: list[Path] = []
        self._tables: list[Any] = []  # keep the mapped tables alive: the arrays below are views of them
        self._piece_ids: list[np.ndarray] = []  # per record batch: all its tokens, int32
        self._piece_masks: list[np.ndarray] = []  # per record batch: all its loss masks, uint8
        shard_of, row_of, length_of, task_of, piece_of, start_of = [], [], [], [], [], []
        for entry in (e for e in listing if e["split"] == split):
            path = self.directory / entry["file"]
            table = open_shard(path)
            if table.num_rows != entry["rows"]:
                raise ValueError(
                    f"{path} has {table.num_rows} rows but {listing_path} says {entry['rows']}: the tokenize "
                    "output is damaged; rerun the tokenize stage with force"
                )
            shard = len(self.shard_files)
            self.shard_files.append(path)
            self._tables.append(table)
            first_row = 0
            for batch in table.to_batches():
                ids, mask = batch.column("input_ids"), batch.column("loss_mask")
                offsets = ids.offsets.to_numpy(zero_copy_only=True)
                lengths = batch.column("length").to_numpy(zero_copy_only=True)
                if not np.array_equal(offsets, mask.offsets.to_numpy(zero_copy_only=True)) or not np.array_equal(
                    np.diff(offsets), lengths
                ):
                    raise ValueError(
                        f"{path}: input_ids, loss_mask and length disagree on sample lengths; rerun the "
                        "tokenize stage with force"
                    )
                rows = batch.num_rows
                shard_of.append(np.full(rows, shard, dtype=np.int32))
                row_of.append(np.arange(first_row, first_row + rows, dtype=np.int64))
                length_of.append(lengths.astype(np.int64))
                task_of.append(batch.column("task_id").to_numpy(zero_copy_only=True).astype(np.int64))
                piece_of.append(np.full(rows, len(self._piece_ids), dtype=np.int32))
                start_of.append(offsets[:-1].astype(np.int64))
                # .values is the whole child array; the (possibly sliced) offsets index into it.
                self._piece_ids.append(ids.values.to_numpy(zero_copy_only=True))
                self._piece_masks.append(mask.values.to_numpy(zero_copy_only=True))
                first_row += rows

        def joined(parts: list[np.ndarray], dtype: type) -> np.ndarray:
            return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

        self.shard_index = joined(shard_of, np.int32)  # per sample: index into shard_files
        self.row_index = joined(row_of, np.int64)  # per sample: row within its shard
        self.lengths = joined(length_of, np.int64)  # per sample: tokens
        self.task_ids = joined(task_of, np.int64)  # per sample: task id
        self._piece = joined(piece_of, np.int32)
        self._start = joined(start_of, np.int64)
        if self.task_ids.size and (self.task_ids.min() < 0 or self.task_ids.max() >= self.num_tasks):
            raise ValueError(f"{self.directory}: a shard holds a task id outside 0..{self.num_tasks - 1}")
        self.task_counts = np.bincount(self.task_ids, minlength=self.num_tasks).astype(np.int64)

    def keep_tasks(self, task_ids: Sequence[int]) -> None:
        """Drop every sample of the other tasks (train.tasks); task ids, names and num_tasks stay."""
        keep = np.isin(self.task_ids, np.asarray(task_ids, dtype=np.int64))
        for name in ("shard_index", "row_index", "lengths", "task_ids", "_piece", "_start"):
            setattr(self, name, getattr(self, name)[keep])
        self.task_counts = np.bincount(self.task_ids, minlength=self.num_tasks).astype(np.int64)

    def __len__(self) -> int:
        return int(self.lengths.size)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def sample(self, index: int) -> dict[str, Any]:
        """input_ids (int32) and loss_mask (uint8) as read-only views of the mapped shard, and task_id."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} is outside the {self.split} split (0..{len(self) - 1})")
        piece, start = int(self._piece[index]), int(self._start[index])
        end = start + int(self.lengths[index])
        return {
            "input_ids": self._piece_ids[piece][start:end],
            "loss_mask": self._piece_masks[piece][start:end],
            "task_id": int(self.task_ids[index]),
        }


# ----------------------------------------------------------------------------- epoch plans


@dataclass(frozen=True)
class EpochStats:
    """What an epoch plan samples, packs and trims (per-task lists are indexed by task id)."""

    epoch: int
    sampling: str
    task_available: list[int]  # samples of each task in the split
    task_sampled: list[int]  # drawn for this epoch (before trimming)
    task_trained: list[int]  # in the micro-batches the ranks actually get
    packing: PackingStats  # over all packed rows, before trimming
    micro_batches: int  # formed from the packed rows (the last one may be partial)
    micro_batches_used: int  # world_size * micro-batches per rank
    trimmed_rows: int
    trimmed_samples: int
    trimmed_tokens: int

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "packing": self.packing.as_dict()}

    def describe(self) -> str:
        return (
            f"epoch {self.epoch}: {sum(self.task_sampled)} samples drawn ({self.sampling}; per task "
            f"{self.task_sampled} of {self.task_available}) packed into {self.packing.rows} rows at "
            f"{self.packing.efficiency:.1%} efficiency; {self.micro_batches_used} of {self.micro_batches} "
            f"micro-batches used, trimmed tail: {self.trimmed_rows} rows, {self.trimmed_samples} samples, "
            f"{self.trimmed_tokens} tokens"
        )


@dataclass(frozen=True, eq=False)
class EpochPlan:
    """The micro-batches of one epoch for every rank, already trimmed and sharded."""

    world_size: int
    grad_accum: int
    rows_per_micro_batch: int
    micro_batches_per_rank: int
    stats: EpochStats
    # Global rows in plan order, flattened: row j holds row_samples[row_offsets[j]:row_offsets[j+1]].
    # Only the rows of the used micro-batches are kept.
    row_samples: np.ndarray = field(repr=False)
    row_offsets: np.ndarray = field(repr=False)

    @property
    def num_optimizer_steps(self) -> int:
        """Optimizer steps in this epoch (the same on every rank)."""
        return self.micro_batches_per_rank // self.grad_accum

    def global_micro_batch(self, index: int) -> MicroBatch:
        first = index * self.rows_per_micro_batch
        bounds = self.row_offsets[first : first + self.rows_per_micro_batch + 1].tolist()
        return [self.row_samples[a:b].tolist() for a, b in zip(bounds, bounds[1:])]

    def micro_batches(self, rank: int) -> list[MicroBatch]:
        """Rank `rank`'s micro-batches in order: global micro-batches rank, rank + W, rank + 2W, ..."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside 0..{self.world_size - 1}")
        return [self.global_micro_batch(rank + k * self.world_size) for k in range(self.micro_batches_per_rank)]


def _epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    # A private generator per (seed, epoch): nothing global is read or advanced, so every process
    # builds the same plan, and each epoch draws its own task mix and order. (seed % 2**64 keeps
    # negative seeds valid for SeedSequence.)
    return np.random.default_rng([seed % 2**64, epoch])


def task_targets(
    counts: Sequence[int], sampling: str, alpha: float = 1.0, task_weights: Sequence[float] | None = None
) -> np.ndarray:
    """How many samples of each task an epoch draws; the total stays sum(counts).

    proportional: every task as is. temperature: p_k ∝ n_k^alpha (alpha=1 proportional, alpha=0
    uniform over tasks). weights: p_k ∝ task_weights[k]. Tasks without samples get none (a
    weight on an empty task is dropped and the others renormalized). The fractional shares are
    rounded by largest remainder (ties to the lower task id), so the total is exact.
    """
    n = np.asarray(counts, dtype=np.int64)
    total = int(n.sum())
    present = n > 0
    if sampling == "proportional":
        return n.copy()
    if sampling == "temperature":
        if alpha < 0:
            raise ValueError(f"temperature sampling needs alpha >= 0, got {alpha}")
        share = np.zeros(n.size)
        share[present] = n[present].astype(np.float64) ** alpha  # 0 ** 0 would give an empty task a share
    elif sampling == "weights":
        if task_weights is None or len(task_weights) != n.size:
            raise ValueError(
                f"sampling 'weights' needs one weight per task ({n.size}), got "
                f"{'none' if task_weights is None else len(task_weights)}: set a weight on every data.tasks entry"
            )
        w = np.asarray(task_weights, dtype=np.float64)
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError(f"task weights must be finite and >= 0, got {list(task_weights)}")
        share = np.where(present, w, 0.0)
        if total and share.sum() == 0:
            raise ValueError(f"every task that has samples has weight 0 (weights {list(task_weights)}, samples {n.tolist()})")
    else:
        raise ValueError(f"unknown sampling {sampling!r}; choose one of {', '.join(SAMPLING_POLICIES)}")
    if total == 0:
        return n.copy()
    exact = share / share.sum() * total
    targets = np.floor(exact).astype(np.int64)
    short = total - int(targets.sum())
    by_remainder = np.argsort(-(exact - targets), kind="stable")
    targets[by_remainder[:short]] += 1
    return targets


def _draw(members: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """`target` of `members`: a subset without replacement when target <= len(members); else every
    member floor(target/n) times plus a remainder without replacement (up-sampling that never
    leaves a sample out and repeats none more than once above the others, unlike i.i.d. draws)."""
    size = members.size
    if target <= size:
        return members if target == size else members[rng.choice(size, target, replace=False)]
    repeats, remainder = divmod(target, size)
    return np.concatenate([np.tile(members, repeats), members[rng.choice(size, remainder, replace=False)]])


def epoch_plan(
    split: TokenizedSplit,
    epoch: int,
    seed: int,
    seq_length: int,
    rows_per_micro_batch: int,
    world_size: int,
    grad_accum: int,
    sampling: str = "proportional",
    alpha: float = 1.0,
    task_weights: Sequence[float] | None = None,
) -> EpochPlan:
    """The plan of one training epoch, identical in every process for the same arguments.

    `task_weights` is used by sampling="weights" only (the recipe passes it always).
    """
    for name, value in (("seq_length", seq_length), ("rows_per_micro_batch", rows_per_micro_batch),
                        ("world_size", world_size), ("grad_accum", grad_accum)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")

    # 1. The task mix of this epoch.
    targets = task_targets(split.task_counts, sampling, alpha, task_weights)
    rng = _epoch_rng(seed, epoch)
    drawn = [
        _draw(np.flatnonzero(split.task_ids == task), int(target), rng) if target else np.zeros(0, dtype=np.int64)
        for task, target in enumerate(targets.tolist())
    ]
    chosen = np.concatenate(drawn) if drawn else np.zeros(0, dtype=np.int64)
    chosen = chosen[rng.permutation(chosen.size)]

    # 2. Pack into rows; shuffle the rows (best-fit decreasing orders them longest first).
    lengths = split.lengths[chosen]
    rows = pack_best_fit_decreasing(lengths, seq_length, seed=int(rng.integers(2**63)))
    packing = packing_stats(rows, lengths, seq_length)
    rows = [rows[i] for i in rng.permutation(len(rows)).tolist()]

    # 3. Micro-batches, trimmed to what all ranks can take in whole accumulation groups.
    micro_batches = -(-len(rows) // rows_per_micro_batch)
    full_micro_batches = len(rows) // rows_per_micro_batch
    per_rank = full_micro_batches // (world_size * grad_accum) * grad_accum
    if per_rank == 0:
        raise ValueError(
            f"the {split.split} split ({len(split)} samples, epoch {epoch}) packs into {len(rows)} rows of "
            f"{seq_length} tokens = {full_micro_batches} full micro-batches of {rows_per_micro_batch} row(s), but "
            f"one optimizer step needs {world_size * grad_accum} ({world_size} process(es) x grad_accum "
            f"{grad_accum}); lower train.grad_accum or train.rows_per_micro_batch, use fewer processes, or add data"
        )
    used_rows = per_rank * world_size * rows_per_micro_batch
    kept, trimmed = rows[:used_rows], rows[used_rows:]
    row_samples = chosen[np.fromiter((j for row in kept for j in row), dtype=np.int64)]
    row_offsets = np.zeros(len(kept) + 1, dtype=np.int64)
    np.cumsum(np.fromiter((len(row) for row in kept), dtype=np.int64, count=len(kept)), out=row_offsets[1:])
    trimmed_positions = np.fromiter((j for row in trimmed for j in row), dtype=np.int64)

    stats = EpochStats(
        epoch=epoch,
        sampling=sampling,
        task_available=split.task_counts.tolist(),
        task_sampled=targets.tolist(),
        task_trained=np.bincount(split.task_ids[row_samples], minlength=split.num_tasks).tolist(),
        packing=packing,
        micro_batches=micro_batches,
        micro_batches_used=per_rank * world_size,
        trimmed_rows=len(trimmed),
        trimmed_samples=int(trimmed_positions.size),
        trimmed_tokens=int(lengths[trimmed_positions].sum()),
    )
    if stats.trimmed_rows:
        log.info("%s", stats.describe())
    return EpochPlan(
        world_size=world_size,
        grad_accum=grad_accum,
        rows_per_micro_batch=rows_per_micro_batch,
        micro_batches_per_rank=per_rank,
        stats=stats,
        row_samples=row_samples,
        row_offsets=row_offsets,
    )


# ----------------------------------------------------------------------------- validation


def validation_plan(
    split: TokenizedSplit, seq_length: int, rows_per_micro_batch: int, world_size: int
) -> list[list[MicroBatch]]:
    """Per rank, micro-batches covering every sample of `split` exactly once across ranks.

    All samples are packed (best-fit decreasing, fixed seed: no sampling, no shuffle); rank r
    takes rows r, r + W, ...; its last micro-batch is padded with empty rows (all padding, no
    trained token) rather than dropped, and ranks with fewer micro-batches get all-padding
    ones, so every rank runs the same number of forward passes (ZeRO-3 and FSDP gather weights
    collectively in every forward: an uneven count would hang).
    """
    if rows_per_micro_batch < 1 or world_size < 1:
        raise ValueError(f"rows_per_micro_batch and world_size must be at least 1, got {rows_per_micro_batch}, {world_size}")
    rows = pack_best_fit_decreasing(split.lengths, seq_length, seed=0)
    if len(rows) < world_size:
        raise ValueError(
            f"the {split.split} split has {len(split)} samples, packed into {len(rows)} rows of {seq_length} "
            f"tokens: fewer than the {world_size} processes, so a process would have no validation data; "
            "hold out more validation data (raise ingest.valid_fraction or ingest.min_valid) or use fewer processes"
        )
    per_rank_rows = [rows[rank::world_size] for rank in range(world_size)]
    count = -(-len(per_rank_rows[0]) // rows_per_micro_batch)  # rank 0 has the most rows
    plans: list[list[MicroBatch]] = []
    for rank_rows in per_rank_rows:
        padded = rank_rows + [[] for _ in range(count * rows_per_micro_batch - len(rank_rows))]
        plans.append(
            [padded[i : i + rows_per_micro_batch] for i in range(0, len(padded), rows_per_micro_batch)]
        )
    return plans


# ----------------------------------------------------------------------------- collate


def collate(split: TokenizedSplit, rows: Sequence[Sequence[int]], seq_length: int, pad_id: int) -> dict[str, Any]:
    """One micro-batch as tensors [B, T] (B = len(rows), T = seq_length):

      input_ids     long; pad_id after the last sample of a row
      labels        long; the token where trained, else -100 (not shifted: the model shifts)
      position_ids  long; restart at 0 for every sample (and for the padding tail)
      task_ids      long; each token's own sample's task, -1 on padding
      sample_ids    long; 0, 1, 2, ... numbering the samples of the micro-batch, -1 on padding

    Packed samples must not attend to each other. With transformers 5.x that takes passing
    `position_ids`, `attention_mask=None` and `use_cache=False` to the model: the attention
    then derives the sample boundaries from the position restarts (flash-attention varlen, or
    the per-sample block mask in sdpa/eager). An attention_mask of ones would silently turn it
    back into plain causal attention across the whole row.
    """
    import torch  # here, not at module level: plans and splits are usable without torch

    built = []
    next_sample_id = 0
    for row in rows:
        packed = build_packed_row([split.sample(i) for i in row], seq_length, pad_id)
        sample_ids = np.full(seq_length, -1, dtype=np.int64)
        for start, end in packed.sample_bounds:
            sample_ids[start:end] = next_sample_id
            next_sample_id += 1
        built.append((packed, sample_ids))

    def stacked(values: list[np.ndarray]) -> "torch.Tensor":
        return torch.from_numpy(np.stack(values)) if values else torch.zeros((0, seq_length), dtype=torch.long)

    return {
        "input_ids": stacked([p.input_ids for p, _ in built]),
        "labels": stacked([p.labels for p, _ in built]),
        "position_ids": stacked([p.position_ids for p, _ in built]),
        "task_ids": stacked([p.task_ids for p, _ in built]),
        "sample_ids": stacked([s for _, s in built]),
    }


def to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    """The micro-batch's tensors on the training device. collate builds them on the CPU and
    nothing else moves them (a single process and DeepSpeed's engine do not move inputs; DDP
    and FSDP would): the recipe sends every micro-batch through here."""
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}
