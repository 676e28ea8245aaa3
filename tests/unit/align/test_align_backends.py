"""Align on every backend that runs on CPU trains the same optimizer steps: one process x 2
accumulation steps, DDP over gloo (2 x 1) and DeepSpeed ZeRO-2 over gloo (2 x 1) give the same
pre-clip grad norms, losses and align adapter over 3 steps, from one fine-tuned model (train runs
once, in one process; only align.launch differs). Tiny random Llama."""

import json

import pytest
import torch
from safetensors.torch import load_file

from mft_core.config import load_config
from mft_core.stages import run_stage
from tests.unit.align.test_align_stage import make_project

pytestmark = pytest.mark.slow

COMMON = {"align.max_steps": 3, "align.warmup_steps": 0, "align.lora": {"dropout": 0.0}, "align.eval_every": 100,
          "align.checkpoint_every": 100, "align.rows_per_micro_batch": 1}
RUNS = {
    "one-process-x2": {"align.grad_accum": 2},
    "ddp-2x1": {"align.grad_accum": 1, "align.launch": {"num_processes": 2}},
    "zero2-2x1": {"align.grad_accum": 1, "align.launch": {"num_processes": 2, "backend": "deepspeed", "zero_stage": 2}},
}


@pytest.fixture(scope="module")
def aligned(tmp_path_factory, tiny_llama_dir):
    path = make_project(tmp_path_factory.mktemp("align-backends"), tiny_llama_dir)
    done = {}

    def get(name):
        if name not in done:
            cfg = load_config(path, {**COMMON, **RUNS[name]})
            for stage in ("ingest", "tokenize", "train"):
                run_stage(cfg, stage)
            done[name] = run_stage(cfg, "align").directory
        return done[name]

    return get


def steps(directory):
    return [m for m in map(json.loads, (directory / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


@pytest.mark.parametrize("backend", ["ddp-2x1", "zero2-2x1"])
def test_two_processes_align_like_one_process_with_two_accumulation_steps(aligned, backend):
    reference, candidate = aligned("one-process-x2"), aligned(backend)
    expected, got = steps(reference), steps(candidate)
    assert [m["step"] for m in got] == [m["step"] for m in expected] == [1, 2, 3]
    for a, b in zip(expected, got):
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), f"step {a['step']}: grad norm"
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), f"step {a['step']}: loss"
        assert b["task_pairs"] == a["task_pairs"]
    a = load_file(reference / "align-adapter" / "adapter_model.safetensors")
    b = load_file(candidate / "align-adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any("lora_B" in k and w.abs().max() > 0 for k, w in a.items())
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=2e-6, rtol=1e-4, msg=key)
