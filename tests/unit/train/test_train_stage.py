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


def train_until_killed(cfg_path: Path, runs_root: Path, checkpoint_glob: str) -> Path | None:
    """Ingests and tokenizes, then `stage_until_killed` the training."""
    cfg = load_config(cfg_path)
    run_stage(cfg, "ingest")
    run_stage(cfg, "tokenize")
    return stage_until_killed(cfg_path, runs_root, checkpoint_glob)


def stage_until_killed(cfg_path: Path, runs_root: Path, checkpoint_glob: str, stage: str = "train",
                       overrides: tuple[str, ...] = ()) -> Path | None:
    """Runs `mft <stage>` (train or align; --set each override) in a subprocess and SIGKILLs it,
    with its whole process group, as soon as a path matching
    runs/<stage>/*.partial/checkpoints/<checkpoint_glob> appears; returns that run's .partial
    folder, or None when it never appeared (the run ended first)."""
    sets = [arg for override in overrides for arg in ("--set", override)]
    proc = subprocess.Popen([sys.executable, "-m", "mft_core.cli", stage, "--config", str(cfg_path), *sets],
                            cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial, deadline = None, time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        hits = list((runs_root / stage).glob(f"*.partial/checkpoints/{checkpoint_glob}"))
        if hits:
            partial = next(p for p in hits[0].parents if p.name.endswith(".partial"))
            break
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return partial


def train_as_machines(cfg_path: Path, machines: int) -> list[str]:
    """Ingests and tokenizes, then runs `mft train` once per machine rank, all on this host and one
    runs root (the shape of a multi-machine run: every machine runs the same command with its
    rank); the highest rank starts first, so the others wait for machine 0. Returns each rank's
    output, in rank order, after checking that every one exited 0."""
    cfg = load_config(cfg_path)
    run_stage(cfg, "ingest")
    run_stage(cfg, "tokenize")
    procs = {rank: subprocess.Popen([sys.executable, "-m", "mft_core.cli", "train", "--config", str(cfg_path),
                                     "--set", f"train.launch.machine_rank={rank}"], cwd=REPO, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for rank in reversed(range(machines))}
    outputs = {rank: proc.communicate(timeout=600)[0] for rank, proc in procs.items()}
    for rank, proc in procs.items():
        assert proc.returncode == 0, f"machine {rank} exited {proc.returncode}:\n{outputs[rank][-4000:]}"
    return [outputs[rank] for rank in range(machines)]


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


KILL_WHEN = ".tmp-step-0000004"


def test_killed_mid_checkpoint_then_resumed_equals_uninterrupted(tmp_path, tiny_llama_dir):
    settings = dict(max_steps=6, checkpoint_every=2)  # dropout on: the RNG state must be restored too
    reference = train(make_project(tmp_path / "ref", tiny_llama_dir, **settings)).directory

    path = make_project(tmp_path / "crash", tiny_llama_dir, **settings)
    cfg = load_config(path)
    partial = train_until_killed(path, tmp_path / "crash" / "runs", KILL_WHEN)
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
    train_until_killed(path, tmp_path / "halves" / "runs", "step-0000003/COMPLETE")
    assert not list((tmp_path / "halves" / "runs" / "train").glob("*/_SUCCESS")), "killed too late"
    newest = max(p.parent.name for p in (tmp_path / "halves" / "runs" / "train").glob("*.partial/checkpoints/step-*/COMPLETE"))
    assert newest == "step-0000003", "killed after step 6's checkpoint: nothing left to resume after warmup"
    resumed = run_stage(cfg, "train").directory
    again = [m["task_weight"] for m in metrics(resumed) if "task_weight" in m]
    assert len(again) == 6
    for a, b in zip(weights, again):
        assert a == pytest.approx(b, rel=1e-6)
    assert [m["loss"] for m in metrics(reference) if "loss" in m] == pytest.approx(
        [m["loss"] for m in metrics(resumed) if "loss" in m], rel=1e-6)


def test_coba_measures_the_same_validation_batches_so_an_unchanged_model_has_flat_curves(tmp_path, tiny_llama_dir):
    """A learning rate of 1e-30 leaves the model as it was (LoRA's B moves to ~1e-30, far below
    fp32's resolution of the outputs it adds to), so validation losses cannot change. CoBa divides
    by the full pass and measures the same micro-batches at every step: flat curves, zero slopes,
    uniform weights. With the full pass as the curves' first point, or micro-batches that cycle
    through the validation set (other task mixes and lengths each time), the slopes would fit
    which samples were measured and the weights would move."""
    settings = dict(max_steps=6, lr=1e-30, min_lr=0.0, warmup_steps=0, checkpoint_every=100, loss="coba",
                    lora={"dropout": 0.0}, coba={"warmup_steps": 2, "history_length": 4, "valid_batches": 1})
    out = train(make_project(tmp_path, tiny_llama_dir, beta_weight=1.0, **settings)).directory
    weights = [m["task_weight"] for m in metrics(out) if "task_weight" in m]
    assert len(weights) == 6
    for step_weights in weights:
        assert list(step_weights.values()) == pytest.approx([0.5, 0.5], abs=1e-12)


def test_continued_pretraining_trains_every_token_of_the_concatenated_windows_once_per_epoch(tmp_path, tiny_llama_dir):
    """tokenize.packing: concatenated with method full (MFTCoder's mpt): one epoch trains every
    window once, and in each every token but its first (the previous window's last: already a
    target there), so every token of each task's stream but its first is trained exactly once."""
    path = make_project(tmp_path, tiny_llama_dir, method="full", loss="case1", max_steps=None, epochs=1,
                        grad_accum=1, checkpoint_every=1000, eval_every=1000)  # no row left out of whole steps
    config = json.loads(path.read_text())
    config["tokenize"]["packing"] = "concatenated"
    path.write_text(json.dumps(config))
    out = train(path).directory
    tokenize_dir = load_config(path).runs_root / "tokenize"
    [shards_file] = tokenize_dir.glob("*/shards.json")
    from mft_core.data.tokenize import open_shard

    windows = [len(ids) for s in json.loads(shards_file.read_text()) if s["split"] == "train"
               for ids in open_shard(shards_file.parent / s["file"]).column("input_ids").to_pylist()]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["trained_tokens"] == sum(windows) - len(windows)
    assert json.loads((out / "hyperparameters.json").read_text())["train"]["method"] == "full"


def test_every_micro_batch_reaches_the_model_through_to_device(tmp_path, tiny_llama_dir, monkeypatch):
    """Stands in for a GPU. collate builds CPU tensors and a single process (like DeepSpeed's
    engine) does not move inputs: on a GPU the first forward fails. On a CPU a batch left behind
    is where the model is, so what is checked is the mechanism: every tensor any forward gets
    (training, validation, CoBa's measurements) came out of recipe.to_device, sent to the
    accelerator's device. The recipe runs in this process, with to_device recorded."""
    from accelerate.state import AcceleratorState, GradientState

    from mft_core.train import recipe
    from mft_core.train.model import TokenLossModel
    from mft_core.train.stage import write_train_job

    cfg = load_config(make_project(tmp_path, tiny_llama_dir, beta_weight=1.0, max_steps=2, eval_every=1, loss="coba",
                                   coba={"warmup_steps": 0, "valid_batches": 1}))
    run_stage(cfg, "ingest")
    work = cfg.runs_root / "train" / "recorded.partial"  # where the store keeps a run's work
    work.mkdir(parents=True)
    write_train_job(cfg, run_stage(cfg, "tokenize").directory, work)
    moved, targets, seen = [], [], []
    real_to_device, real_forward = recipe.to_device, TokenLossModel.forward

    def recording_to_device(batch, device):
        out = real_to_device(batch, device)
        moved.extend(out.values())  # kept alive: their ids stay theirs
        targets.append(torch.device(device))
        return out

    def watched_forward(self, input_ids, position_ids, labels, real_tokens=None):
        seen.append((input_ids, position_ids, labels))  # real_tokens is computed from the moved task_ids
        return real_forward(self, input_ids, position_ids, labels, real_tokens=real_tokens)

    monkeypatch.setattr(recipe, "to_device", recording_to_device)
    monkeypatch.setattr(TokenLossModel, "forward", watched_forward)
    monkeypatch.setenv("MFT_TRAIN_THREADS", "1")
    try:
        recipe.main(work)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert [m["step"] for m in metrics(work) if "loss" in m] == [1, 2]
    valid = len([m for m in metrics(work) if "valid_loss" in m])
    assert valid == 2 and len(seen) > 2 * 2 + 2  # training, validation and CoBa forwards all seen
    came_from_to_device = {id(t) for t in moved}
    assert all(id(t) in came_from_to_device for inputs in seen for t in inputs)
    assert targets and set(targets) == {torch.device("cpu")}  # the accelerator's device here


def test_a_run_resumed_from_its_final_checkpoint_trains_no_extra_step(tmp_path, tiny_llama_dir):
    """Killed after its last checkpoint (step 3 of 3, mid-epoch) but before publishing: the rerun
    finds a finished state and goes straight to saving."""
    path = make_project(tmp_path, tiny_llama_dir, max_steps=3, checkpoint_every=100, eval_every=100)
    cfg = load_config(path)
    train_until_killed(path, tmp_path / "runs", "step-0000003/COMPLETE")
    assert not list((tmp_path / "runs" / "train").glob("*/_SUCCESS")), "killed too late: nothing left to resume"
    resumed = run_stage(cfg, "train").directory
    assert [m["step"] for m in metrics(resumed) if "loss" in m] == [1, 2, 3]
    summary = json.loads((resumed / "train_summary.json").read_text())
    assert summary["steps"] == summary["total_steps"] == 3 and not summary["early_stopped"]


def test_epochs_of_different_step_counts_all_train_and_the_run_ends_with_its_validation(tmp_path, tiny_llama_dir):
    """With weight (or temperature) sampling each epoch draws another mix and packs to its own
    number of steps: the run's total is their sum, not epoch 0's count times the epochs."""
    from mft_core.train.data import TokenizedSplit, epoch_plan

    settings = dict(sampling="weights", epochs=2, max_steps=None, grad_accum=2, eval_every=1000, checkpoint_every=1000)
    cfg = load_config(make_project(tmp_path, tiny_llama_dir, beta_weight=3.0, **settings))
    run_stage(cfg, "ingest")
    split = TokenizedSplit(run_stage(cfg, "tokenize").directory, "train")
    counts = [epoch_plan(split, epoch=e, seed=cfg.train.seed, seq_length=96, rows_per_micro_batch=1, world_size=1,
                         grad_accum=2, sampling="weights", task_weights=[1.0, 3.0]).num_optimizer_steps for e in (0, 1)]
    assert counts[0] != counts[1], "both epochs pack to the same step count: the test would not test anything"
    out = run_stage(cfg, "train").directory
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == summary["total_steps"] == sum(counts) and not summary["early_stopped"]
    steps = [m for m in metrics(out) if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, sum(counts) + 1))
    assert steps[-1]["lr"] == pytest.approx(1e-4)  # the schedule's horizon is the real total
    assert [m["step"] for m in metrics(out) if "valid_loss" in m] == [sum(counts)]  # the final validation ran


def test_train_tasks_trains_and_validates_the_selected_tasks_on_the_shared_tokenize_output(tmp_path, tiny_llama_dir):
    """train.tasks: [beta] trains on beta's samples only and validates beta only, from the same
    ingest and tokenize outputs as a run on every task (the experiment flow's single-task arms)."""
    everything = train(make_project(tmp_path, tiny_llama_dir, max_steps=2, eval_every=2))
    only_beta = train(make_project(tmp_path, tiny_llama_dir, max_steps=2, eval_every=2, tasks=["beta"]))
    assert only_beta.directory != everything.directory  # its own train key
    assert len(list((tmp_path / "runs" / "tokenize").glob("*/_SUCCESS"))) == 1  # one shared tokenize output
    steps = [m for m in metrics(only_beta.directory) if "loss" in m]
    assert steps and all(m["task_tokens"]["alpha"] == 0 and m["task_tokens"]["beta"] > 0 for m in steps)
    summary = json.loads((only_beta.directory / "train_summary.json").read_text())
    assert set(summary["final_valid_task_loss"]) == {"beta"}
    assert set(json.loads((everything.directory / "train_summary.json").read_text())["final_valid_task_loss"]) == {"alpha", "beta"}


def test_train_tasks_names_an_unknown_task_fails_at_config_time(tmp_path, tiny_llama_dir):
    with pytest.raises(ValueError, match=r"train\.tasks.*'gamma'.*alpha, beta"):
        load_config(make_project(tmp_path, tiny_llama_dir, tasks=["gamma"]))


def test_a_machine_of_rank_above_0_never_builds_an_output_it_waits_for_machine_0s(tmp_path, tiny_llama_dir, monkeypatch):
    from mft_core import store

    launch = {"num_machines": 2, "main_process_ip": "127.0.0.1", "main_process_port": 29555}
    path = make_project(tmp_path, tiny_llama_dir, launch=launch)
    machine_1 = load_config(path, {"train.launch.machine_rank": 1})
    monkeypatch.setattr(store, "MACHINE_WAIT_S", 0.5)
    with pytest.raises(TimeoutError, match=r"machine 0 did not publish .*ingest.*machine_rank=0"):
        run_stage(machine_1, "ingest")
    assert not list((tmp_path / "runs").glob("ingest/*"))  # no output, no lock, no work directory
    built = run_stage(load_config(path), "ingest")  # machine 0
    found = run_stage(machine_1, "ingest")
    assert found.directory == built.directory and not found.computed
    run_stage(load_config(path), "tokenize")
    with pytest.raises(TimeoutError, match=r"machine 0 did not start training"):
        run_stage(machine_1, "train")
    assert not list((tmp_path / "runs").glob("train/*"))


def test_several_machines_need_the_port_of_machine_0(tmp_path, tiny_llama_dir):
    with pytest.raises(ValueError, match="num_machines > 1 needs main_process_port"):
        load_config(make_project(tmp_path, tiny_llama_dir, launch={"num_machines": 2, "main_process_ip": "10.0.0.1"}))
