"""The mft-pipeline flow under a real (test) Prefect server: caching by content, force,
stale outputs, stage selection, artifacts."""

import json
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.prefect


def write_data(root: Path, answer: str = "a") -> Path:
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
        "ingest: {decontaminate: {enabled: false}, min_valid: 2}\n"
    )
    return config


def run_flow(config: Path, **params):
    from flows.mft_pipeline import mft_pipeline
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    state = mft_pipeline(config=str(config), return_state=True, **params)
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    # task run names are "<task name>-<suffix>"
    task_states = {run.name.rsplit("-", 1)[0]: run.state.name for run in runs}
    return state, task_states


def test_second_run_is_cached_and_a_changed_raw_file_recomputes(prefect_api, tmp_path):
    config = write_data(tmp_path)
    state, tasks = run_flow(config)
    assert state.is_completed() and tasks == {"ingest": "Completed"}
    first_dir = Path(state.result()["ingest"])
    assert (first_dir / "_SUCCESS").exists()

    state, tasks = run_flow(config)
    assert state.is_completed() and tasks == {"ingest": "Cached"}
    assert Path(state.result()["ingest"]) == first_dir

    write_data(tmp_path, answer="b")  # same paths, new content
    state, tasks = run_flow(config)
    assert tasks == {"ingest": "Completed"}
    assert Path(state.result()["ingest"]) != first_dir


def test_force_recomputes_and_a_deleted_output_is_never_a_stale_hit(prefect_api, tmp_path):
    config = write_data(tmp_path)
    state, _ = run_flow(config)
    out = Path(state.result()["ingest"])
    success_time = (out / "_SUCCESS").stat().st_mtime_ns

    state, tasks = run_flow(config, force=["ingest"])
    assert tasks == {"ingest": "Completed"} and Path(state.result()["ingest"]) == out
    assert (out / "_SUCCESS").stat().st_mtime_ns != success_time

    shutil.rmtree(out)
    state, tasks = run_flow(config)
    assert tasks == {"ingest": "Completed"} and (out / "_SUCCESS").exists()


def test_unknown_stage_fails_the_flow_with_a_clear_message(prefect_api, tmp_path):
    config = write_data(tmp_path)
    from flows.mft_pipeline import mft_pipeline

    state = mft_pipeline(config=str(config), stages=["trian"], return_state=True)
    assert state.is_failed()
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['trian'\]"):
        state.result()


def test_overrides_parameter_and_stats_artifact(prefect_api, tmp_path):
    config = write_data(tmp_path)
    state, _ = run_flow(config, overrides={"ingest.min_valid": 5, "ingest.valid_fraction": 0.0})
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
