"""The Ray cluster of the `cluster:` config section: connecting to it, checking every node before
work is sent, and running a stage's work items as Ray tasks.

Prefect stays the orchestrator: a stage's task runs where the Prefect worker runs and drives Ray
from there (the *driver*). The driver alone builds and publishes stage outputs; Ray tasks and
training workers only write into the stage's work folder, which is on storage every node mounts
at the same path (runs_root). Ray is an optional dependency (`pip install 'mft-pipeline[ray]'`):
nothing here is imported without a `cluster:` section.
"""

from __future__ import annotations

import logging
import platform
import secrets
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mft_core.config import ClusterConfig, PipelineConfig

log = logging.getLogger("mft.cluster")


class ClusterError(RuntimeError):
    """The cluster cannot do the work: what is wrong, on which node, how to fix it."""


def ray_module():
    try:
        import ray
    except ImportError:
        raise ClusterError("the config has a cluster: section, but Ray is not installed: "
                           "pip install 'mft-pipeline[ray]' (on this machine and every node)") from None
    return ray


START_CLUSTER = ("start one (`ray start --head` on the head, `ray start --address HEAD:6379` on every other node) "
                 "or fix cluster.address")


def probe_address(address: str) -> None:
    """Fail in seconds when nothing listens at the cluster's address: ray.init itself retries an
    unanswered address for minutes."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as error:
        raise ClusterError(f"cluster.address {address!r}: no Ray cluster answers there ({error}); {START_CLUSTER}") from None


def connect(cluster: ClusterConfig):
    """The `ray` module, connected to the cluster (once per process)."""
    ray = ray_module()
    if ray.is_initialized():
        return ray
    probe_address(cluster.address)
    try:
        # configure_logging=False: our log format stays. log_to_driver=False: the workers' output
        # stays in Ray's logs on their nodes, not on this console; what the run needs comes back
        # itself (rank 0's training output through the stage log, errors with their tracebacks).
        ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)
    except ConnectionError as error:
        raise ClusterError(f"cluster.address {cluster.address!r}: no Ray cluster answers there ({error}); "
                           f"{START_CLUSTER}") from None
    return ray


def alive_nodes(ray) -> list[dict[str, Any]]:
    return sorted((node for node in ray.nodes() if node["Alive"]), key=lambda node: node["NodeID"])


def on_node(ray, node_id: str):
    """A scheduling strategy that runs on that node and nowhere else."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)


# ----------------------------------------------------------------------------- checking the nodes


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mft-pipeline")
    except PackageNotFoundError:
        return "not installed"


def describe_node(probe_path: str, probe_text: str, languages: Sequence[str]) -> dict[str, Any]:
    """Run on one node: what it has that the stages need (a Ray task: top-level, picklable)."""
    from mft_core.eval.execute import missing_toolchain

    try:
        sees_runs_root = Path(probe_path).read_text() == probe_text
    except OSError:
        sees_runs_root = False
    import torch

    return {
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mft-pipeline": package_version(),
        "sees_runs_root": sees_runs_root,
        "missing": {language: problem for language in languages
                    if (problem := missing_toolchain(language)) is not None},
    }


def check_nodes(cfg: PipelineConfig, languages: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Every alive node, checked in one task each, before any work is sent: it sees runs_root
    (shared storage, the same path), runs the driver's Python and torch versions, and has the
    toolchains of `languages`. Raises ClusterError listing every problem of every node."""
    ray = connect(cfg.cluster)
    cfg.runs_root.mkdir(parents=True, exist_ok=True)
    probe = cfg.runs_root.resolve() / f".cluster-probe-{secrets.token_hex(6)}"
    text = secrets.token_hex(16)
    probe.write_text(text)
    try:
        nodes = alive_nodes(ray)
        describe = ray.remote(describe_node)
        reports = ray.get([describe.options(num_cpus=0, scheduling_strategy=on_node(ray, n["NodeID"]))
                           .remote(str(probe), text, list(languages)) for n in nodes])
    finally:
        probe.unlink(missing_ok=True)
    import torch

    problems = []
    for node, report in zip(nodes, reports):
        where = f"node {node['NodeManagerAddress']} ({report['host']}, {node['NodeID'][:8]})"
        if not report["sees_runs_root"]:
            problems.append(f"{where} does not see runs_root {cfg.runs_root.resolve()}: mount the shared storage there "
                            "at the same path")
        for name, mine in (("python", platform.python_version()), ("torch", torch.__version__),
                           ("mft-pipeline", package_version())):
            if report[name] != mine:
                problems.append(f"{where} runs {name} {report[name]}, this machine {mine}: install the same versions")
        for language, problem in report["missing"].items():
            problems.append(f"{where}: {language}: {problem} (run scripts/install-toolchains.sh there)")
    if problems:
        raise ClusterError("the Ray cluster cannot run this pipeline:\n  " + "\n  ".join(problems))
    log.info("cluster: %d node(s) ready: %s", len(nodes), ", ".join(n["NodeManagerAddress"] for n in nodes))
    return reports


# ----------------------------------------------------------------------------- data work as Ray tasks


def run_tasks(cluster: ClusterConfig, function: Callable, calls: Sequence[tuple], *,
              on_done: Callable[[int, Any], None] | None = None) -> list[Any]:
    """`function(*call)` for every call, as Ray tasks spread over the nodes; the results in the
    order of `calls`. A task lost with its node or worker is run again (cluster.max_retries); an
    exception raised by the function itself is not retried: it cancels the rest and is raised
    here, with the node's traceback. `on_done(index, result)` as each one finishes."""
    ray = connect(cluster)
    remote = ray.remote(function).options(num_cpus=cluster.cpus_per_task, max_retries=cluster.max_retries,
                                          retry_exceptions=False, scheduling_strategy="SPREAD")
    refs = [remote.remote(*call) for call in calls]
    index_of = {ref: index for index, ref in enumerate(refs)}
    results: dict[int, Any] = {}
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            index = index_of[done[0]]
            results[index] = ray.get(done[0])
            if on_done is not None:
                on_done(index, results[index])
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    return [results[index] for index in range(len(refs))]


def driver_description(cluster: ClusterConfig) -> str:
    ray = connect(cluster)
    resources = ray.cluster_resources()
    return (f"Ray cluster {cluster.address}: {len(alive_nodes(ray))} node(s), {resources.get('CPU', 0):g} CPU, "
            f"{resources.get('GPU', 0):g} GPU")
