"""Data and evaluation work on the local three-node Ray cluster (tests/cluster/conftest.py):
tokenize chunks as Ray tasks give the local run's bytes, also when a worker node dies mid-run;
sandboxed execution fanned out to every node gives the local verdicts."""

import json
import re
import sys
import textwrap
import time

import pytest

from mft_core.config import load_config
from mft_core.eval.execute import ExecutionConfig, execute_samples
from mft_core.eval.problems import select_problems
from mft_core.stages import run_stage
from tests.cluster.test_ray_training import mft, on_cluster, published, run_log
from tests.unit.test_ingest import messy_project, tree_digest
from tests.unit.train.test_train_stage import make_project

pytestmark = pytest.mark.slow


def bigger_project(root, model_dir, records):
    """make_project's two tasks with `records` records each, cut into many small tokenize chunks."""
    path = make_project(root, model_dir)
    for name in ("alpha", "beta"):
        with open(root / name / "d.jsonl", "w") as fh:
            for i in range(records):
                fh.write(json.dumps({"chat_rounds": [
                    {"role": "human", "content": f"{name} question {i}: " + "more words " * (i % 13)},
                    {"role": "bot", "content": f"def f{i}(x):\n    return x * {i} + {len(name)}"}]}) + "\n")
    config = json.loads(path.read_text())
    config["tokenize"]["shard_size_mb"] = 0.002
    path.write_text(json.dumps(config))
    return path


def local_tokenize(path):
    cfg = load_config(path)
    run_stage(cfg, "ingest")
    return run_stage(cfg, "tokenize").directory


def test_tokenize_on_the_cluster_writes_the_local_bytes(ray_cluster, tmp_path, tiny_llama_dir):
    expected = tree_digest(local_tokenize(bigger_project(tmp_path / "local", tiny_llama_dir, 400)))
    path = on_cluster(bigger_project(tmp_path / "ray", tiny_llama_dir, 400), ray_cluster)
    result = mft(ray_cluster, "run", "--config", str(path), "--stages", "ingest,tokenize")
    assert tree_digest(published(tmp_path / "ray", "tokenize")) == expected
    output = result.stdout + result.stderr
    assert "Ray tasks on the Ray cluster 127.0.0.1:6390: 3 node(s)" in output
    peak_mb = float(re.search(r"peak memory of a Ray worker (\d+) MB", output).group(1))
    assert 0 < peak_mb < 1000


def test_a_worker_node_lost_mid_tokenize_changes_nothing(ray_cluster, tmp_path, tiny_llama_dir):
    """A worker node's raylet is killed (its workers die with it) while chunks run: Ray runs
    them again on the other nodes and the output is the local run's."""
    expected = tree_digest(local_tokenize(bigger_project(tmp_path / "local", tiny_llama_dir, 3000)))
    path = on_cluster(bigger_project(tmp_path / "ray", tiny_llama_dir, 3000), ray_cluster)
    mft(ray_cluster, "ingest", "--config", str(path))
    shards = tmp_path / "ray" / "runs" / "tokenize"
    with open(tmp_path / "tokenize.log", "w") as output:
        run = ray_cluster.popen([sys.executable, "-m", "mft_core.cli", "tokenize", "--config", str(path)],
                                stdout=output, stderr=output)
        deadline = time.time() + 300
        while len(list(shards.glob("*.partial/train/*.stats.json"))) < 5 and run.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert run.poll() is None, "tokenize ended before a node could be killed"
        # A task on a worker node (not the head) kills its parent: that node's raylet.
        ray_cluster.python(textwrap.dedent("""
            import os, signal
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
            head = ray.get_runtime_context().get_node_id()
            victim = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" not in n["Resources"])
            @ray.remote(num_cpus=0, max_retries=0)
            def kill_raylet():
                os.kill(os.getppid(), signal.SIGKILL)
            try:
                ray.get(kill_raylet.options(scheduling_strategy=NodeAffinitySchedulingStrategy(victim, soft=False)).remote())
            except Exception as error:
                print("node killed:", type(error).__name__)
        """))
        assert run.wait(timeout=600) == 0, (tmp_path / "tokenize.log").read_text()[-3000:]
    done_before_kill = len(list(shards.glob("*/train/*.stats.json")))
    assert done_before_kill > 5
    assert ray_cluster.alive_nodes() == 2
    ray_cluster.add_node()  # the next tests have three nodes again
    ray_cluster.wait_for_nodes(3)
    assert tree_digest(published(tmp_path / "ray", "tokenize")) == expected


