"""Keys change only when results can: a setting with no effect in the chosen mode, a layout-only
setting, or a forced rebuild with the same results leaves the keys (and so the cache) as they were."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mft_core import store
from mft_core.config import config_from_dict
from mft_core.stages import compute_key, run_stage
from mft_core.train.data import TokenizedSplit
from mft_core.train.stage import train_key_parts
from test_tokenize_stage import load, make_project


def train_cfg(tmp_path: Path, model: Path, **train):
    raw = {"runs_root": "runs", "data": {"tasks": [{"path": "t"}]}, "model": {"path": str(model)}, "train": train}
    return config_from_dict(raw, tmp_path)


def train_key(tmp_path, model, **train) -> str:
    config, inputs = train_key_parts(train_cfg(tmp_path, model, **train), store.FileHashCache(tmp_path))
    return store.stage_key("train", 1, config, inputs)


@pytest.mark.parametrize("base, no_effect, effect", [
    ({"loss": "case3"}, {"focal_gamma": 5.0}, {"loss": "focal_task", "focal_gamma": 5.0}),
    ({"loss": "case3"}, {"coba": {"tau": 2.0}}, {"loss": "coba", "coba": {"tau": 2.0}}),
    ({"sampling": "proportional"}, {"sampling_alpha": 0.9}, {"sampling": "temperature", "sampling_alpha": 0.9}),
    ({}, {"launch": {"zero_stage": 3}}, {"launch": {"backend": "deepspeed", "zero_stage": 3}}),
    ({"method": "full"}, {"lora": {"r": 64}}, {"method": "lora", "lora": {"r": 64}}),
])
def test_a_train_setting_without_effect_in_the_chosen_mode_does_not_retrain(tmp_path, tiny_llama_dir, base,
                                                                              no_effect, effect):
    reference = train_key(tmp_path, tiny_llama_dir, **base)
    assert train_key(tmp_path, tiny_llama_dir, **{**base, **no_effect}) == reference
    assert train_key(tmp_path, tiny_llama_dir, **{**base, **effect}) != reference


def test_layout_settings_change_neither_keys_nor_the_samples(tmp_path, tiny_llama_dir):
    small = load(make_project(tmp_path / "a", tiny_llama_dir, shard_size_mb=0.001), **{"ingest.row_group_size": 64})
    large = load(make_project(tmp_path / "b", tiny_llama_dir, shard_size_mb=64.0), **{"ingest.row_group_size": 8192})
    small_run = [run_stage(small, "ingest"), run_stage(small, "tokenize")]
    large_run = [run_stage(large, "ingest"), run_stage(large, "tokenize")]
    assert [run.key for run in small_run] == [run.key for run in large_run]
    small_shards = json.loads((small_run[1].directory / "shards.json").read_text())
    large_shards = json.loads((large_run[1].directory / "shards.json").read_text())
    assert len(small_shards) > len(large_shards)  # really another layout
    for split in ("train", "valid"):  # the same samples in the same order: training cannot tell them apart
        a, b = TokenizedSplit(small_run[1].directory, split), TokenizedSplit(large_run[1].directory, split)
        assert len(a) == len(b)
        for index in range(len(a)):
            one, other = a.sample(index), b.sample(index)
            assert one["task_id"] == other["task_id"]
            assert one["input_ids"].tolist() == other["input_ids"].tolist()
            assert one["loss_mask"].tolist() == other["loss_mask"].tolist()


def fake_train_output(runs_root: Path, key: str, step_seconds: float, event_file: str) -> Path:
    """A train output with the same weights but other timings and TensorBoard files: what a forced
    retrain with identical results writes."""
    def build(work: Path) -> None:
        (work / "model").mkdir()
        (work / "model" / "adapter_model.safetensors").write_bytes(b"the same weights")
        (work / "hyperparameters.json").write_text(json.dumps({"train": {"method": "lora"}, "precision": "fp32"}))
        (work / "train_summary.json").write_text(json.dumps({"steps": 4, "final_valid_task_loss": {"t": 1.5}}))
        (work / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0, "step_seconds": step_seconds}) + "\n")
        (work / "tensorboard").mkdir()
        (work / "tensorboard" / event_file).write_bytes(b"events")
        (work / "loss_curves.png").write_bytes(str(step_seconds).encode())

    return store.build_stage(runs_root, "train", key, build, force=True).directory


def test_a_forced_retrain_with_the_same_weights_keeps_the_merge_key(tmp_path, tiny_llama_dir):
    cfg = train_cfg(tmp_path, tiny_llama_dir)
    first = fake_train_output(cfg.runs_root, "k" * 64, 1.25, "events.out.tfevents.1764950000.host-a.1")
    merge_key = compute_key(cfg, "merge", first)
    copy = tmp_path / "first-copy"
    shutil.copytree(first, copy)
    again = fake_train_output(cfg.runs_root, "k" * 64, 1.31, "events.out.tfevents.1764951234.host-b.7")
    assert (again / "manifest.json").read_text() != (copy / "manifest.json").read_text()  # timings did change
    assert compute_key(cfg, "merge", again) == merge_key
    (again / "model" / "adapter_model.safetensors").write_bytes(b"other weights")  # what merge reads
    store.write_manifest(again, "train", "k" * 64)
    assert compute_key(cfg, "merge", again) != merge_key


def test_evaluation_generates_in_the_precision_training_resolved(tmp_path, tiny_llama_dir, monkeypatch):
    """`precision: auto` is resolved once, by training (it may time a matmul); evaluation and its
    resumes take that answer from the train output instead of measuring again."""
    from mft_core.eval.stage import generation_precision
    from mft_core.train import model as train_model

    cfg = load(make_project(tmp_path, tiny_llama_dir), **{"train.precision": "auto"})
    tokenized = [run_stage(cfg, "ingest"), run_stage(cfg, "tokenize")][1].directory
    key = compute_key(cfg, "train", tokenized)
    store.build_stage(cfg.runs_root, "train", key,
                      lambda work: (work / "hyperparameters.json").write_text(json.dumps({"precision": "bf16"})))

    def measuring_again(*args):
        raise AssertionError("precision measured again although training resolved it")

    monkeypatch.setattr(train_model, "resolve_precision", measuring_again)
    assert generation_precision(cfg) == "bf16"
