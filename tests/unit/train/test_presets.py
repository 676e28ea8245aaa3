"""Every single-machine preset in configs/ trains: its train section (method, LoRA, precision,
attention, checkpointing, rows per micro-batch, backend, ZeRO stage) runs 2 optimizer steps on the
tiny random Llama, on CPU where its backend can (DDP and DeepSpeed over gloo, at most 2
processes and 2 accumulation steps). FSDP needs GPUs; multi-machine presets need their machines."""

import json
from pathlib import Path

import pytest

from mft_core.config import config_from_dict, load_config
from mft_core.stages import run_stage
from tests.unit.train.test_train_stage import make_project

REPO = Path(__file__).resolve().parents[3]
PRESETS = sorted((REPO / "configs").glob("*.yaml"))
pytestmark = pytest.mark.slow


def smoke_config(preset: Path, root: Path, model_dir: Path):
    """The preset's train section on the tiny project: everything but its scale."""
    train = load_config(preset).stage_section("train")
    launch = train["launch"]
    if launch["num_machines"] > 1 or launch["backend"] == "fsdp":
        pytest.skip(f"{preset.name}: {'several machines' if launch['num_machines'] > 1 else 'FSDP needs GPUs'}")
    launch["num_processes"] = min(launch["num_processes"], 2)
    train.update(launch=launch, max_steps=2, epochs=1, warmup_steps=0, grad_accum=min(train["grad_accum"], 2),
                 eval_every=2, checkpoint_every=2, threads=1)
    if train["method"] != "full":
        train["lora"]["r"] = min(train["lora"]["r"], 8)
    tiny = json.loads(make_project(root, model_dir).read_text())
    return config_from_dict({**tiny, "train": train}, root, source=f"{preset.name} on the tiny model")


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_single_machine_preset_trains_on_cpu(preset, tmp_path, tiny_llama_dir):
    cfg = smoke_config(preset, tmp_path, tiny_llama_dir)
    for stage in ("ingest", "tokenize"):
        run_stage(cfg, stage)
    out = run_stage(cfg, "train").directory
    summary = json.loads((out / "train_summary.json").read_text())
    hyper = json.loads((out / "hyperparameters.json").read_text())
    assert summary["steps"] == 2 and hyper["world_size"] == cfg.train.launch.num_processes
    assert (out / "model").is_dir()
