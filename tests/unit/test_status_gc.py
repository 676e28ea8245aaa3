"""`mft status` and `mft gc` on real stage outputs of a tiny project: keys and their recorded
components, complete / partial / building outputs (a real trainer, killed), what differs when the
config or a raw file changed, and garbage collection that never touches what a config refers to
or what a running build writes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mft_core import store
from mft_core.cli import main
from mft_core.config import load_config
from mft_core.stages import run_stage

REPO = Path(__file__).resolve().parents[2]


def write_project(root: Path, model_dir: Path, **train) -> Path:
    for name in ("alpha", "beta"):
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "d.jsonl").write_text("".join(
            json.dumps({"prompt": f"{name} question {i} " + "word " * (i % 9), "answer": f"answer {i}"}) + "\n"
            for i in range(40)))
    config = {
        "runs_root": "runs",
        "data": {"tasks": [{"path": "alpha"}, {"path": "beta"}]},
        "model": {"path": str(model_dir)},
        "ingest": {"decontaminate": {"enabled": False}, "min_valid": 3},
        "tokenize": {"seq_length": 64, "num_workers": 1},
        "train": {"max_steps": 4, "warmup_steps": 0, "grad_accum": 1, "eval_every": 100, "checkpoint_every": 2,
                  "precision": "fp32", "threads": 1, **train},
    }
    (root / "pipeline.yaml").write_text(yaml.safe_dump(config))
    # gc's other sources of configs: none here but pipeline.yaml, and a deployment naming it.
    (root / "prefect.yaml").write_text(yaml.safe_dump({"deployments": [{"name": "default", "parameters": {"config": "pipeline.yaml"}}]}))
    return root / "pipeline.yaml"


def status_json(capsys, config: Path, *sets: str) -> dict[str, dict]:
    args = ["status", "--config", str(config), "--json"] + [item for s in sets for item in ("--set", s)]
    assert main(args) == 0
    return {s["stage"]: s for s in json.loads(capsys.readouterr().out)["stages"]}


def test_key_parts_are_written_beside_each_output_and_stay_out_of_the_manifest(tmp_path, tiny_llama_dir):
    cfg = load_config(write_project(tmp_path, tiny_llama_dir))
    for name in ("ingest", "tokenize"):
        out = run_stage(cfg, name).directory
        parts = json.loads((out / store.KEY_PARTS).read_text())
        manifest = json.loads((out / store.MANIFEST).read_text())
        assert store.stage_key(**parts) == manifest["key"]  # the components are exactly what was hashed
        assert store.KEY_PARTS not in {f["path"] for f in manifest["files"]}  # downstream keys unaffected


def test_status_of_complete_missing_and_changed_outputs(tmp_path, tiny_llama_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_project(tmp_path, tiny_llama_dir)
    fresh = status_json(capsys, config)
    assert fresh["ingest"]["state"] == "missing" and fresh["ingest"]["key"]
    assert fresh["tokenize"]["state"] == "waiting" and fresh["tokenize"]["key"] is None

    cfg = load_config(config)
    ingest_dir = run_stage(cfg, "ingest").directory
    run_stage(cfg, "tokenize")
    done = status_json(capsys, config)
    assert done["ingest"]["state"] == done["tokenize"]["state"] == "complete"
    assert done["ingest"]["directory"] == str(ingest_dir) and done["ingest"]["size_bytes"] > 1000
    assert done["ingest"]["built"].endswith("UTC") and done["ingest"]["other"] is None
    assert done["train"]["state"] == "missing" and done["train"]["key"]

    # Another setting: ingest's newest output has another key, and the status says which component.
    changed = status_json(capsys, config, "ingest.valid_fraction=0.2")
    assert changed["ingest"]["state"] == "missing"
    assert changed["ingest"]["other"]["key16"] == ingest_dir.name
    assert changed["ingest"]["other"]["differences"] == ["config ingest.valid_fraction: 0.05 -> 0.2"]

    # A raw file changed in place: the input is named.
    with open(tmp_path / "beta" / "d.jsonl", "a") as fh:
        fh.write(json.dumps({"prompt": "one more", "answer": "record"}) + "\n")
    assert status_json(capsys, config)["ingest"]["other"]["differences"] == ["input beta/d.jsonl: content changed"]

    assert main(["status", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert "input beta/d.jsonl: content changed" in text and f"newest ingest output is another key, {ingest_dir.name}" in text


@pytest.mark.slow
def test_training_in_progress_then_killed_and_gc_around_it(tmp_path, tiny_llama_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_project(tmp_path, tiny_llama_dir, max_steps=20000, epochs=2000)
    cfg = load_config(config)
    run_stage(cfg, "ingest")
    run_stage(cfg, "tokenize")
    train_root = tmp_path / "runs" / "train"
    proc = subprocess.Popen([sys.executable, "-m", "mft_core.cli", "train", "--config", str(config)],
                            cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        # Any complete checkpoint: with keep_checkpoints 2 a given one lives only until the one
        # after next is written, which a loaded machine's polling can miss.
        while not list(train_root.glob("*.partial/checkpoints/step-*/COMPLETE")):
            assert proc.poll() is None and time.time() < deadline, "the trainer never wrote a checkpoint"
            time.sleep(0.05)
        running = status_json(capsys, config)["train"]
        assert running["state"] == "building"  # the trainer's run holds the key's lock
        assert running["progress"].startswith("step ") and " of 20000" in running["progress"]

        # pipeline.yaml now asks for fewer steps: the run in progress belongs to no config, but its
        # lock is held, so gc keeps it; ingest and tokenize are still this config's.
        config.write_text(config.read_text().replace("max_steps: 20000", "max_steps: 3"))
        assert main(["gc", "--delete"]) == 0
        out = capsys.readouterr().out
        assert "Nothing to remove" in out and f"kept, a run is writing it: {Path(running['directory'])}" in out
        assert Path(running["directory"]).is_dir()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    config.write_text(config.read_text().replace("max_steps: 3", "max_steps: 20000"))
    killed = status_json(capsys, config)["train"]
    assert killed["state"] == "partial"
    step = int(killed["progress"].split()[1])
    newest = max(int(p.parent.name.split("-")[1]) for p in train_root.glob("*.partial/checkpoints/step-*/COMPLETE"))
    assert step >= newest >= 2
    assert f"step {step} of 20000, newest checkpoint step-{newest:07d} ({newest} steps: a rerun resumes there)" == killed["progress"]

    # Dry run by default: listed with its size, nothing removed; --delete removes it (and its lock).
    config.write_text(config.read_text().replace("max_steps: 20000", "max_steps: 3"))
    assert main(["gc"]) == 0
    out = capsys.readouterr().out
    key16 = Path(killed["directory"]).name.split(".")[0]
    assert f"train  {key16}  partial" in out and "Dry run" in out
    assert "ingest" not in out.split("Referring configs")[0]  # still referred to
    assert Path(killed["directory"]).is_dir()
    assert main(["gc", "--delete"]) == 0
    assert "removed" in capsys.readouterr().out
    assert sorted(p.name for p in train_root.iterdir()) == []
    assert status_json(capsys, config)["ingest"]["state"] == "complete"


def test_gc_keeps_the_base_evaluation_a_finished_evaluate_refers_to(tmp_path, tiny_llama_dir):
    """The base model's evaluation is its own output (runs/evaluate-base/<key>), shared by the
    fine-tunes of one base: gc keeps the one the config's evaluate output reports, removes the
    others, and removes none while that evaluate output is not built yet (it may reuse any)."""
    from mft_core.eval.stage import BASE_STAGE
    from mft_core.gc import plan_gc
    from mft_core.stages import compute_key

    cfg = load_config(write_project(tmp_path, tiny_llama_dir))
    run_stage(cfg, "ingest")
    upstream = run_stage(cfg, "tokenize").directory
    for name in ("train", "merge"):
        upstream = store.build_stage(cfg.runs_root, name, compute_key(cfg, name, upstream),
                                     lambda work: (work / "out.txt").write_text(name)).directory
    bases = [store.build_stage(cfg.runs_root, BASE_STAGE, key * 64, lambda work: None).directory for key in "ab"]
    garbage = lambda: {(g.stage, g.key16) for g in plan_gc(tmp_path).garbage}  # noqa: E731
    assert not {stage for stage, _ in garbage()} & {BASE_STAGE}  # evaluate not built: any base may be reused

    summary = {"models": {"base": {"evaluation_output": f"{BASE_STAGE}/{bases[0].name}"}}}
    store.build_stage(cfg.runs_root, "evaluate", compute_key(cfg, "evaluate", upstream),
                      lambda work: (work / "summary.json").write_text(json.dumps(summary)))
    assert {key for stage, key in garbage() if stage == BASE_STAGE} == {bases[1].name}


def test_gc_keeps_every_arm_of_an_experiment_and_an_unloadable_experiment_stops_delete(tmp_path, tiny_llama_dir):
    """The arms of experiments/*.yaml (and of an mft-experiment deployment) refer to their train
    outputs like any config: gc keeps them; the training of a config no one names is garbage."""
    from mft_core.experiment import load_experiment
    from mft_core.gc import plan_gc
    from mft_core.stages import compute_key

    config = write_project(tmp_path, tiny_llama_dir)
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "paper.yaml").write_text(yaml.safe_dump(
        {"base": "../pipeline.yaml", "preset": "paper", "steps": 2, "seeds": [1]}))
    experiment = load_experiment(tmp_path / "experiments" / "paper.yaml")
    cfg = load_config(config)
    run_stage(cfg, "ingest")
    tokenize = run_stage(cfg, "tokenize").directory

    def fake_train(overrides):  # the train output's key, built without training (gc reads keys only)
        arm_cfg = load_config(config, overrides)
        return store.build_stage(cfg.runs_root, "train", compute_key(arm_cfg, "train", tokenize),
                                 lambda work: (work / "out.txt").write_text("x")).directory.name

    arms = {fake_train(run.overrides) for run in experiment.runs}
    orphan = fake_train({"train.lr": 0.5})
    plan = plan_gc(tmp_path)
    assert {g.key16 for g in plan.garbage if g.stage == "train"} == {orphan}
    assert not arms & {g.key16 for g in plan.garbage} and len(arms) == 4
    assert "experiments/paper.yaml arm sft-alpha-seed1" in plan.configs

    (tmp_path / "experiments" / "broken.yaml").write_text("base: ../pipeline.yaml\n")  # no arms
    assert any("experiments/broken.yaml" in line and "no arms" in line for line in plan_gc(tmp_path).unloadable)
