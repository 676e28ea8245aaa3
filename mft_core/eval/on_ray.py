"""Evaluation on the Ray cluster (config section `cluster:`): sandboxed execution on every node,
and generation on the cluster's workers (GenerationOnCluster, below).

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
from pathlib import Path

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


class GenerationOnCluster:
    """A model's generation batches on the cluster's workers (generate.BatchesElsewhere): each
    worker (gpus_per_worker GPUs, else cpus_per_worker CPUs) loads the model from its folder on
    shared storage and generates every n-th batch; the batches are those a local run makes, so
    the records are too. The driver only renders the prompts (tokenizer) and writes the records."""

    def __init__(self, cluster: ClusterConfig, folder: Path, precision: str, eos_id: int | None,
                 trust_remote_code: bool, mode: str, settings, stop_early: bool = True):
        self.cluster, self.folder, self.precision, self.eos_id = cluster, Path(folder), precision, eos_id
        self.trust_remote_code, self.mode, self.settings, self.stop_early = trust_remote_code, mode, settings, stop_early

    def tokenizer(self):
        from mft_core.modeling import load_tokenizer

        return load_tokenizer(self.folder, self.trust_remote_code)  # as load_generation_model loads it

    def run(self, batches: list) -> Iterator[list[dict]]:
        from mft_core.eval.generate import generate_batches

        ray = connect(self.cluster)
        resources, cluster = ray.cluster_resources(), self.cluster
        if cluster.gpus_per_worker > 0:
            workers = int(resources.get("GPU", 0) // cluster.gpus_per_worker)
        else:
            workers = int(resources.get("CPU", 1) // cluster.cpus_per_worker)
        workers = max(1, min(workers, len(batches)))
        remote = ray.remote(generate_batches).options(
            num_gpus=cluster.gpus_per_worker, num_cpus=cluster.cpus_per_worker, max_retries=cluster.max_retries,
            scheduling_strategy="SPREAD")
        threads = max(1, int(cluster.cpus_per_worker))
        # Every n-th batch: the batches go longest prompts first, so each worker gets long and short ones.
        pending = [remote.remote(str(self.folder.resolve()), self.precision, self.eos_id, self.trust_remote_code,
                                 batches[worker::workers], self.mode, self.settings, self.stop_early, threads)
                   for worker in range(workers)]
        log.info("generating %d batch(es) on %d Ray worker(s)", len(batches), workers)
        try:
            while pending:
                (ref,), pending = ray.wait(pending, num_returns=1)
                yield from ray.get(ref)
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
