"""The mft-pipeline flow under a real (test) Prefect server: caching by content, force,
stale outputs, stage selection, artifacts."""

import json
import re
import shutil
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.prefect


@pytest.fixture
def project(tmp_path, tiny_llama_dir):
    return lambda answer="a": write_data(tmp_path, tiny_llama_dir, answer)


def write_data(root: Path, model_dir: Path, answer: str = "a") -> Path:
    for task in ("alpha", "beta"):
        lines = [
            json.dumps({"chat_rounds": [{"role": "human", "content": f"{task} q{i}"}, {"role": "bot", "content": f"{answer}{i}"}]})
            for i in range(30)
        ]
        (root / task).mkdir(parents=True, exist_ok=True)
        (root / task / "data.jsonl").write_text("\n".join(lines) + "\n")
    config = root / "pipeline.yaml"
    config.write_text(
        "runs_root: runs\n"
        "data:\n  tasks: [{path: alpha}, {path: beta}]\n"
        f"model: {{path: '{model_dir}'}}\n"
        "ingest: {decontaminate: {enabled: false}, min_valid: 2}\n"
        "tokenize: {seq_length: 64, num_workers: 1}\n"
        "train: {max_steps: 2, warmup_steps: 0, grad_accum: 1, eval_every: 1, precision: fp32, threads: 1}\n"
        "merge: {check_samples: 2}\n"
        "evaluate: {languages: [python], limit: 1, max_new_tokens: 16, evaluate_base: false}\n"
    )
    return config


def run_flow(config: Path, **params):
    from flows.mft_pipeline import mft_pipeline
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from mft_core.config import load_config
    from mft_core.stages import stage_chain

    state = mft_pipeline(config=str(config), return_state=True, **params)
    expected = len(params.get("stages") or stage_chain(load_config(config, params.get("overrides"))))
    # Task run states reach the server as events, a moment after the flow returns: wait for all.
    deadline = time.monotonic() + 15
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
            )
            settled = len(runs) >= expected and all(run.state is not None and run.state.is_final() for run in runs)
            if settled or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    # task run names are "<task name>-<suffix>"
    task_states = {run.name.rsplit("-", 1)[0]: run.state.name for run in runs}
    return state, task_states


def progress_descriptions(flow_run_id) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {artifact.key: artifact.description for artifact in artifacts if artifact.type == "progress"}


def test_second_run_is_cached_and_a_changed_raw_file_recomputes(prefect_api, project):
    config = project()
    state, tasks = run_flow(config)
    assert state.is_completed() and tasks == {"ingest": "Completed", "tokenize": "Completed", "train": "Completed",
                                              "merge": "Completed", "evaluate": "Completed"}
    first = state.result()
    assert all((Path(d) / "_SUCCESS").exists() for d in first.values())
    # The progress artifacts carry the console's progress line as their description.
    progress = progress_descriptions(state.state_details.flow_run_id)
    assert re.fullmatch(r"step 2/2: loss [\d.]+, \d+ tokens/s", progress["train-progress"])
    assert re.fullmatch(r"fine-tuned: executed python 1/1 \(\d passed\)", progress["evaluate-progress"])

    state, tasks = run_flow(config)
    assert state.is_completed() and tasks == {"ingest": "Cached", "tokenize": "Cached", "train": "Cached",
                                              "merge": "Cached", "evaluate": "Cached"}
    assert state.result() == first

    project(answer="b")  # same paths, new content: everything downstream recomputes
    state, tasks = run_flow(config, stages=["ingest", "tokenize"])
    assert tasks == {"ingest": "Completed", "tokenize": "Completed"}
    assert all(state.result()[name] != first[name] for name in ("ingest", "tokenize"))


def test_selected_stage_uses_located_upstream_and_missing_upstream_is_a_clear_error(prefect_api, project):
    config = project()
    from flows.mft_pipeline import mft_pipeline

    state = mft_pipeline(config=str(config), stages=["tokenize"], return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="stage 'ingest' has no finished output"):
        state.result()
    run_flow(config, stages=["ingest"])
    state, tasks = run_flow(config, stages=["tokenize"])
    assert state.is_completed() and tasks == {"tokenize": "Completed"}


