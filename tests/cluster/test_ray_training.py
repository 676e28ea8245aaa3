"""Training under Ray Train on the local three-node cluster (tests/cluster/conftest.py): two
workers on two nodes train like two local processes, and a worker lost mid-run fails the run
cleanly and the next run resumes from the newest checkpoint."""

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.unit.train.test_backends import assert_same_training
from tests.unit.train.test_train_stage import make_project, train

pytestmark = pytest.mark.slow

COMMON = dict(max_steps=3, warmup_steps=0, lora={"dropout": 0.0}, eval_every=100, checkpoint_every=100, grad_accum=1,
              launch={"num_processes": 2})


def on_cluster(path, cluster, **settings):
    config = yaml.safe_load(path.read_text())
    config["cluster"] = {"address": cluster.address, **settings}
    path.write_text(yaml.safe_dump(config))
    return path


def mft(cluster, *args, check=True):
    return cluster.run([sys.executable, "-m", "mft_core.cli", *args], check=check)


def run_log(result):
    """The whole log of an `mft` command (the console shows only part of it)."""
    return Path(re.search(r"full log: (\S+)", result.stdout + result.stderr).group(1)).read_text()


def published(root, stage="train"):
    done = [p.parent for p in (root / "runs" / stage).glob("*/_SUCCESS")]
    assert len(done) == 1, done
    return done[0]


def test_the_whole_flow_on_the_cluster_trains_two_workers_on_two_nodes_like_two_local_processes(
        ray_cluster, tmp_path, tiny_llama_dir):
    """`mft run` (the Prefect flow) of every stage with a cluster: section; training on two Ray
    Train workers on two nodes equals two local processes; evaluate runs on the nodes."""
    reference = train(make_project(tmp_path / "local", tiny_llama_dir, **COMMON)).directory
    path = on_cluster(make_project(tmp_path / "ray", tiny_llama_dir, **COMMON), ray_cluster)
    config = yaml.safe_load(path.read_text())
    config["evaluate"] = {"languages": ["python"], "limit": 2, "max_new_tokens": 16, "evaluate_base": False}
    path.write_text(yaml.safe_dump(config))
    result = mft(ray_cluster, "run", "--config", str(path))
    assert "python: 2 sample(s) on 3 node(s)" in run_log(result)
    assert (published(tmp_path / "ray", "evaluate") / "summary.json").is_file()
    out = published(tmp_path / "ray")
    workers = [json.loads(line) for line in (out / "ray-workers.jsonl").read_text().splitlines()]
    assert sorted(w["rank"] for w in workers) == [0, 1]
    assert len({w["node_id"] for w in workers}) == 2, workers
    assert json.loads((out / "hyperparameters.json").read_text())["world_size"] == 2
    assert "[trainer] progress step=3 total=3" in run_log(result)  # rank 0's output, followed by the driver
    assert_same_training(reference, out)


def test_a_worker_lost_mid_run_fails_the_run_and_the_next_run_resumes(ray_cluster, tmp_path, tiny_llama_dir):
    """Rank 1's process is killed as soon as checkpoint 2 of 6 is complete: the run fails saying
    why (Ray restarts nothing), the checkpoints stay, and the next run resumes from the newest and
    ends where an uninterrupted run ends."""
    settings = {**COMMON, "max_steps": 6, "checkpoint_every": 2}
    reference = train(make_project(tmp_path / "local", tiny_llama_dir, **settings)).directory
    path = on_cluster(make_project(tmp_path / "ray", tiny_llama_dir, **settings), ray_cluster)
    mft(ray_cluster, "run", "--config", str(path), "--stages", "ingest,tokenize")
    runs = tmp_path / "ray" / "runs" / "train"
    with open(tmp_path / "first.log", "w") as output:
        first = ray_cluster.popen([sys.executable, "-m", "mft_core.cli", "train", "--config", str(path)],
                                  stdout=output, stderr=output)
        killed, deadline = None, time.time() + 300
        while killed is None and time.time() < deadline and first.poll() is None:
            if list(runs.glob("*.partial/checkpoints/step-0000002/COMPLETE")):
                workers = [json.loads(line) for line in next(runs.glob("*.partial/ray-workers.jsonl")).read_text().splitlines()]
                killed = next(w for w in workers if w["rank"] == 1)
                os.kill(killed["pid"], signal.SIGKILL)
            time.sleep(0.005)
        code = first.wait(timeout=300)
    log = (tmp_path / "first.log").read_text()
    assert killed is not None, "checkpoint 2 never appeared:\n" + log[-3000:]
    assert code != 0, "the run ended before the worker was killed:\n" + log[-3000:]
    assert "training on the Ray cluster failed" in log and "the next run resumes from the newest" in log, log[-3000:]
    partial = next(runs.glob("*.partial"))
    assert (partial / "checkpoints" / "step-0000002" / "COMPLETE").exists() and not (partial / "model").exists()

    resumed = mft(ray_cluster, "train", "--config", str(path))
    assert "resumed from" in run_log(resumed)
    assert_same_training(reference, published(tmp_path / "ray"), step_count=6)
