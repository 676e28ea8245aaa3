"""The README's pipeline commands, as a user types them: build the demo data, `mft run`, and a
rerun that is fully cached (Prefect's embedded backend, no server)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.benchmark_data import HUMANEVAL_X

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def mft(*args, cwd, env):
    return subprocess.run([str(Path(sys.prefix) / "bin" / "mft"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_mft_run_on_the_demo_config_then_a_cached_rerun(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(REPO / "pipeline.yaml", project / "pipeline.yaml")
    shutil.copy(REPO / "prefect.toml", project / "prefect.toml")
    env = dict(os.environ)  # $MFT_HUMANEVAL_X_DIR as the session found it (tests/benchmark_data.py)
    env.pop("PREFECT_API_URL", None)
    env.pop("PREFECT_HOME", None)  # prefect.toml puts it in the project's .prefect/

    demo = mft("data", "demo", "--out", "demo-data", "--per-task", "300", cwd=project, env=env)
    assert demo.returncode == 0, demo.stderr
    # The demo config with a handful of steps: the whole pipeline on the real SmolLM2.
    quick = ["--set", "train.max_steps=2", "--set", "train.warmup_steps=0", "--set", "train.eval_every=2",
             "--set", "merge.check_samples=2", "--set", "evaluate.limit=1", "--set", "evaluate.max_new_tokens=48"]
    first = mft("run", *quick, cwd=project, env=env)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    output = first.stdout + first.stderr
    assert "=== mft-pipeline results ===" in output and "text-to-code" in output
    assert "train (" in output and "final valid loss" in output and "merge (" in output
    languages = HUMANEVAL_X.languages if HUMANEVAL_X is not None else ("python",)  # offline: Python HumanEval
    assert "pass@1" in output and all(lang in output for lang in languages)
    assert (project / ".prefect").is_dir()
    second = mft("run", *quick, cwd=project, env=env)
    assert second.returncode == 0
    assert "Finished in state Cached" in second.stdout + second.stderr
