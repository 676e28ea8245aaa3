"""A real Ray cluster on this machine, for the cluster tests (tests/cluster) and bench/cluster.py:
a head and worker nodes, each its own `ray start` (separate raylets, object stores and workers),
CPU only, one CPU each.

They run inside a private network namespace that holds only loopback: outside one, Ray binds and
advertises the machine's external address even when told --node-ip-address=127.0.0.1, and test
traffic must stay on loopback. The namespace is held by a sleeping process; every command of a
test that talks to the cluster (`mft ...`, a Ray driver) enters it with nsenter. As root (CI, this
machine) a plain network namespace; otherwise inside a user namespace, where the evaluation
sandbox may fall back to a weaker isolation.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
HEAD_PORT = 6390
OBJECT_STORE = f"--object-store-memory={200 * 10**6}"  # bytes per node (default: 30% of the machine's memory)


class LocalRayCluster:
    def __init__(self, nodes: int = 3):
        self.root = os.geteuid() == 0
        unshare = ["unshare", "-n"] if self.root else ["unshare", "-rn"]
        self.holder = subprocess.Popen([*unshare, "sh", "-c", "ip link set lo up && exec sleep infinity"])
        self.enter = ["nsenter", "-t", str(self.holder.pid), "-n"] + ([] if self.root else ["-U", "--preserve-credentials"])
        # Short: Ray's socket paths live under it (at most 107 bytes).
        self.temp_dir = Path(tempfile.mkdtemp(prefix="mftray-", dir="/tmp"))
        self.address = f"127.0.0.1:{HEAD_PORT}"
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
                    # A lost node is noticed within ~3 s (default: 15 s of missed health checks).
                    "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
        deadline = time.time() + 20
        while "UP" not in self.run(["ip", "-brief", "link", "show", "lo"], check=False).stdout:
            if time.time() > deadline:
                raise RuntimeError("the network namespace's loopback did not come up")
            time.sleep(0.1)
        self.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={HEAD_PORT}", "--num-cpus=1", OBJECT_STORE,
                  "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={self.temp_dir}"])
        for _ in range(nodes - 1):
            self.add_node()
        self.wait_for_nodes(nodes)

    def run(self, argv: list[str], check: bool = True, timeout: float = 900, **kwargs) -> subprocess.CompletedProcess:
        """argv inside the namespace (from the repository root), its output captured."""
        result = subprocess.run([*self.enter, *argv], cwd=REPO, env=kwargs.pop("env", self.env), text=True,
                                capture_output=True, timeout=timeout, **kwargs)
        if check and result.returncode != 0:
            raise AssertionError(f"{argv} exited {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
        return result

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen([*self.enter, *argv], cwd=REPO, env=self.env, text=True, **kwargs)

    def python(self, code: str, check: bool = True) -> subprocess.CompletedProcess:
        """A Ray driver script run inside the namespace."""
        return self.run([sys.executable, "-c", f"import ray; ray.init(address={self.address!r})\n" + code], check=check)

    def add_node(self) -> None:
        self.run([RAY, "start", f"--address={self.address}", "--node-ip-address=127.0.0.1", "--num-cpus=1", OBJECT_STORE])

    def alive_nodes(self) -> int:
        out = self.python("print(sum(n['Alive'] for n in ray.nodes()))", check=False).stdout.strip().splitlines()
        return int(out[-1]) if out and out[-1].isdigit() else 0

    def wait_for_nodes(self, count: int, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while self.alive_nodes() != count:
            if time.time() > deadline:
                raise RuntimeError(f"the Ray cluster did not reach {count} alive nodes")
            time.sleep(0.5)

    def stop(self) -> None:
        self.run([RAY, "stop", "--force"], check=False, timeout=120)
        self.holder.kill()
        self.holder.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
