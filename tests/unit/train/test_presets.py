"""Every single-machine preset in configs/ trains: its train section (method, LoRA, precision,
attention, checkpointing, rows per micro-batch, backend, ZeRO stage) runs 2 optimizer steps on the
tiny random Llama, on CPU where its backend can (DDP and DeepSpeed over gloo, at most 2
processes and 2 accumulation steps). A multi-machine preset runs as two machine ranks of one
process each on this host, over gloo. No preset uses FSDP, which needs GPUs: one that did would
fail here with the launcher's "fsdp needs GPUs" until the test learns to run it elsewhere."""

import json
from pathlib import Path

import pytest

from mft_core.config import config_from_dict, load_config
from mft_core.stages import run_stage
from mft_core.train.launch import free_port
from tests.unit.train.test_train_stage import make_project, train_as_machines

REPO = Path(__file__).resolve().parents[3]
PRESETS = sorted((REPO / "configs").glob("*.yaml"))
pytestmark = pytest.mark.slow


def smoke_raw(preset: Path, root: Path, model_dir: Path) -> dict:
    """The preset's train section on the tiny project: everything but its scale. Several machines
    become as many machine ranks of one process each on this host."""
    train = load_config(preset).stage_section("train")
    launch = train["launch"]
    launch["num_processes"] = 1 if launch["num_machines"] > 1 else min(launch["num_processes"], 2)
    if launch["num_machines"] > 1:
        launch.update(num_machines=2, machine_rank=0, main_process_ip="127.0.0.1", main_process_port=free_port())
    train.update(launch=launch, max_steps=2, epochs=1, warmup_steps=0, grad_accum=min(train["grad_accum"], 2),
                 eval_every=2, checkpoint_every=2, threads=1)
    if train["method"] != "full":
        train["lora"]["r"] = min(train["lora"]["r"], 8)
    tiny = json.loads(make_project(root, model_dir).read_text())
    return {**tiny, "train": train}


def machines(preset: Path) -> int:
    return load_config(preset).train.launch.num_machines


@pytest.mark.parametrize("preset", [p for p in PRESETS if machines(p) == 1], ids=lambda p: p.name)
def test_every_single_machine_preset_trains_on_cpu(preset, tmp_path, tiny_llama_dir):
    cfg = config_from_dict(smoke_raw(preset, tmp_path, tiny_llama_dir), tmp_path, source=f"{preset.name} on the tiny model")
    for stage in ("ingest", "tokenize"):
        run_stage(cfg, stage)
    out = run_stage(cfg, "train").directory
    summary = json.loads((out / "train_summary.json").read_text())
    hyper = json.loads((out / "hyperparameters.json").read_text())
    assert summary["steps"] == 2 and hyper["world_size"] == cfg.train.launch.num_processes
    assert (out / "model").is_dir()


@pytest.mark.parametrize("preset", [p for p in PRESETS if machines(p) > 1], ids=lambda p: p.name)
def test_every_multi_machine_preset_runs_as_machine_ranks_on_one_host(preset, tmp_path, tiny_llama_dir):
    path = tmp_path / "pipeline.yaml"
    path.write_text(json.dumps(smoke_raw(preset, tmp_path, tiny_llama_dir)))
    outputs = train_as_machines(path, 2)
    published = [p.parent for p in (tmp_path / "runs" / "train").glob("*/_SUCCESS")]
    assert len(published) == 1 and "machine 1: joining" in outputs[1]
    summary = json.loads((published[0] / "train_summary.json").read_text())
    assert summary["steps"] == 2 and json.loads((published[0] / "hyperparameters.json").read_text())["world_size"] == 2


def aligns(preset: Path) -> bool:
    return load_config(preset).align.enabled


@pytest.mark.parametrize("preset", [p for p in PRESETS if aligns(p)], ids=lambda p: p.name)
def test_every_align_preset_fine_tunes_then_aligns_on_cpu(preset, tmp_path, tiny_llama_dir):
    """Its train and align sections, scaled down, on the tiny project with a preference task."""
    from tests.unit.align.test_align_stage import make_project as make_align_project

    raw = json.loads(make_align_project(tmp_path, tiny_llama_dir).read_text())
    raw["train"] = smoke_raw(preset, tmp_path / "sft", tiny_llama_dir)["train"]
    align = load_config(preset).stage_section("align")
    align.update(max_steps=2, epochs=1, warmup_steps=0, grad_accum=min(align["grad_accum"], 2), eval_every=2,
                 checkpoint_every=2)
    cfg = config_from_dict({**raw, "align": align}, tmp_path, source=f"{preset.name} on the tiny model")
    for stage in ("ingest", "tokenize", "train"):
        run_stage(cfg, stage)
    out = run_stage(cfg, "align").directory
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 2 and summary["method"] == load_config(preset).align.method
    assert (out / "model" / "adapter_config.json").is_file()