def test_execution_fanned_out_to_every_node_gives_the_local_verdicts(ray_cluster, tmp_path):
    problems = select_problems(languages=["python"])[:6]
    samples = []
    for problem in problems:
        samples += [{"task_id": problem.task_id, "sample_index": 0, "generation": problem.canonical_solution},
                    {"task_id": problem.task_id, "sample_index": 1, "generation": "    return None\n"},
                    {"task_id": problem.task_id, "sample_index": 2, "generation": "    while True:\n        pass\n"}]
    (tmp_path / "samples.json").write_text(json.dumps(samples))
    config = ExecutionConfig(workers={"python": 2}, run_timeout_s={"python": 3.0})
    local = execute_samples(samples, tmp_path / "local.jsonl", config=config)
    driver = textwrap.dedent(f"""
        import json, logging, sys
        logging.basicConfig(level=logging.INFO, stream=sys.stdout)
        from mft_core.config import ClusterConfig
        from mft_core.eval.execute import ExecutionConfig, execute_samples
        samples = json.load(open({str(tmp_path / "samples.json")!r}))
        config = ExecutionConfig(workers={{"python": 2}}, run_timeout_s={{"python": 3.0}})
        execute_samples(samples, {str(tmp_path / "cluster.jsonl")!r}, config=config,
                        cluster=ClusterConfig(address={ray_cluster.address!r}))
    """)
    result = ray_cluster.python(driver)
    assert "python: 18 sample(s) on 3 node(s), 2 sandbox(es) each" in result.stdout
    on_cluster_records = {(r["task_id"], r["sample_index"]): r for r in map(json.loads, open(tmp_path / "cluster.jsonl"))}
    assert len(on_cluster_records) == len(samples)
    verdicts = {(r["task_id"], r["sample_index"]): (r["verdict"], r["passed"], r.get("reason")) for r in local}
    assert {k: (r["verdict"], r["passed"], r.get("reason")) for k, r in on_cluster_records.items()} == verdicts
    assert sorted({v[0] for v in verdicts.values()}) == ["failed", "passed", "timeout"]


def test_ingest_on_the_cluster_writes_the_local_bytes(ray_cluster, tmp_path):
    local = load_config(messy_project(tmp_path / "local"))
    out = run_stage(local, "ingest").directory
    stats = json.loads((out / "stats.json").read_text())["totals"]
    assert stats["duplicates"] > 0 and stats["rejected"] > 0 and stats["contaminated"] == 1  # every path is taken
    path = messy_project(tmp_path / "ray")
    config = json.loads(path.read_text())
    config["ingest"]["piece_mb"] = 0.002
    path.write_text(json.dumps(config))
    path = on_cluster(path, ray_cluster)
    result = mft(ray_cluster, "ingest", "--config", str(path))
    assert "files checked by Ray tasks on the cluster (3 at a time), dedup in 3 partitions" in run_log(result)
    assert tree_digest(published(tmp_path / "ray", "ingest")) == tree_digest(out)


