"""Training data (mft_core.train.data): mapped splits, epoch plans, sharding, collate, validation."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from mft_core.data.pack import IGNORE_INDEX, PAD_TASK_ID, packing_stats
from mft_core.data.tokenize import SHARD_SCHEMA, open_shard
from mft_core.train.data import TokenizedSplit, collate, epoch_plan, task_targets, validation_plan

SEQ = 64
PAD = 3
# Train / valid samples per task. gamma has no validation sample (its valid shard is empty).
TASKS = {"alpha": (150, 12), "beta": (48, 7), "gamma": (15, 0)}


def sample_tokens(task_id: int, number: int, length: int) -> tuple[list[int], list[int]]:
    """Token ids below the tiny Llama's vocabulary (512); the second half of a sample is trained."""
    ids = [4 + (task_id * 131 + number * 17 + j * 7) % 500 for j in range(length)]
    return ids, [0] * (length // 2) + [1] * (length - length // 2)


def shard_table(task_id: int, first: int, lengths: list[int], source: str) -> pa.Table:
    rows = [sample_tokens(task_id, first + i, n) for i, n in enumerate(lengths)]
    return pa.table(
        {
            "input_ids": [ids for ids, _ in rows],
            "loss_mask": [mask for _, mask in rows],
            "task_id": [task_id] * len(lengths),
            "length": lengths,
            "source": [f"{source}:{first + i + 1}" for i in range(len(lengths))],
        },
        schema=SHARD_SCHEMA,
    )


def write_tokenize_output(root: Path, tasks: dict[str, tuple[int, int]], seed: int = 0) -> Path:
    """Shards and shards.json in the tokenize stage's format: Arrow IPC streams with SHARD_SCHEMA,
    <split>/<task>-<NNNNN>.arrow, one listing entry per shard. Each train task is cut into two
    shards, the first written as two record batches (a shard the reader must walk batch by batch)."""
    rng = np.random.default_rng(seed)
    listing = []
    for task_id, (task, sizes) in enumerate(tasks.items()):
        for split, count in zip(("train", "valid"), sizes):
            lengths = rng.integers(3, SEQ + 1, size=count).tolist()
            cuts = [0, count // 2, count] if split == "train" else [0, count]
            for index, (a, b) in enumerate(zip(cuts, cuts[1:])):
                part = lengths[a:b]
                if index == 0 and len(part) > 1:
                    half = len(part) // 2
                    table = pa.concat_tables([shard_table(task_id, a, part[:half], task),
                                              shard_table(task_id, a + half, part[half:], task)])
                else:
                    table = shard_table(task_id, a, part, task)
                name = f"{split}/{task}-{index:05d}.arrow"
                (root / split).mkdir(parents=True, exist_ok=True)
                with pa.OSFile(str(root / name), "wb") as sink, pa.ipc.new_stream(sink, SHARD_SCHEMA) as writer:
                    writer.write_table(table)
                listing.append({"split": split, "task": task, "task_id": task_id, "file": name,
                                "rows": len(part), "tokens": int(sum(part))})
    (root / "shards.json").write_text(json.dumps(listing, indent=1) + "\n")
    return root


@pytest.fixture(scope="module")
def tokenize_dir(tmp_path_factory) -> Path:
    return write_tokenize_output(tmp_path_factory.mktemp("tokenized"), TASKS)


@pytest.fixture(scope="module")
def train(tokenize_dir) -> TokenizedSplit:
    return TokenizedSplit(tokenize_dir, "train")


@pytest.fixture(scope="module")
def valid(tokenize_dir) -> TokenizedSplit:
    return TokenizedSplit(tokenize_dir, "valid")


def plan(split, epoch=0, seed=1, rows=2, world=1, accum=1, **sampling):
    return epoch_plan(split, epoch=epoch, seed=seed, seq_length=SEQ, rows_per_micro_batch=rows,
                      world_size=world, grad_accum=accum, **sampling)


def shortest_of_each_task(split) -> list[int]:
    return [int(np.flatnonzero(split.task_ids == k)[np.argmin(split.lengths[split.task_ids == k])]) for k in range(3)]


def samples_of(micro_batches) -> list[int]:
    return [i for micro_batch in micro_batches for row in micro_batch for i in row]


# ----------------------------------------------------------------------------- the split


def test_split_indexes_every_shard_and_maps_it_without_copying(tokenize_dir):
    before = pa.total_allocated_bytes()
    split = TokenizedSplit(tokenize_dir, "train")
    assert pa.total_allocated_bytes() == before  # token columns are views of the mapped files
    assert len(split) == sum(train for train, _ in TASKS.values())
    assert split.num_tasks == 3 and split.task_names == ["alpha", "beta", "gamma"]
    assert split.task_counts.tolist() == [150, 48, 15]
    assert len(split.shard_files) == 6
    listing = json.loads((tokenize_dir / "shards.json").read_text())
    assert split.num_tokens == sum(e["tokens"] for e in listing if e["split"] == "train")

    for index in (0, 37, 74, 75, 149, 150, len(split) - 1):  # both batches of a shard, every shard
        got = split.sample(index)
        table = open_shard(split.shard_files[split.shard_index[index]])
        row = table.slice(int(split.row_index[index]), 1).to_pylist()[0]
        assert got["input_ids"].tolist() == row["input_ids"]
        assert got["loss_mask"].tolist() == row["loss_mask"]
        assert got["task_id"] == row["task_id"] == split.task_ids[index]
        assert len(row["input_ids"]) == split.lengths[index] == row["length"]
        assert not got["input_ids"].flags.owndata
    with pytest.raises(IndexError, match="outside the train split"):
        split.sample(len(split))


def test_valid_split_keeps_the_task_list_of_all_splits(valid):
    assert valid.num_tasks == 3 and valid.task_counts.tolist() == [12, 7, 0]


def test_split_errors_say_what_is_wrong(tmp_path, tokenize_dir):
    with pytest.raises(FileNotFoundError, match="run the tokenize stage first"):
        TokenizedSplit(tmp_path, "train")
    with pytest.raises(ValueError, match="no split 'test'.*train, valid"):
        TokenizedSplit(tokenize_dir, "test")
    broken = write_tokenize_output(tmp_path / "broken", {"alpha": (10, 2)})
    listing = json.loads((broken / "shards.json").read_text())
    listing[0]["rows"] += 1
    (broken / "shards.json").write_text(json.dumps(listing))
    with pytest.raises(ValueError, match=r"alpha-00000.arrow has 5 rows but .*says 6.*rerun the tokenize stage"):
        TokenizedSplit(broken, "train")


# ----------------------------------------------------------------------------- epoch plans


def test_plan_is_deterministic_and_uses_no_global_random_state(train):
    np.random.seed(0)
    random.seed(0)
    state = np.random.get_state()[1].copy()
    first = plan(train, world=2, accum=2, sampling="temperature", alpha=0.5)
    assert np.array_equal(np.random.get_state()[1], state)  # the global generator was not used
    np.random.seed(123)
    random.seed(123)
    torch.manual_seed(123)
    second = plan(train, world=2, accum=2, sampling="temperature", alpha=0.5)
    for rank in range(2):
        assert first.micro_batches(rank) == second.micro_batches(rank)
    assert first.stats == second.stats


@pytest.mark.parametrize("world, accum, rows", [(1, 1, 1), (1, 3, 2), (2, 2, 1), (3, 2, 2), (4, 1, 3)])
def test_proportional_epoch_trains_every_sample_at_most_once_and_counts_the_tail(train, world, accum, rows):
    p = plan(train, world=world, accum=accum, rows=rows)
    per_rank = [p.micro_batches(rank) for rank in range(world)]
    assert len({len(m) for m in per_rank}) == 1, "every rank gets the same number of micro-batches"
    assert p.micro_batches_per_rank % accum == 0 and p.num_optimizer_steps == p.micro_batches_per_rank // accum
    assert all(len(micro_batch) == rows for m in per_rank for micro_batch in m)
    used = [samples_of(m) for m in per_rank]
    union = [i for part in used for i in part]
    assert len(union) == len(set(union)), "no sample twice: on one rank or on two (no double sharding)"
    stats = p.stats
    assert len(union) + stats.trimmed_samples == len(train), "every sample: trained, or counted as trimmed"
    assert stats.task_sampled == train.task_counts.tolist()
    assert stats.task_trained == np.bincount(train.task_ids[union], minlength=3).tolist()
    assert stats.trimmed_rows < world * accum * rows, "only the tail that cannot fill a step is trimmed"
    assert stats.packing.rows == stats.trimmed_rows + world * p.micro_batches_per_rank * rows
    assert stats.trimmed_tokens == int(train.lengths.sum()) - int(train.lengths[union].sum())


def test_single_process_epoch_without_a_tail_holds_every_sample_exactly_once(train):
    p = plan(train, rows=1, world=1, accum=1)
    assert sorted(samples_of(p.micro_batches(0))) == list(range(len(train)))
    assert p.stats.trimmed_samples == 0 and p.stats.trimmed_rows == 0
    rows = [row for micro_batch in p.micro_batches(0) for row in micro_batch]
    assert p.stats.packing == packing_stats(rows, train.lengths, SEQ)


def test_no_row_holds_more_than_seq_length_tokens(train):
    p = plan(train, world=2, accum=1, sampling="temperature", alpha=0.0)
    rows = [row for rank in range(2) for micro_batch in p.micro_batches(rank) for row in micro_batch]
    assert max(int(train.lengths[row].sum()) for row in rows) <= SEQ
    assert all(row for row in rows)
    assert 0.5 < p.stats.packing.efficiency <= 1.0


def test_each_optimizer_step_gets_the_same_micro_batches_whatever_the_process_split(train):
    """W processes x G accumulation steps see, step by step, what 1 process x W*G steps sees."""
    two_processes = plan(train, world=2, accum=1)
    one_process = plan(train, world=1, accum=2)
    assert two_processes.num_optimizer_steps == one_process.num_optimizer_steps
    ranks = [two_processes.micro_batches(r) for r in range(2)]
    single = one_process.micro_batches(0)
    for step in range(one_process.num_optimizer_steps):
        assert [ranks[0][step], ranks[1][step]] == single[2 * step : 2 * step + 2]


def test_epochs_reshuffle_and_resample(train):
    first, second = plan(train, epoch=0, rows=1), plan(train, epoch=1, rows=1)
    assert first.micro_batches(0) != second.micro_batches(0), "each epoch has its own order"
    assert sorted(samples_of(first.micro_batches(0))) == sorted(samples_of(second.micro_batches(0)))
    assert plan(train, seed=2, rows=1).micro_batches(0) != first.micro_batches(0)
    down = [plan(train, epoch=e, rows=1, sampling="temperature", alpha=0.0) for e in (0, 1)]
    alpha = [{i for i in samples_of(p.micro_batches(0)) if train.task_ids[i] == 0} for p in down]
    assert alpha[0] != alpha[1], "each epoch draws its own subset of a down-sampled task"


def test_temperature_zero_is_uniform_over_tasks_and_one_is_proportional(train):
    counts = train.task_counts.tolist()  # [150, 48, 15], 213 in all
    assert task_targets(counts, "temperature", alpha=1.0).tolist() == counts
    assert task_targets(counts, "temperature", alpha=0.0).tolist() == [71, 71, 71]
    half = task_targets(counts, "temperature", alpha=0.5)
    expected = np.sqrt(counts) / np.sqrt(counts).sum() * 213
    assert np.abs(half - expected).max() < 1 and half.sum() == 213
    assert task_targets([10, 0, 5], "temperature", alpha=0.0).tolist() == [8, 0, 7]  # empty tasks get nothing

    p = plan(train, rows=1, sampling="temperature", alpha=0.0)  # one process, one row a step: no tail
    drawn = samples_of(p.micro_batches(0))
    assert p.stats.task_sampled == [71, 71, 71] and len(drawn) == 213
    shares = np.bincount(train.task_ids[drawn], minlength=3) / len(drawn)
    assert np.allclose(shares, 1 / 3, atol=0.01)
    uses = Counter(drawn)
    alpha_members = [i for i in range(len(train)) if train.task_ids[i] == 0]
    assert max(uses[i] for i in alpha_members) == 1, "a down-sampled task draws without replacement"
    gamma_members = [i for i in range(len(train)) if train.task_ids[i] == 2]
    assert {uses[i] for i in gamma_members} <= {4, 5}, "71 of 15: every sample 4 times, 11 of them a 5th"
    assert sum(uses[i] for i in gamma_members) == 71


def test_weights_sampling_and_its_errors(train):
    assert task_targets([150, 48, 15], "weights", task_weights=[1, 1, 2]).tolist() == [53, 53, 107]
    assert task_targets([150, 48, 0], "weights", task_weights=[1, 1, 2]).tolist() == [99, 99, 0]
    p = plan(train, rows=1, sampling="weights", task_weights=[0.0, 1.0, 1.0])
    assert p.stats.task_sampled == [0, 107, 106] and p.stats.task_trained == [0, 107, 106]
    with pytest.raises(ValueError, match="one weight per task"):
        plan(train, sampling="weights")
    with pytest.raises(ValueError, match="finite and >= 0"):
        plan(train, sampling="weights", task_weights=[1, -1, 1])
    with pytest.raises(ValueError, match="unknown sampling 'uniform'"):
        plan(train, sampling="uniform")
    # Loss weights passed along with proportional sampling do not change the mix.
    assert plan(train, task_weights=[5, 1, 1]).stats.task_sampled == [150, 48, 15]


def test_too_little_data_for_one_step_is_a_clear_error(train):
    with pytest.raises(ValueError, match=r"needs 800 \(8 process\(es\) x grad_accum 100\).*lower train.grad_accum"):
        plan(train, world=8, accum=100)


def test_a_rank_outside_the_world_is_an_error(train):
    with pytest.raises(ValueError, match="rank 2 is outside"):
        plan(train, world=2, accum=3).micro_batches(2)


# ----------------------------------------------------------------------------- collate


def test_collate_builds_packed_tensors_with_per_sample_positions_labels_and_ids(train):
    shortest = shortest_of_each_task(train)
    rows = [shortest, [5]]  # the shortest alpha, beta and gamma samples in one row; a lone alpha sample
    assert sum(train.lengths[shortest]) < SEQ
    batch = collate(train, rows, SEQ, PAD)
    assert set(batch) == {"input_ids", "labels", "position_ids", "task_ids", "sample_ids"}
    for tensor in batch.values():
        assert tensor.shape == (2, SEQ) and tensor.dtype == torch.long

    sample_id = 0
    for r, row in enumerate(rows):
        start = 0
        for index in row:
            sample = train.sample(index)
            end = start + len(sample["input_ids"])
            ids = torch.tensor(sample["input_ids"].tolist())
            mask = torch.tensor(sample["loss_mask"].tolist()).bool()
            assert torch.equal(batch["input_ids"][r, start:end], ids)
            assert torch.equal(batch["position_ids"][r, start:end], torch.arange(end - start))
            expected_labels = torch.where(mask, ids, IGNORE_INDEX)
            expected_labels[0] = IGNORE_INDEX  # a sample's first token is never a target
            assert torch.equal(batch["labels"][r, start:end], expected_labels)
            assert (batch["task_ids"][r, start:end] == sample["task_id"]).all()
            assert (batch["sample_ids"][r, start:end] == sample_id).all()
            sample_id += 1
            start = end
        assert (batch["input_ids"][r, start:] == PAD).all()
        assert (batch["labels"][r, start:] == IGNORE_INDEX).all()
        assert (batch["task_ids"][r, start:] == PAD_TASK_ID).all()
        assert (batch["sample_ids"][r, start:] == -1).all()


def test_collated_packed_rows_keep_samples_isolated_in_the_model(train, tiny_llama):
    """position_ids + attention_mask=None + use_cache=False: a packed sample's logits equal its
    logits alone (transformers derives the per-sample mask from the position restarts)."""
    torch.set_num_threads(1)
    row = shortest_of_each_task(train)
    batch = collate(train, [row], SEQ, PAD)
    with torch.no_grad():
        packed = tiny_llama(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                            attention_mask=None, use_cache=False).logits
        start = 0
        for index in row:
            ids = torch.tensor(train.sample(index)["input_ids"].tolist())[None]
            alone = tiny_llama(input_ids=ids, use_cache=False).logits
            torch.testing.assert_close(packed[:, start : start + ids.shape[1]], alone, atol=1e-5, rtol=1e-5)
            start += ids.shape[1]
    assert len(row) >= 2


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("world, rows", [(1, 1), (1, 4), (2, 2), (3, 1), (3, 2)])
def test_validation_covers_every_sample_once_with_equal_batches_per_rank(valid, world, rows):
    plans = validation_plan(valid, seq_length=SEQ, rows_per_micro_batch=rows, world_size=world)
    assert len(plans) == world
    assert len({len(p) for p in plans}) == 1, "the same number of forward passes on every rank"
    assert all(len(micro_batch) == rows for p in plans for micro_batch in p), "short batches are padded"
    seen = [i for p in plans for i in samples_of(p)]
    assert sorted(seen) == list(range(len(valid)))
    assert all(samples_of(p) for p in plans), "every rank has validation data"
    assert validation_plan(valid, SEQ, rows, world) == plans  # deterministic
    padded = collate(valid, plans[-1][-1], SEQ, PAD)  # a padding row collates to no trained token
    assert padded["input_ids"].shape == (rows, SEQ)


def test_too_little_validation_data_says_how_much_there_is_and_what_to_change(tmp_path):
    small = TokenizedSplit(write_tokenize_output(tmp_path, {"alpha": (6, 2)}), "valid")
    rows = len(validation_plan(small, SEQ, 1, 1)[0])
    with pytest.raises(ValueError, match=rf"2 samples, packed into {rows} rows.*ingest.valid_fraction or ingest.min_valid"):
        validation_plan(small, SEQ, rows_per_micro_batch=1, world_size=rows + 1)


# ----------------------------------------------------------------------------- the real tokenize stage


def test_split_reads_the_tokenize_stage_output(tmp_path, tiny_llama_dir):
    """The real ingest + tokenize stages on two tiny tasks, then a plan, a batch and validation."""
    from mft_core.config import load_config
    from mft_core.stages import run_stage

    for name in ("alpha", "beta"):
        (tmp_path / name).mkdir()
        lines = [json.dumps({"chat_rounds": [{"role": "human", "content": f"{name} {i} " + "w " * (i % 9)},
                                             {"role": "bot", "content": f"def f{i}(x):\n    return x + {i}"}]})
                 for i in range(40)]
        (tmp_path / name / "d.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "pipeline.yaml").write_text(json.dumps({
        "data": {"tasks": [{"path": "alpha"}, {"path": "beta"}]},
        "model": {"path": str(tiny_llama_dir)},
        "ingest": {"decontaminate": {"enabled": False}, "min_valid": 4},
        "tokenize": {"seq_length": SEQ, "num_workers": 1},
    }))
    cfg = load_config(tmp_path / "pipeline.yaml")
    run_stage(cfg, "ingest")
    out = run_stage(cfg, "tokenize").directory
    template = json.loads((out / "template.json").read_text())

    train_split, valid_split = TokenizedSplit(out, "train"), TokenizedSplit(out, "valid")
    assert train_split.task_names == ["alpha", "beta"]
    assert len(train_split) + len(valid_split) == 80 and len(valid_split) >= 8
    first = open_shard(train_split.shard_files[0]).slice(0, 1).to_pylist()[0]
    assert train_split.sample(0)["input_ids"].tolist() == first["input_ids"]

    p = epoch_plan(train_split, epoch=0, seed=0, seq_length=template["seq_length"], rows_per_micro_batch=2,
                   world_size=1, grad_accum=1)
    batch = collate(train_split, p.micro_batches(0)[0], template["seq_length"], template["pad_id"])
    assert (batch["labels"] != IGNORE_INDEX).any() and set(batch["task_ids"].unique().tolist()) <= {-1, 0, 1}
    per_rank = validation_plan(valid_split, SEQ, rows_per_micro_batch=2, world_size=2)
    assert sorted(samples_of(per_rank[0]) + samples_of(per_rank[1])) == list(range(len(valid_split)))
