"""Ingest, tokenize and sandboxed execution on a local Ray cluster of 1, 2 and 3 nodes
(bench/local_cluster.py) against the same work run locally, in the same run.

The nodes share this machine's cores (one CPU each, two cores here): the table shows what the
cluster path costs over a local run (scheduling, connecting, the object store), not a speed-up.
Ingest and tokenize: the demo data (`mft ingest --force`; `mft tokenize --force` with the demo
model's tokenizer), the whole command timed, start-up included, as a user waits for it. Execution: the canonical solutions of the first
40 Python HumanEval problems, executed in the sandbox (execute_samples).

    .venv/bin/python bench/cluster.py [--repeat 2]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # bench/tokenize.py would shadow the stdlib

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402

import yaml  # noqa: E402

from bench.common import REPO, ensure_demo_data, save, table  # noqa: E402
from bench.local_cluster import LocalRayCluster  # noqa: E402

EXECUTE = textwrap.dedent("""
    import json, sys, time
    from mft_core.config import ClusterConfig
    from mft_core.eval.execute import ExecutionConfig, execute_samples
    from mft_core.eval.problems import select_problems
    address, out = sys.argv[1], sys.argv[2]
    samples = [{"task_id": p.task_id, "generation": p.canonical_solution} for p in select_problems(languages=["python"])[:40]]
    started = time.perf_counter()
    results = execute_samples(samples, out, config=ExecutionConfig(workers={"python": 1}),
                              cluster=ClusterConfig(address=address) if address != "local" else None)
    print(json.dumps({"seconds": time.perf_counter() - started, "passed": sum(r["passed"] for r in results)}))
""")


def timed(cluster: LocalRayCluster, argv: list[str]) -> float:
    started = time.perf_counter()
    cluster.run(argv)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    ensure_demo_data(REPO / "demo-data")
    work = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    config = yaml.safe_load((REPO / "pipeline.yaml").read_text())
    config.update(runs_root=str(work / "runs"))
    for task in config["data"]["tasks"]:
        task["path"] = str((REPO / task["path"]).resolve())
    local_cfg, ray_cfg = work / "local.yaml", work / "ray.yaml"
    local_cfg.write_text(yaml.safe_dump(config))
    ray_cfg.write_text(yaml.safe_dump({**config, "cluster": {"address": "127.0.0.1:6390"}}))
    cluster = LocalRayCluster(nodes=1)
    rows, results = [], {}
    try:
        mft = [sys.executable, "-m", "mft_core.cli"]
        cluster.run([*mft, "run", "--config", str(local_cfg), "--stages", "ingest,tokenize"])  # the model, converted once

        def stage(name: str, cfg: Path) -> float:
            return min(timed(cluster, [*mft, name, "--config", str(cfg), "--force"]) for _ in range(args.repeat))

        def execute(address: str, label: str) -> float:
            best = float("inf")
            for attempt in range(args.repeat):
                out = work / f"execute-{label}-{attempt}.jsonl"  # a new results file: nothing to resume
                report = json.loads(cluster.run([sys.executable, "-c", EXECUTE, address, str(out)]).stdout.splitlines()[-1])
                assert report["passed"] == 40, report  # every canonical solution passes, on every node
                best = min(best, report["seconds"])
            return best

        local = {"ingest_s": stage("ingest", local_cfg), "tokenize_s": stage("tokenize", local_cfg),
                 "execute_s": execute("local", "local")}
        rows.append(["local (no cluster)", f"{local['ingest_s']:.1f}", "1", f"{local['tokenize_s']:.1f}", "1",
                     f"{local['execute_s']:.1f}", "1"])
        for nodes in (1, 2, 3):
            if nodes > 1:
                cluster.add_node()
                cluster.wait_for_nodes(nodes)
            measured = {"ingest_s": stage("ingest", ray_cfg), "tokenize_s": stage("tokenize", ray_cfg),
                        "execute_s": execute(cluster.address, f"{nodes}-nodes")}
            results[nodes] = measured
            row = [f"Ray, {nodes} node(s)"]
            for what in ("ingest_s", "tokenize_s", "execute_s"):
                row += [f"{measured[what]:.1f}", f"{local[what] / measured[what]:.2f}"]
            rows.append(row)
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(table(["where", "ingest s", "speed vs local", "tokenize s", "speed vs local", "execute 40 s", "speed vs local"],
                rows))
    path = save("cluster", {"local": local, "ray_nodes": results,
                            "note": "nodes share this machine's cores: correctness and overhead, not speed-up"})
    print(f"written {path}")


if __name__ == "__main__":
    main()
