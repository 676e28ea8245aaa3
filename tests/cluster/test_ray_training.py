"""Training under Ray Train on the local three-node cluster (tests/cluster/conftest.py): two
workers on two nodes train like two local processes, and a worker lost mid-run fails the run
cleanly and the next run resumes from the newest checkpoint."""

import json
import os
import signal
import sys
import time

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


def published(root, stage="train"):
    done = [p.parent for p in (root / "runs" / stage).glob("*/_SUCCESS")]
    assert len(done) == 1, done
    return done[0]


def test_two_workers_on_two_nodes_train_like_two_local_processes(ray_cluster, tmp_path, tiny_llama_dir):
    reference = train(make_project(tmp_path / "local", tiny_llama_dir, **COMMON)).directory
    path = on_cluster(make_project(tmp_path / "ray", tiny_llama_dir, **COMMON), ray_cluster)
    result = mft(ray_cluster, "run", "--config", str(path), "--stages", "ingest,tokenize,train")
    out = published(tmp_path / "ray")
    workers = [json.loads(line) for line in (out / "ray-workers.jsonl").read_text().splitlines()]
    assert sorted(w["rank"] for w in workers) == [0, 1]
    assert len({w["node_id"] for w in workers}) == 2, workers
    assert json.loads((out / "hyperparameters.json").read_text())["world_size"] == 2
    assert "progress step=3 total=3" in result.stdout + result.stderr
    assert_same_training(reference, out)
