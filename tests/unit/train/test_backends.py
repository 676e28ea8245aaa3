"""Every backend that runs on CPU trains the same optimizer steps (DESIGN.md §7): one process x 2
accumulation steps, DDP over gloo and DeepSpeed ZeRO-2/3 over gloo give the same pre-clip grad
norms, losses and weights over 3 steps; DeepSpeed steps its optimizer once per optimizer step and
resumes after a kill; the user's own accelerate setup does not leak into a run. Tiny random Llama.

Each reference run is trained once per module and shared by the tests that compare against it.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mft_core.config import load_config
from mft_core.stages import run_stage
from mft_core.train.launch import free_port
from tests.unit.train.test_train_stage import (REPO, adapter, make_project, metrics, train, train_as_machines,
                                              train_until_killed)

pytestmark = pytest.mark.slow

COMMON = dict(max_steps=3, warmup_steps=0, lora={"dropout": 0.0}, eval_every=100, checkpoint_every=100)
DDP = {"num_processes": 2}
ZERO2 = {"num_processes": 2, "backend": "deepspeed", "zero_stage": 2}
ZERO3 = {"num_processes": 2, "backend": "deepspeed", "zero_stage": 3}
RUNS = {
    "one-process-x2": dict(grad_accum=2),
    "ddp-2x1": dict(grad_accum=1, launch=DDP),
    "zero2-2x1": dict(grad_accum=1, launch=ZERO2),
    "ddp-2x2": dict(grad_accum=2, launch=DDP),
    "zero2-2x2": dict(grad_accum=2, launch=ZERO2),
    "zero3-2x2": dict(grad_accum=2, launch=ZERO3),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama_dir):
    """The train output of RUNS[name], trained the first time a test asks for it."""
    done = {}

    def get(name):
        if name not in done:
            path = make_project(tmp_path_factory.mktemp(name), tiny_llama_dir, **COMMON, **RUNS[name])
            done[name] = train(path).directory
        return done[name]

    return get


def steps(directory):
    return [m for m in metrics(directory) if "loss" in m]


def assert_same_training(reference, candidate, step_count=3):
    """Pre-clip grad norms and losses of every step, and the final weights."""
    expected, got = steps(reference), steps(candidate)
    assert [m["step"] for m in got] == [m["step"] for m in expected] == list(range(1, step_count + 1))
    for a, b in zip(expected, got):
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), f"step {a['step']}: grad norm"
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), f"step {a['step']}: loss"
    a, b = adapter(reference), adapter(candidate)
    assert a.keys() == b.keys() and any("lora_B" in k and w.abs().max() > 0 for k, w in a.items())
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=2e-6, rtol=1e-4, msg=key)


@pytest.mark.parametrize("backend", ["ddp-2x1", "zero2-2x1"])
def test_two_processes_one_accumulation_equal_one_process_two(trained, backend):
    out = trained(backend)
    assert json.loads((out / "hyperparameters.json").read_text())["world_size"] == 2
    assert_same_training(trained("one-process-x2"), out)


@pytest.mark.parametrize("backend", ["ddp-2x1", "zero2-2x1"])
def test_two_machines_of_one_process_train_like_one_machine_of_two_and_only_machine_0_publishes(
        trained, tmp_path, tiny_llama_dir, backend):
    """Two machine ranks on this host (gloo, one shared runs root). Before: both computed the same
    key and machine 1 waited for the store lock machine 0 held while machine 0's launch waited for
    machine 1 to join (a deadlock), and DeepSpeed's default multi-machine launcher was pdsh over ssh.
    Now machine 1 joins machine 0's work directory without the lock, and the run equals two
    processes on one machine."""
    launch = {**RUNS[backend]["launch"], "num_processes": 1, "num_machines": 2, "main_process_ip": "127.0.0.1",
              "main_process_port": free_port()}
    path = make_project(tmp_path, tiny_llama_dir, **COMMON, grad_accum=1, launch=launch)
    machine_0, machine_1 = train_as_machines(path, 2)
    published = [p.parent for p in (tmp_path / "runs" / "train").glob("*/_SUCCESS")]
    assert len(published) == 1 and not list((tmp_path / "runs" / "train").glob("*.partial"))
    assert "machine 1: joining" in machine_1 and f"machine 0 published {published[0]}" in machine_1
    assert "joining" not in machine_0
    assert json.loads((published[0] / "hyperparameters.json").read_text())["world_size"] == 2
    assert_same_training(trained(backend), published[0])


@pytest.mark.parametrize("backend", ["zero2-2x2", "zero3-2x2"])
def test_deepspeed_accumulates_like_ddp_and_steps_once_per_optimizer_step(trained, backend):
    out = trained(backend)
    assert_same_training(trained("ddp-2x2"), out)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 3 and summary["deepspeed_global_steps"] == 3


@pytest.mark.parametrize("backend", ["zero2-2x2", "zero3-2x2"])
def test_deepspeed_killed_then_resumed_equals_uninterrupted(trained, tmp_path, tiny_llama_dir, backend):
    """Killed as soon as checkpoint 2 of 3 is complete (DeepSpeed writes a checkpoint of this size
    too fast to be caught in the middle): the resumed run trains step 3 from it."""
    reference = trained(backend)
    path = make_project(tmp_path, tiny_llama_dir, **{**COMMON, **RUNS[backend], "checkpoint_every": 2})
    cfg = load_config(path)
    run_stage(cfg, "ingest")
    run_stage(cfg, "tokenize")
    with open(tmp_path / "cli.log", "w") as output:
        proc = subprocess.Popen([sys.executable, "-m", "mft_core.cli", "train", "--config", str(path)],
                                cwd=REPO, start_new_session=True, stdout=output, stderr=subprocess.STDOUT)
        partial, deadline = None, time.time() + 400
        while time.time() < deadline and proc.poll() is None:
            hits = list((tmp_path / "runs" / "train").glob("*.partial/checkpoints/step-0000002/COMPLETE"))
            if hits:
                partial = hits[0].parents[2]
                break
            time.sleep(0.005)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert partial is not None, "the trainer never completed checkpoint 2:\n" + (tmp_path / "cli.log").read_text()[-3000:]
    complete = sorted(p.name for p in (partial / "checkpoints").glob("step-*") if (p / "COMPLETE").exists())
    assert complete == ["step-0000002"], "killed too late: step 3 was checkpointed, nothing left to resume"
    saved = [torch.load(f, map_location="cpu", weights_only=False)["module"]
             for f in (partial / "checkpoints" / "step-0000002").rglob("*model_states.pt")]
    assert saved and any("lora_" in key for state in saved for key in state)
    # DeepSpeed leaves frozen parameters out by their first name: the output head, tied to the
    # frozen input embeddings, stays under its second one, the only piece of the base it keeps.
    frozen = {key for state in saved for key in state if "lora_" not in key}
    assert frozen <= {"model.base_model.model.lm_head.weight"}, f"the checkpoint holds the frozen base: {sorted(frozen)[:3]}"

    resumed = run_stage(cfg, "train").directory
    assert json.loads((resumed / "train_summary.json").read_text())["deepspeed_global_steps"] == 3
    assert_same_training(reference, resumed)


def test_ddp_killed_then_resumed_equals_uninterrupted(trained, tmp_path, tiny_llama_dir):
    """Before: a DDP checkpoint names its weights as the unwrapped model does, and the resume
    compared them with the names under DDP's wrapper ("module."): every resumed run of more than
    one DDP process stopped with "does not match the model's trainable weights"."""
    reference = trained("ddp-2x2")
    path = make_project(tmp_path, tiny_llama_dir, **{**COMMON, **RUNS["ddp-2x2"], "checkpoint_every": 2})
    partial = train_until_killed(path, tmp_path / "runs", "step-0000002/COMPLETE")
    assert partial is not None, "the trainer never completed checkpoint 2"
    complete = sorted(p.name for p in (partial / "checkpoints").glob("step-*") if (p / "COMPLETE").exists())
    assert complete == ["step-0000002"], "killed too late: step 3 was checkpointed, nothing left to resume"
    resumed = run_stage(load_config(path), "train").directory
    assert_same_training(reference, resumed)


def test_the_users_accelerate_config_and_variables_change_nothing(trained, tmp_path, tiny_llama_dir, monkeypatch):
    """`accelerate launch` merges ~/.cache/huggingface/accelerate/default_config.yaml into every
    setting its flags leave open (here a one-GPU machine's), and the processes read ACCELERATE_*
    variables: a stray ACCELERATE_GRADIENT_ACCUMULATION_STEPS divides every loss."""
    reference = trained("ddp-2x1")  # before the poison
    home = tmp_path / "hf-home"
    (home / "accelerate").mkdir(parents=True)
    (home / "accelerate" / "default_config.yaml").write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_processes: 1\ngpu_ids: '0'\n"
        "mixed_precision: fp16\ndebug: true\nenable_cpu_affinity: true\n")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    out = train(make_project(tmp_path / "poisoned", tiny_llama_dir, **COMMON, **RUNS["ddp-2x1"])).directory
    assert_same_training(reference, out)
