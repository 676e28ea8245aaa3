"""Sandboxed execution on every node of the Ray cluster (config section `cluster:`).

One actor per alive node holds that node's sandboxes for a language (a ProgramRunner, as a local
run has, with the same number of workers); its toolchain is checked when the actor starts, so a
node without it fails the stage at once, named. The driver hands samples out as sandboxes free
up and writes every verdict itself, so the results file is appended and resumable as in a local
run. A node lost mid-run loses only its samples in flight: they go to the other nodes.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Iterator

from mft_core.cluster import ClusterError, alive_nodes, connect, on_node
from mft_core.config import ClusterConfig
from mft_core.eval.execute import ExecutionConfig, ProgramRunner, Sample, ToolchainMissing, execute_one, missing_toolchain
from mft_core.eval.problems import Problem

log = logging.getLogger(__name__)


class NodeExecutor:
    """One node's sandboxes for one language (a Ray actor; `max_concurrency` = its workers)."""

    def __init__(self, config: ExecutionConfig, language: str, workers: int):
        problem = missing_toolchain(language, config.toolchains_path)
        if problem is not None:
            raise ToolchainMissing(f"node {platform.node()}: {problem}")
        self.runner = ProgramRunner(config, workers=workers)
        self.runner.prepare(language)

    def run(self, problem: Problem, sample: Sample, truncate: bool) -> dict:
        return execute_one(self.runner, problem, sample, truncate)

    def close(self) -> None:
        self.runner.close()


def on_cluster(cluster: ClusterConfig, language: str, todo: list[Sample], by_id: dict[str, Problem],
               config: ExecutionConfig, truncate: bool) -> Iterator[dict]:
    """The samples' records as they finish, from the sandboxes of every node."""
    ray = connect(cluster)
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    workers = config.workers_for(language)
    actor = ray.remote(NodeExecutor)
    executors = [actor.options(num_cpus=0, max_concurrency=workers, scheduling_strategy=on_node(ray, node["NodeID"]))
                 .remote(config, language, workers) for node in alive_nodes(ray)]
    log.info("%s: %d sample(s) on %d node(s), %d sandbox(es) each", language, len(todo), len(executors), workers)
    waiting = list(reversed(todo))  # popped from the end: in the order given
    running: dict = {}  # object ref -> (executor, sample)
    idle = {executor: workers for executor in executors}
    lost = ""  # why the last executor was lost
    try:
        while waiting or running:
            for executor in list(idle):
                while waiting and idle[executor] > 0:
                    sample = waiting.pop()
                    running[executor.run.remote(by_id[sample.task_id], sample, truncate)] = (executor, sample)
                    idle[executor] -= 1
            if not running:
                raise ClusterError(f"{language}: every node's executor is gone, {len(waiting)} sample(s) not run; "
                                   f"the last one: {lost}")
            (ref,), _ = ray.wait(list(running), num_returns=1)
            executor, sample = running.pop(ref)
            try:
                record = ray.get(ref)
            except (ActorDiedError, ActorUnavailableError) as error:
                # Its node (or the actor) is gone: its samples run elsewhere; it gets no more.
                lost = str(error)
                log.warning("%s: a node's executor was lost (%s); %s #%d runs on another node",
                            language, type(error).__name__, *sample.key)
                idle.pop(executor, None)
                waiting.append(sample)
                continue
            if executor in idle:
                idle[executor] += 1
            yield record
    finally:
        for ref in running:
            try:
                ray.cancel(ref)
            except Exception:  # noqa: BLE001 - finished or gone meanwhile
                pass
        for executor in executors:
            try:
                ray.get(executor.close.remote(), timeout=60)
            except Exception:  # noqa: BLE001 - already gone with its node
                pass
            ray.kill(executor)