DEDUP = textwrap.dedent("""
    import random, sys, time
    from mft_core.cluster import alive_nodes, connect
    from mft_core.config import ClusterConfig
    from mft_core.data.ingest import IngestError
    from mft_core.data.ingest_pieces import DedupPartitions
    ray = connect(ClusterConfig(address=sys.argv[1]))
    dedup = DedupPartitions(ray, alive_nodes(ray))
    rng = random.Random(0)
    keys = [rng.getrandbits(64) for _ in range(3000)]
    keys += rng.sample(keys, 1000)
    rng.shuffle(keys)
    seen, expected = set(), []
    for key in keys:
        expected.append(key not in seen)
        seen.add(key)
    got = [first for start in range(0, len(keys), 700) for first in dedup.first_seen(keys[start:start + 700])]
    assert got == expected, "the partitions' answers are not those of one set"
    count = len(dedup.partitions)
    # each actor holds its share: a key of its partition is one it has seen
    held = ray.get([p.first_seen.remote([next(k for k in keys if k % count == i)]) for i, p in enumerate(dedup.partitions)])
    assert held == [[False]] * count, held
    print("partitions", count)
    ray.kill(dedup.partitions[1])
    for _ in range(100):  # ray.kill returns before the actor is gone
        try:
            dedup.first_seen(keys[:10])
        except IngestError as err:
            print("lost:", err)
            break
        time.sleep(0.1)
""")


def test_dedup_partitions_answer_as_one_set_and_a_lost_one_fails_the_run(ray_cluster):
    """The cluster's exact dedup: one actor per node, keys in batches as ingest sends a piece's,
    with repeats across batches: the answers are those of one set. A partition's actor killed:
    the next call fails with an IngestError that says to run the stage again."""
    result = ray_cluster.run([sys.executable, "-c", DEDUP, ray_cluster.address])
    output = result.stdout + result.stderr
    assert "partitions 3" in output
    assert "lost: a dedup partition on the cluster was lost" in output and "Run the stage again" in output


GENERATE = textwrap.dedent("""
    import json, logging, sys
    logging.basicConfig(level=logging.INFO)
    from mft_core.config import ClusterConfig
    from mft_core.eval.generate import GenerationSettings, generate_to_file, render_prompt_for
    from mft_core.eval.on_ray import GenerationOnCluster
    from mft_core.eval.problems import select_problems
    address, folder, out = sys.argv[1:4]
    problems = select_problems(languages=["python"])[:7]
    settings = GenerationSettings(max_new_tokens=12, batch_size=2)
    render = lambda problem, tokenizer: render_prompt_for(problem, "completion", tokenizer)
    cluster = GenerationOnCluster(ClusterConfig(address=address), folder, "fp32", None, False, "completion", settings)
    generate_to_file(out, "tiny", None, problems, "completion", settings, render, elsewhere=cluster)
""")


def test_generation_on_the_cluster_workers_gives_the_local_records(ray_cluster, tmp_path, tiny_llama_dir):
    """7 problems in batches of 2 (4 batches), spread over the three nodes' workers: the same
    records (tokens, text, stop reason) as one local process generating them."""
    from mft_core.eval.generate import GenerationSettings, generate_to_file, load_generation_model, render_prompt_for

    problems = select_problems(languages=["python"])[:7]
    settings = GenerationSettings(max_new_tokens=12, batch_size=2)
    local = generate_to_file(tmp_path / "local.jsonl", "tiny", lambda: load_generation_model(tiny_llama_dir, "fp32"),
                             problems, "completion", settings,
                             lambda problem, tokenizer: render_prompt_for(problem, "completion", tokenizer)).records
    result = ray_cluster.run([sys.executable, "-c", GENERATE, ray_cluster.address, str(tiny_llama_dir),
                              str(tmp_path / "cluster.jsonl")])
    assert "generating 4 batch(es) on 3 Ray worker(s)" in result.stdout + result.stderr
    on_cluster_records = {(r["task_id"], r["sample_index"]): r for r in map(json.loads, open(tmp_path / "cluster.jsonl"))}
    assert len(on_cluster_records) == 7

    def decoded(record):
        return {k: v for k, v in record.items() if k != "seconds"}  # all but the time it took

    assert {(r["task_id"], r["sample_index"]): decoded(r) for r in local} == {k: decoded(r) for k, r in on_cluster_records.items()}
    assert any(r["new_tokens"] > 0 for r in local)
