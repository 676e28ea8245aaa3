"""The cluster: section without a cluster: it changes no stage key (a run on Ray gives the local
outputs, so both share the cache), it refuses settings Ray replaces, and an address where no
cluster answers stops the run in seconds, before any stage, naming the address."""

from __future__ import annotations

import time

import pytest

from mft_core.config import ConfigError
from mft_core.preflight import PreflightError, preflight
from mft_core.stages import STAGE_ORDER, compute_key, run_stage
from test_preflight import make_cfg


def test_the_cluster_section_is_in_no_stage_key(tmp_path, tiny_llama_dir):
    local = make_cfg(tmp_path, tiny_llama_dir)
    on_ray = make_cfg(tmp_path, tiny_llama_dir, cluster={"address": "10.0.0.1:6379", "gpus_per_worker": 1})
    upstream = None
    for stage in ("ingest", "tokenize", "train"):
        assert compute_key(on_ray, stage, upstream) == compute_key(local, stage, upstream), stage
        if stage != "train":
            upstream = run_stage(local, stage).directory


def test_several_machines_under_ray_are_refused_with_the_setting_to_use(tmp_path, tiny_llama_dir):
    launch = {"num_processes": 2, "num_machines": 2, "main_process_ip": "10.0.0.1", "main_process_port": 29500}
    with pytest.raises(ConfigError, match="set train.launch.num_processes to the number of workers in all"):
        make_cfg(tmp_path, tiny_llama_dir, cluster={}, train={"launch": launch})


def test_no_cluster_at_the_address_stops_the_run_in_seconds(tmp_path, tiny_llama_dir):
    cfg = make_cfg(tmp_path, tiny_llama_dir, cluster={"address": "127.0.0.1:9"})
    started = time.monotonic()
    with pytest.raises(PreflightError) as caught:
        preflight(cfg, STAGE_ORDER)
    assert "cluster.address '127.0.0.1:9': no Ray cluster answers there" in str(caught.value)
    assert "ray start --head" in str(caught.value)
    assert not (tmp_path / "runs" / "ingest").exists()
    assert time.monotonic() - started < 60  # ray.init alone retries such an address for minutes