def test_force_recomputes_and_a_deleted_output_is_never_a_stale_hit(prefect_api, project):
    config = project()
    state, _ = run_flow(config, stages=["ingest", "tokenize"])
    out = Path(state.result()["ingest"])
    success_time = (out / "_SUCCESS").stat().st_mtime_ns

    state, tasks = run_flow(config, stages=["ingest", "tokenize"], force=["ingest"])
    # the forced ingest rebuilds identical content, so tokenize's key is unchanged: cached
    assert tasks == {"ingest": "Completed", "tokenize": "Cached"} and Path(state.result()["ingest"]) == out
    assert (out / "_SUCCESS").stat().st_mtime_ns != success_time

    tokenized = Path(state.result()["tokenize"])
    shutil.rmtree(tokenized)
    state, tasks = run_flow(config, stages=["ingest", "tokenize"])
    assert tasks == {"ingest": "Cached", "tokenize": "Completed"} and (tokenized / "_SUCCESS").exists()


def test_unknown_stage_fails_the_flow_with_a_clear_message(prefect_api, project):
    config = project()
    from flows.mft_pipeline import mft_pipeline

    state = mft_pipeline(config=str(config), stages=["trian"], return_state=True)
    assert state.is_failed()
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['trian'\]"):
        state.result()


def test_overrides_parameter_and_stats_artifact(prefect_api, project):
    config = project()
    state, _ = run_flow(config, stages=["ingest"], overrides={"ingest.min_valid": 5, "ingest.valid_fraction": 0.0})
    out = Path(state.result()["ingest"])
    stats = json.loads((out / "stats.json").read_text())
    assert stats["tasks"]["alpha"]["valid"] == 5

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["ingest-stats"])))
    assert artifacts and artifacts[0].type == "table"
    table = json.loads(artifacts[0].data) if isinstance(artifacts[0].data, str) else artifacts[0].data
    assert {row["task"] for row in table} >= {"alpha", "beta"}


def test_align_joins_the_chain_and_shares_what_it_does_not_change(prefect_api, project):
    """With a preference task and align.enabled the flow runs ingest ... train, align, merge; a
    change of align.beta reruns align and merge only; align.enabled off, merge takes train's model."""
    config = project()
    root = config.parent
    (root / "prefer").mkdir()
    (root / "prefer" / "d.jsonl").write_text("".join(
        json.dumps({"prompt": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"}) + "\n" for i in range(20)))
    text = config.read_text().replace("tasks: [{path: alpha}, {path: beta}]",
                                      "tasks: [{path: alpha}, {path: beta}, {path: prefer, kind: preference}]")
    config.write_text(text + "align: {enabled: true, max_steps: 2, grad_accum: 1, warmup_steps: 0, eval_every: 2}\n")
    stages = ["ingest", "tokenize", "train", "align", "merge"]
    state, tasks = run_flow(config, stages=stages)
    assert state.is_completed() and tasks == {name: "Completed" for name in stages}
    first = state.result()
    assert json.loads((Path(first["merge"]) / "key_parts.json").read_text())["inputs"][0].startswith("upstream:")
    assert progress_descriptions(state.state_details.flow_run_id)["align-progress"].startswith("step 2/2")

    state, tasks = run_flow(config, stages=stages, overrides={"align.beta": 0.3})
    assert tasks == {"ingest": "Cached", "tokenize": "Cached", "train": "Cached", "align": "Completed",
                     "merge": "Completed"}
    assert state.result()["train"] == first["train"] and state.result()["align"] != first["align"]

    from flows.mft_pipeline import mft_pipeline

    state = mft_pipeline(config=str(config), stages=["align"], overrides={"align.enabled": False}, return_state=True)
    assert state.is_failed()  # align asked for while the config has it off: it says how to turn it on
    with pytest.raises(Exception, match="is off in this config"):
        state.result()
