"""The preflight: what a run will need is checked before its first stage, and a missing piece is
an error in seconds that names it and the command that fixes it."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mft_core.config import config_from_dict
from mft_core.preflight import PreflightError, disk_estimate, preflight, stages_to_build
from mft_core.stages import STAGE_ORDER, run_stage



def write_task(folder: Path, records: int = 40) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "data.jsonl", "w") as handle:
        for i in range(records):
            handle.write(json.dumps({"prompt": f"question {i}", "answer": f"answer {i}"}) + "\n")
    return folder


def make_cfg(tmp_path: Path, model: str | Path, **sections):
    write_task(tmp_path / "task")
    raw = {"runs_root": "runs", "data": {"tasks": [{"path": "task"}]}, "model": {"path": str(model)},
           "ingest": {"decontaminate": {"enabled": False}, "min_valid": 2}, **sections}
    return config_from_dict(raw, tmp_path)


def huge_model_folder(folder: Path, parameters: int) -> Path:
    """A model folder whose safetensors header declares `parameters` weights (and holds none):
    the preflight reads sizes from headers, so this is a model of that size as far as it knows."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    header = json.dumps({"weight": {"dtype": "F32", "shape": [parameters], "data_offsets": [0, 0]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    return folder


def test_a_missing_toolchain_fails_before_any_stage_with_the_install_command(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("MFT_TOOLCHAINS_DIR", str(tmp_path / "fresh-toolchains"))  # nothing installed there
    cfg = make_cfg(tmp_path, tiny_llama_dir, evaluate={"languages": ["js"]})
    if "js" not in cfg.benchmark().languages:
        pytest.skip("no JavaScript problems here (HumanEval-X not found): evaluate would not run js")
    with pytest.raises(PreflightError) as caught:
        preflight(cfg, STAGE_ORDER)
    message = str(caught.value)
    assert "evaluate needs the js toolchain: js-md5 missing" in message
    assert "fix: scripts/install-toolchains.sh" in message
    assert not (tmp_path / "runs" / "ingest").exists()  # nothing was started


def test_a_model_that_cannot_be_had_is_named_with_the_offline_switch(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    cfg = make_cfg(tmp_path, "some-org/not-downloaded")
    with pytest.raises(PreflightError, match=r"(?s)the model cannot be had: .*some-org/not-downloaded.*HF_HUB_OFFLINE"):
        preflight(cfg, ["ingest", "tokenize", "train"])


def test_too_little_disk_for_the_model_is_an_error_naming_both_sizes(tmp_path):
    model = huge_model_folder(tmp_path / "huge", parameters=10**14)  # 400 TB in fp32: no disk here has it
    cfg = make_cfg(tmp_path, model, merge={"dtype": "fp32"})
    with pytest.raises(PreflightError, match=r"not enough free disk under .*runs: about [\d.]+ GB needed .* GB free"):
        preflight(cfg, ["ingest", "tokenize", "train", "merge"])
    preflight(cfg, ["ingest"])  # ingest alone needs only the data's size


def test_the_estimate_follows_what_the_stages_write(tmp_path):
    model = huge_model_folder(tmp_path / "m", parameters=10**9)
    lora = make_cfg(tmp_path, model)
    full = make_cfg(tmp_path, model, train={"method": "full", "keep_checkpoints": 2})
    merge_only = disk_estimate(lora, ["merge"], 10**9)
    assert merge_only == 4 * 10**9  # the merged fp32 model
    assert disk_estimate(full, ["train"], 10**9) > 9 * 4 * 10**9  # 3 checkpoints of weights + two moments
    assert disk_estimate(lora, ["train"], 10**9) < disk_estimate(full, ["train"], 10**9) / 10


def test_a_built_stage_needs_nothing_and_is_not_checked(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, "some-org/not-downloaded")
    run_stage(cfg, "ingest")
    assert stages_to_build(cfg, ["ingest"], []) == []
    assert preflight(cfg, ["ingest"]) == []
    assert stages_to_build(cfg, ["ingest"], ["ingest"]) == ["ingest"]
    assert stages_to_build(cfg, ["ingest", "tokenize"], []) == ["tokenize"]


def test_mft_run_stops_in_seconds_with_the_message_and_exit_status_2(tmp_path, tiny_llama_dir):
    cfg_file = tmp_path / "pipeline.yaml"
    write_task(tmp_path / "task")
    cfg_file.write_text(f"data: {{tasks: [{{path: task}}]}}\nmodel: {{path: {tmp_path / 'no-such-model'}}}\n"
                        "ingest: {decontaminate: {enabled: false}}\n")
    started = time.monotonic()
    done = subprocess.run([str(Path(sys.prefix) / "bin" / "mft"), "run", "--config", str(cfg_file)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "this run cannot finish" in done.stderr and "no-such-model" in done.stderr
    assert time.monotonic() - started < 60  # Python, torch-free start and the checks: seconds
    assert not (tmp_path / "runs" / "ingest").exists()
