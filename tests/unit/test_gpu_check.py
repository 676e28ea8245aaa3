"""bench/gpu_check.py, the acceptance script for a lent GPU, in its CPU smoke mode on the tiny
random Llama, so that it cannot rot: every check runs (DeepSpeed ZeRO-2/3 on one process over
gloo, FSDP units, QLoRA on bitsandbytes' CPU backend) and passes; on a GPU the same script runs
SmolLM2 in bf16 with flash-attention when installed. The CPU stands in for the GPU here."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_gpu_check_smoke_mode_runs_every_check_and_passes(tmp_path, tiny_llama_dir):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke", "--model", str(tiny_llama_dir),
                           "--work", str(tmp_path / "work"), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    checks = {row["check"]: row for row in result["checks"]}
    assert set(checks) == {"lora-packed-rows", "packed=unpacked/sdpa_varlen", "packed=unpacked/sdpa", "zero2", "zero3",
                           "fsdp-units", "qlora", "throughput"}
    assert all(row["passed"] for row in checks.values())
    assert checks["zero2"]["global_steps"] == checks["zero3"]["global_steps"] == result["steps"]
    assert checks["zero2"]["resumed_from_step"] == checks["zero3"]["resumed_from_step"] == 2
    assert checks["fsdp-units"]["units"] == checks["fsdp-units"]["decoder_layers"] + 1
    assert "MFU = (6 N + 12 L H T)" in result["mfu_formula"] and "MFU" in done.stdout
