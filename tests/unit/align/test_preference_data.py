"""Preference data through ingest and tokenize: located rejects with the new reasons, the pair
columns, pair shards (chosen then rejected, only the final answer trained), the pair as the
packing unit, and packed pairs giving the log-probs of one pair per row."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from mft_core.config import config_from_dict
from mft_core.data.ingest import IngestError, read_tasks
from mft_core.data.render import RenderedSample
from mft_core.data.tokenize import final_answer_only, fit_pair
from mft_core.stages import run_stage
from tests.unit.test_records import PREFERENCE_REJECTS


def write_project(root: Path, pairs: list, sft: int = 20):
    for name, records in (("code", [{"prompt": f"q{i}", "answer": f"a{i}"} for i in range(sft)]), ("prefer", pairs)):
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def config(root: Path, model_dir: Path | None = None, seq_length: int = 64, **ingest):
    raw = {"runs_root": "runs", "data": {"tasks": [{"path": "code"}, {"path": "prefer", "kind": "preference"}]},
           "ingest": {"decontaminate": {"enabled": False}, "min_valid": 2, **ingest},
           "tokenize": {"seq_length": seq_length, "num_workers": 1}, "align": {"enabled": True}}
    if model_dir is not None:
        raw["model"] = {"path": str(model_dir)}
    return config_from_dict(raw, root)


def good_pairs(n: int) -> list[dict]:
    turns = lambda i, answer: [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": answer}]
    return [{"chosen": turns(i, f"yes {i}"), "rejected": turns(i, f"no {i}")} if i % 2 else
            {"prompt": f"question {i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(n)]


@pytest.mark.parametrize("reason", sorted(PREFERENCE_REJECTS))
def test_a_bad_preference_record_is_a_located_error_with_its_reason_and_fix(tmp_path, reason):
    write_project(tmp_path, good_pairs(10))
    with open(tmp_path / "prefer" / "d.jsonl", "ab") as fh:
        fh.write(PREFERENCE_REJECTS[reason] + b"\n")
    with pytest.raises(IngestError) as info:
        run_stage(config(tmp_path), "ingest")
    message = str(info.value)
    assert f"{tmp_path / 'prefer' / 'd.jsonl'}:11: invalid record ({reason})" in message
    assert "Fix:" in message


def test_preference_rows_keep_both_answers_and_a_duplicate_pair_is_dropped(tmp_path):
    pairs = good_pairs(12)
    write_project(tmp_path, pairs + [pairs[0]])
    run = run_stage(config(tmp_path, on_error="skip"), "ingest")
    stats = json.loads((run.directory / "stats.json").read_text())["tasks"]["prefer"]
    assert stats["duplicates"] == 1 and stats["kept"] == 12
    rows = [r for split in ("train", "valid") for r in pq.read_table(run.directory / "data/prefer" / f"{split}.parquet").to_pylist()]
    by_source = {r["source"]: r for r in rows}
    assert by_source["prefer/d.jsonl:2"]["messages"] == [{"role": "user", "content": "question 1"}]
    assert (by_source["prefer/d.jsonl:2"]["chosen"], by_source["prefer/d.jsonl:2"]["rejected"]) == ("yes 1", "no 1")
    assert {r["shape"] for r in rows} == {"preference"}
    assert [t.get("kind") for t in read_tasks(run.directory)] == [None, "preference"]


def test_pair_shards_hold_chosen_then_rejected_with_only_the_final_answer_trained(tmp_path, tiny_llama_dir, tiny_tokenizer):
    """Rows 2p, 2p + 1 of a preference shard are pair p's two sides, the same conversation up to
    the answer, where only the answer (and its EOS) is trained; the earlier rounds are context."""
    from mft_core.train.data import TokenizedSplit

    two_rounds = [{"chosen": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "earlier answer"},
                              {"role": "user", "content": "again"}, {"role": "assistant", "content": f"yes {i}"}],
                   "rejected": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "earlier answer"},
                                {"role": "user", "content": "again"}, {"role": "assistant", "content": f"no {i}"}]}
                  for i in range(8)]
    write_project(tmp_path, two_rounds)
    cfg = config(tmp_path, tiny_llama_dir, seq_length=256)
    run_stage(cfg, "ingest")
    out = run_stage(cfg, "tokenize").directory
    listing = json.loads((out / "shards.json").read_text())
    assert {s.get("kind") for s in listing if s["task"] == "prefer"} == {"preference"}
    assert all("kind" not in s for s in listing if s["task"] == "code")
    split = TokenizedSplit(out, "train")
    split.keep_tasks([1])
    stats = json.loads((out / "stats.json").read_text())["tasks"]["prefer"]["train"]
    assert len(split) == 2 * stats["samples"] and stats["samples"] >= 4 and stats["dropped"] == 0
    for p in range(len(split) // 2):
        chosen, rejected = split.sample(2 * p), split.sample(2 * p + 1)
        answer = lambda s: tiny_tokenizer.decode([t for t, m in zip(s["input_ids"], s["loss_mask"]) if m])
        assert answer(chosen).startswith("yes") and answer(rejected).startswith("no")
        assert "earlier answer" not in answer(chosen) + answer(rejected)
        first_trained = list(chosen["loss_mask"]).index(1)
        assert list(chosen["input_ids"][:first_trained]) == list(rejected["input_ids"][:first_trained])


def test_a_pair_too_long_for_a_row_is_cut_to_half_a_row_per_side_or_dropped():
    side = lambda n, trained_from: RenderedSample(list(range(n)), [0] * trained_from + [1] * (n - trained_from), [n])
    kept, status = fit_pair(side(30, 10), side(30, 10), 64, "truncate")
    assert status.value == "kept" and [len(s) for s in kept] == [30, 30]
    cut, status = fit_pair(side(50, 10), side(20, 10), 64, "truncate")
    assert status.value == "truncated" and [len(s) for s in cut] == [32, 20]
    assert fit_pair(side(50, 10), side(20, 10), 64, "drop") == (None, fit_pair(side(50, 10), side(20, 10), 64, "drop")[1])
    dropped, status = fit_pair(side(50, 40), side(20, 10), 64, "truncate")  # no trained token left in the chosen half
    assert dropped is None and status.value == "dropped"
    earlier = RenderedSample(list(range(10)), [0, 0, 1, 1, 0, 0, 0, 1, 1, 1], [4, 10])
    assert final_answer_only(earlier).loss_mask == [0, 0, 0, 0, 0, 0, 0, 1, 1, 1]


def test_packed_pairs_give_the_log_probs_of_one_pair_per_row(tmp_path, tiny_llama_dir):
    """Three pairs packed into one row, isolated by position restarts, give each side the summed
    log-prob it gets alone in its own row: nothing of one sample leaks into another."""
    from mft_core.align.data import PairSplit, pair_rows
    from mft_core.align.losses import pair_logps
    from mft_core.train import losses
    from mft_core.train.data import TokenizedSplit, collate
    from mft_core.train.model import TokenLossModel
    from transformers import AutoModelForCausalLM

    write_project(tmp_path, good_pairs(12))
    cfg = config(tmp_path, tiny_llama_dir)
    run_stage(cfg, "ingest")
    out = run_stage(cfg, "tokenize").directory
    pairs = PairSplit(TokenizedSplit(out, "train"), [1])
    model = TokenLossModel(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation="sdpa")).eval()

    def logps(rows):
        batch = collate(pairs.samples, pair_rows(rows), 64 * 3, pad_id=0)
        tasks = torch.tensor([int(pairs.samples.task_ids[i]) for row in pair_rows(rows) for i in row])
        with torch.no_grad():
            out = model(batch["input_ids"], batch["position_ids"], batch["labels"])
        result = pair_logps(out.token_loss.double(), losses.trained_values(batch["sample_ids"], batch["labels"]), tasks)
        return torch.stack([result.chosen, result.rejected], dim=1)

    packed = logps([[0, 1, 2]])
    alone = torch.cat([logps([[p]]) for p in range(3)])
    assert packed.shape == (3, 2)
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-4)
    assert (packed[:, 0] - packed[:, 1]).abs().max() > 1e-3  # the two sides do differ
