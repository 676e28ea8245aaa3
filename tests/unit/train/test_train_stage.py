"""The train stage for real: the trainer subprocess, accelerate launch over gloo, DeepSpeed
ZeRO, checkpoints and resume, on a tiny random Llama (CPU)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mft_core.config import load_config
from mft_core.stages import run_stage

REPO = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.slow


def make_project(root: Path, model_dir: Path, beta_weight: float = 2.0, **train) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in ("alpha", "beta"):
        (root / name).mkdir(exist_ok=True)
        with open(root / name / "d.jsonl", "w") as fh:
            for i in range(60):
                q = f"{name} question {i}: " + "more words " * (i % 7)
                fh.write(json.dumps({"chat_rounds": [{"role": "human", "content": q},
                                                     {"role": "bot", "content": f"def f{i}(x):\n    return x * {i}"}]}) + "\n")
    settings = {"grad_accum": 2, "rows_per_micro_batch": 1, "max_steps": 4, "eval_every": 2,
                "checkpoint_every": 2, "warmup_steps": 1, "lr": 5e-3, "min_lr": 1e-4, "precision": "fp32",
                "threads": 1, **train}
    config = {
        "data": {"tasks": [{"path": "alpha"}, {"path": "beta", "weight": beta_weight}]},
        "model": {"path": str(model_dir)},
        "ingest": {"decontaminate": {"enabled": False}, "min_valid": 8},
        "tokenize": {"seq_length": 96, "num_workers": 1},
        "train": settings,
    }
    (root / "pipeline.yaml").write_text(json.dumps(config))
    return root / "pipeline.yaml"


def train(path: Path):
    cfg = load_config(path)
    run_stage(cfg, "ingest")
    run_stage(cfg, "tokenize")
    return run_stage(cfg, "train")


def adapter(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model" / "adapter_model.safetensors")


def metrics(directory: Path) -> list[dict]:
    return [json.loads(l) for l in (directory / "metrics.jsonl").read_text().splitlines()]


def test_single_process_outputs_metrics_and_summary(tmp_path, tiny_llama_dir):
    run = train(make_project(tmp_path, tiny_llama_dir, max_steps=6))
    out = run.directory
    assert (out / "model" / "adapter_config.json").is_file() and (out / "best-model").is_dir()
    steps = [m for m in metrics(out) if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6]
    assert set(steps[0]["task_loss"]) == {"alpha", "beta"} and steps[-1]["loss"] < steps[0]["loss"]
    lrs = [m["lr"] for m in steps]
    assert lrs[-1] == pytest.approx(1e-4)  # min_lr reached at the last step: the horizon is exact
    valid = [m for m in metrics(out) if "valid_loss" in m]
    assert [m["step"] for m in valid] == [2, 4, 6]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 6 and set(summary["final_valid_task_loss"]) == {"alpha", "beta"}
    assert (out / "loss_curves.png").stat().st_size > 1000 and list((out / "tensorboard").iterdir())
    assert not (out / "checkpoints").exists()  # optimizer states are dropped once training succeeded
    hyper = json.loads((out / "hyperparameters.json").read_text())
    assert hyper["world_size"] == 1 and hyper["precision"] == "fp32"


def test_two_processes_one_accumulation_equal_one_process_two(tmp_path, tiny_llama_dir):
    common = dict(max_steps=1, warmup_steps=0, lora={"dropout": 0.0}, eval_every=100, checkpoint_every=100)
    one = train(make_project(tmp_path / "one", tiny_llama_dir, grad_accum=2, **common)).directory
    two = train(make_project(tmp_path / "two", tiny_llama_dir, grad_accum=1,
                             launch={"num_processes": 2}, **common)).directory
    assert json.loads((two / "hyperparameters.json").read_text())["world_size"] == 2
    a, b = adapter(one), adapter(two)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-6, rtol=1e-4, msg=key)
    loss_one = [m for m in metrics(one) if "loss" in m][0]["loss"]
    loss_two = [m for m in metrics(two) if "loss" in m][0]["loss"]
    assert loss_one == pytest.approx(loss_two, rel=1e-5)


KILL_WHEN = ".tmp-step-0000004"


def test_killed_mid_checkpoint_then_resumed_equals_uninterrupted(tmp_path, tiny_llama_dir):
    settings = dict(max_steps=6, checkpoint_every=2)  # dropout on: the RNG state must be restored too
    reference = train(make_project(tmp_path / "ref", tiny_llama_dir, **settings)).directory

    path = make_project(tmp_path / "crash", tiny_llama_dir, **settings)
    cfg = load_config(path)
    run_stage(cfg, "ingest")
    run_stage(cfg, "tokenize")
    proc = subprocess.Popen([sys.executable, "-m", "mft_core.cli", "train", "--config", str(path)],
                            cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial, deadline = None, time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        hits = list((tmp_path / "crash" / "runs" / "train").glob(f"*.partial/checkpoints/{KILL_WHEN}"))
        if hits:
            partial = hits[0].parents[1]
            break
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert partial is not None, "the trainer never started checkpoint 4"
    complete = sorted(p.name for p in (partial / "checkpoints").glob("step-*") if (p / "COMPLETE").exists())
    assert complete == ["step-0000002"]  # step 4 was being written: not complete

    resumed = run_stage(cfg, "train").directory
    ref_steps = {m["step"]: m["loss"] for m in metrics(reference) if "loss" in m}
    new_steps = {m["step"]: m["loss"] for m in metrics(resumed) if "loss" in m}
    assert new_steps.keys() == ref_steps.keys() == set(range(1, 7))
    for step in ref_steps:
        assert new_steps[step] == pytest.approx(ref_steps[step], rel=1e-6, abs=1e-7), step
    a, b = adapter(reference), adapter(resumed)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)


def test_a_resumed_auto_run_keeps_the_precision_it_started_in(tmp_path, tiny_llama_dir):
    from mft_core.train.model import resolve_precision
    from mft_core.train.stage import run_train

    cfg = load_config(make_project(tmp_path, tiny_llama_dir, max_steps=2, precision="auto"))
    run_stage(cfg, "ingest")
    tokenize_dir = run_stage(cfg, "tokenize").directory
    # The run before the crash resolved `auto` to what this machine would not choose now.
    started_in = "fp32" if resolve_precision("auto", on_gpu=False) == "bf16" else "bf16"
    work = cfg.runs_root / "train" / "resumed.partial"  # where the store keeps a crashed run
    work.mkdir(parents=True)
    (work / "train_job.json").write_text(json.dumps({"precision": started_in}))
    run_train(cfg, tokenize_dir, work)
    assert json.loads((work / "hyperparameters.json").read_text())["precision"] == started_in


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_with_two_gloo_processes_trains_and_saves(tmp_path, tiny_llama_dir, stage):
    out = train(make_project(tmp_path, tiny_llama_dir, max_steps=2, lora={"dropout": 0.0},
                             launch={"num_processes": 2, "backend": "deepspeed", "zero_stage": stage})).directory
    assert json.loads((out / "hyperparameters.json").read_text())["world_size"] == 2
    weights = adapter(out)
    assert weights and all(torch.isfinite(w).all() for w in weights.values())
    lora_b = [w for k, w in weights.items() if "lora_B" in k]
    assert any(w.abs().max() > 0 for w in lora_b)  # trained: LoRA B starts at zero
    assert len([m for m in metrics(out) if "loss" in m]) == 2


def test_focal_task_loss_and_temperature_sampling_run(tmp_path, tiny_llama_dir):
    out = train(make_project(tmp_path, tiny_llama_dir, max_steps=3, loss="focal_task", sampling="temperature",
                             sampling_alpha=0.0)).directory
    steps = [m for m in metrics(out) if "loss" in m]
    assert len(steps) == 3 and all(m["loss"] > 0 for m in steps)


def test_coba_resumed_after_warmup_equals_uninterrupted(tmp_path, tiny_llama_dir):
    settings = dict(max_steps=6, checkpoint_every=3, loss="coba", lora={"dropout": 0.0},
                    coba={"warmup_steps": 2, "history_length": 4, "valid_batches": 1})
    reference = train(make_project(tmp_path / "ref", tiny_llama_dir, beta_weight=1.0, **settings)).directory
    weights = [m["task_weight"] for m in metrics(reference) if "task_weight" in m]
    assert len(weights) == 6 and all(abs(sum(w.values()) - 1) < 1e-6 for w in weights)
    assert weights[-1] != weights[0]  # re-weighted after warmup

    # the same run in two halves: stop after step 3 (a checkpoint after warmup), then resume
    path = make_project(tmp_path / "halves", tiny_llama_dir, beta_weight=1.0, **settings)
    cfg = load_config(path)
    run_stage(cfg, "ingest")
    run_stage(cfg, "tokenize")
    proc = subprocess.Popen([sys.executable, "-m", "mft_core.cli", "train", "--config", str(path)],
                            cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "halves" / "runs" / "train").glob("*.partial/checkpoints/step-0000003/COMPLETE")):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list((tmp_path / "halves" / "runs" / "train").glob("*/_SUCCESS")), "killed too late"
    resumed = run_stage(cfg, "train").directory
    again = [m["task_weight"] for m in metrics(resumed) if "task_weight" in m]
    assert len(again) == 6
    for a, b in zip(weights, again):
        assert a == pytest.approx(b, rel=1e-6)
    assert [m["loss"] for m in metrics(reference) if "loss" in m] == pytest.approx(
        [m["loss"] for m in metrics(resumed) if "loss" in m], rel=1e-6)
