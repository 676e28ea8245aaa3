"""A real execute run killed midway resumes from its results file: complete, no duplicates."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from eval_testing import fast_config, require_toolchain, requires_humaneval_x, wait_until_gone
from mft_core.eval.execute import execute_samples
from mft_core.eval.problems import load_problems
from mft_core.eval.sandbox import MAX_SLOTS, processes_of_uid, uid_base

REPO = Path(__file__).resolve().parents[3]  # the checkout

RUN = """
import json, sys
from mft_core.eval.execute import ExecutionConfig, execute_samples

samples = json.loads(sys.argv[1])
execute_samples(samples, sys.argv[2], config=ExecutionConfig(workers={"python": 1}))
"""


@requires_humaneval_x
def test_killed_run_resumes_without_duplicates(tmp_path):
    require_toolchain("python")
    problems = load_problems("python")[:8]
    samples = [{"task_id": p.task_id, "generation": p.canonical_solution} for p in problems]
    results_path = tmp_path / "results.jsonl"
    child = subprocess.Popen([sys.executable, "-c", RUN, json.dumps(samples), str(results_path)],
                             cwd=REPO, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and child.poll() is None:
        if results_path.exists() and results_path.read_text().count("\n") >= 2:
            break
        time.sleep(0.01)
    assert child.poll() is None, "the first run finished before it could be killed: " + \
        child.stderr.read().decode()[-2000:]
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    child.stderr.close()
    first_lines = results_path.read_text().splitlines()
    assert 2 <= len(first_lines) < len(samples)
    # nothing of the killed run survives it (its sandboxes die with it)
    for uid in range(uid_base(), uid_base() + MAX_SLOTS):
        assert wait_until_gone(lambda: processes_of_uid(uid)) == [], uid

    rerun = []
    results = execute_samples(samples, results_path, config=fast_config(), on_result=rerun.append)
    lines = results_path.read_text().splitlines()
    keys = [(json.loads(line)["task_id"], json.loads(line)["sample_index"]) for line in lines]
    assert len(keys) == len(set(keys)) == len(samples)
    assert lines[:len(first_lines)] == first_lines  # earlier results kept as they were
    assert len(rerun) == len(samples) - len(first_lines)  # only the missing ones ran
    assert [r["task_id"] for r in results] == [p.task_id for p in problems]
    assert all(r["passed"] for r in results)
