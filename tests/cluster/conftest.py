"""The cluster tests' Ray cluster: a head and two worker nodes on this machine, in a network
namespace of their own (bench/local_cluster.py)."""

import pytest

from bench.local_cluster import LocalRayCluster


# One cluster per test module, not per session: an idle three-node cluster (raylets, log monitors,
# the dashboard) would take CPU from the rest of the suite on a 2-core machine.
@pytest.fixture(scope="module")
def ray_cluster():
    cluster = LocalRayCluster(nodes=3)
    try:
        yield cluster
    finally:
        cluster.stop()
