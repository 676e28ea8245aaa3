"""End to end with real Prefect processes: `make prefect-up`'s script starts a server and a
`process` worker on loopback and deploys prefect.yaml; `prefect deployment run
mft-pipeline/default --watch` runs the flow through the worker; prefect-down stops it all."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def prefect_stack(tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "MFT_PREFECT_PORT": str(port),
        "VENV": sys.prefix,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    up = subprocess.run([str(REPO / "scripts/prefect-up.sh")], env=env, capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield {**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    finally:
        down = subprocess.run([str(REPO / "scripts/prefect-down.sh")], env=env, capture_output=True, text=True, timeout=120)
        assert "worker: stopped" in down.stdout and "server: stopped" in down.stdout, down.stdout + down.stderr
        for name in ("server", "worker"):
            assert not (tmp_path / "prefect-home" / "local" / f"{name}.pid").exists()


def prefect(env, *args, timeout=300):
    return subprocess.run([str(Path(sys.prefix) / "bin" / "prefect"), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_deployment_run_through_a_real_server_and_worker(prefect_stack, tmp_path, tiny_llama_dir):
    data = tmp_path / "data"
    for task in ("alpha", "beta"):
        (data / task).mkdir(parents=True)
        (data / task / "d.jsonl").write_text("".join(
            json.dumps({"prompt": f"{task} {i}", "answer": f"answer {i}"}) + "\n" for i in range(25)))
    config = data / "pipeline.yaml"
    # The whole pipeline on the tiny model: ingest, tokenize, train, merge, evaluate (Python).
    config.write_text(
        "runs_root: runs\ndata:\n  tasks: [{path: alpha}, {path: beta}]\n"
        f"model: {{path: '{tiny_llama_dir}'}}\n"
        "ingest: {decontaminate: {enabled: false}, min_valid: 3}\n"
        "tokenize: {seq_length: 64, num_workers: 1}\n"
        "train: {max_steps: 2, warmup_steps: 0, grad_accum: 1, eval_every: 2, precision: fp32, threads: 1}\n"
        "merge: {check_samples: 2}\n"
        "evaluate: {languages: [python], limit: 1, max_new_tokens: 16, evaluate_base: false}\n")

    deployments = prefect(prefect_stack, "deployment", "ls")
    assert "mft-pipeline/default" in deployments.stdout and "mft-pipeline/ingest-only" in deployments.stdout

    run = prefect(prefect_stack, "deployment", "run", "mft-pipeline/default", "-p", f"config={config}", "--watch")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Completed" in run.stdout
    outputs = list((data / "runs" / "ingest").glob("*/_SUCCESS"))
    assert len(outputs) == 1
    stats = json.loads((outputs[0].parent / "stats.json").read_text())
    assert stats["totals"]["train"] + stats["totals"]["valid"] == 50
    for stage in ("tokenize", "train", "merge", "evaluate"):
        assert len(list((data / "runs" / stage).glob("*/_SUCCESS"))) == 1, stage
    summary = json.loads(next((data / "runs" / "evaluate").glob("*/summary.json")).read_text())
    assert summary  # pass@k per language, through the worker

    # A failing run exits 1: a config that does not exist.
    bad = prefect(prefect_stack, "deployment", "run", "mft-pipeline/default", "-p", f"config={data}/missing.yaml", "--watch")
    assert bad.returncode == 1 and "Failed" in bad.stdout

    # The ingest-only preset forces the stage: the same output directory is rebuilt.
    before = (outputs[0]).stat().st_mtime_ns
    again = prefect(prefect_stack, "deployment", "run", "mft-pipeline/ingest-only", "-p", f"config={config}", "--watch")
    assert again.returncode == 0, again.stdout[-3000:]
    assert outputs[0].stat().st_mtime_ns != before
