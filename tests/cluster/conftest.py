"""The cluster tests' Ray cluster: a head and two worker nodes on this machine, in a network
namespace of their own (bench/local_cluster.py)."""

import pytest

from bench.local_cluster import LocalRayCluster


@pytest.fixture(scope="session")
def ray_cluster():
    cluster = LocalRayCluster(nodes=3)
    try:
        yield cluster
    finally:
        cluster.stop()
