"""The mft-experiment flow under a real (test) Prefect server, on a tiny random Llama: the paper
preset's arms share the ingest and tokenize outputs, a rerun trains nothing again, an arm lost
in a crash is the only one trained on resume; and the table's arithmetic on known numbers."""

import json
from pathlib import Path

import pytest
import yaml

from tests.flow.test_flow_caching import write_data

pytestmark = pytest.mark.prefect


def write_experiment(root: Path, model_dir: Path, **settings) -> Path:
    write_data(root, model_dir)
    path = root / "experiments" / "paper.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump({"base": "../pipeline.yaml", "preset": "paper", "seeds": [3], "steps": 2,
                                    **settings}))
    return path


def finished(root: Path, stage: str) -> dict[str, float]:
    return {p.parent.name: p.stat().st_mtime for p in (root / "runs" / stage).glob("*/_SUCCESS")}


def test_the_paper_arms_share_ingest_and_tokenize_and_resume_arm_by_arm(prefect_api, tmp_path, tiny_llama_dir):
    from flows.mft_experiment import mft_experiment

    config = write_experiment(tmp_path, tiny_llama_dir)
    report = Path(mft_experiment(config=str(config)))

    # one ingest and one tokenize output for all four arms; one training per arm
    assert len(finished(tmp_path, "ingest")) == 1 and len(finished(tmp_path, "tokenize")) == 1
    trained = finished(tmp_path, "train")
    assert len(trained) == 4
    result = json.loads((report.parent / "experiment.json").read_text())
    runs = {r["arm"]: r for r in result["runs"]}
    assert list(runs) == ["mft-case3", "mixed-sft", "sft-alpha", "sft-beta"]
    assert set(runs["mft-case3"]["valid_loss"]) == {"alpha", "beta"} and set(runs["sft-beta"]["valid_loss"]) == {"beta"}
    rows = result["summary"]["rows"]
    assert list(rows) == ["mft-case3", "mixed-sft", "single-task SFT"]
    single = rows["single-task SFT"]["tasks"]
    assert single["alpha"]["loss"] == runs["sft-alpha"]["valid_loss"]["alpha"]
    assert single["beta"]["loss"] == runs["sft-beta"]["valid_loss"]["beta"]
    # the same budget in every arm: the two single-task models share theirs
    assert {arm: r["steps"] for arm, r in runs.items()} == {"mft-case3": 2, "mixed-sft": 2, "sft-alpha": 1, "sft-beta": 1}
    base = result["summary"]["base_valid_loss"]
    assert set(base) == {"alpha", "beta"} and all(v > 0 for v in base.values())
    page = report.read_text()
    assert "single-task SFT" in page and "data:image/png;base64," in page and "<b>" in page

    # a rerun trains nothing again
    mft_experiment(config=str(config))
    assert finished(tmp_path, "train") == trained

    # an arm lost in a crash (its output never published) is the only one trained on resume
    lost = Path(runs["sft-alpha"]["train_dir"])
    (lost / "_SUCCESS").unlink()
    mft_experiment(config=str(config))
    again = finished(tmp_path, "train")
    assert {k for k in again if again[k] != trained.get(k)} == {lost.name}


def test_mft_experiment_as_the_readme_types_it(prefect_api, tmp_path, tiny_llama_dir, capsys, monkeypatch):
    from mft_core.cli import main

    config = write_experiment(tmp_path, tiny_llama_dir)
    monkeypatch.chdir(tmp_path)
    assert main(["experiment", "--config", "experiments/paper.yaml", "--set", "steps=1", "--set", "seeds=[5]"]) == 0
    (report,) = (tmp_path / "runs" / "experiments").glob("paper-*/report.html")
    (run_log,) = (tmp_path / "runs" / "logs").glob("*.log")  # the console's lines, as `mft` named it
    assert f"experiment report: {report}" in run_log.read_text() and str(run_log) in capsys.readouterr().err
    runs = json.loads((report.parent / "experiment.json").read_text())["runs"]
    assert [(r["arm"], r["seed"], r["steps"]) for r in runs] == [("mft-case3", 5, 1), ("mixed-sft", 5, 1),
                                                                  ("sft-alpha", 5, 1), ("sft-beta", 5, 1)]


def test_the_table_arithmetic_best_per_task_and_the_verdict(tmp_path, tiny_llama_dir):
    from mft_core.experiment import load_experiment, markdown, summarize, write_results

    experiment = load_experiment(write_experiment(tmp_path, tiny_llama_dir, seeds=[1, 2]))
    assert [r.label for r in experiment.runs] == [f"{arm}-seed{s}" for s in (1, 2) for arm in ("mft-case3", "mixed-sft",
                                                                                                 "sft-alpha", "sft-beta")]
    assert experiment.runs[0].overrides["train.max_steps"] == 2 and experiment.runs[4].overrides["train.seed"] == 2

    def result(arm, seed, loss):
        return {"arm": arm, "seed": seed, "train_dir": "x", "valid_loss": loss, "steps": 2,
                "trained_tokens": 100, "train_seconds": 1.0}

    base = {"alpha": 2.0, "beta": 4.0}
    results = [result("mft-case3", 1, {"alpha": 1.0, "beta": 2.0}), result("mft-case3", 2, {"alpha": 1.2, "beta": 2.0}),
               result("mixed-sft", 1, {"alpha": 1.5, "beta": 3.0}), result("mixed-sft", 2, {"alpha": 1.5, "beta": 3.0}),
               result("sft-alpha", 1, {"alpha": 0.9}), result("sft-alpha", 2, {"alpha": 0.9}),
               result("sft-beta", 1, {"beta": 3.6}), result("sft-beta", 2, {"beta": 3.2})]
    summary = summarize(experiment, results, base)
    mft = summary["rows"]["mft-case3"]
    assert mft["tasks"]["alpha"]["loss"] == pytest.approx(1.1) and mft["tasks"]["alpha"]["seed_spread"] == pytest.approx(0.1)
    assert mft["tasks"]["alpha"]["gain"] == pytest.approx(0.45) and mft["tasks"]["beta"]["gain"] == pytest.approx(0.5)
    assert mft["mean_gain"] == pytest.approx(0.475) and mft["task_spread"] == pytest.approx(0.05)
    single = summary["rows"]["single-task SFT"]
    assert single["tasks"]["beta"]["loss"] == pytest.approx(3.4) and single["trained_tokens"] == 200  # two models
    assert summary["best_per_task"] == {"alpha": "single-task SFT", "beta": "mft-case3"}
    # mft +47.5% vs single-task (55% + 15%)/2 = +35%: a margin of 12.5% against seed noise of at most 0.1/1.1 = 9.1%
    assert summary["verdict"].startswith("mft-case3 has the highest mean gain (+47.50%)") and "more than the seeds'" in summary["verdict"]
    table = markdown(summary, experiment)
    assert "| mft-case3 | 1.1000 ± 0.1000 (+45.0%) | **2.0000 ± 0.0000 (+50.0%)** | +47.5% | +5.0% | 100 | 1 |" in table
    assert "(±9.09% of a task's loss)" in table

    # pass@k is not per task: every arm its own row, the mean over seeds
    for r, p in zip(results, (0.5, 0.25, 0.0, 0.0, 1.0, 0.5, 0.0, 0.0)):
        r["pass_at_k"] = {"pass@1": {"python": p, "average": p / 2}}
    summary = summarize(experiment, results, base)
    assert summary["pass_at_k"]["mft-case3"] == {"pass@1": {"python": 0.375, "average": 0.1875}}
    assert summary["pass_at_k"]["sft-alpha"]["pass@1"]["python"] == 0.75 and "sft-beta" in summary["pass_at_k"]
    assert "| mft-case3 | pass@1 | 37.5 | 18.8 |" in markdown(summary, experiment)
    page = write_results(experiment, results, base)["report"].read_text()
    assert "<td>mft-case3</td><td>pass@1</td><td>37.50%</td><td>18.75%</td>" in page and "<script" not in page

    results[0]["valid_loss"] = {"alpha": 0.2, "beta": 2.0}  # a noisy seed: the arms no longer separate
    assert "do not separate at this budget" in summarize(experiment, results, base)["verdict"]


def test_an_arm_with_a_bad_override_fails_before_anything_trains(tmp_path, tiny_llama_dir):
    from mft_core.config import ConfigError
    from mft_core.experiment import load_experiment

    config = write_experiment(tmp_path, tiny_llama_dir, arms=[{"name": "typo", "overrides": {"train.los": "case1"}}])
    with pytest.raises(ConfigError, match=r"(?s)arm 'typo'.*train\.los: unknown key"):
        load_experiment(config)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_the_experiment_report_renders_in_a_real_browser(tmp_path, tiny_llama_dir):
    from mft_core.experiment import load_experiment, write_results
    from tests.browser import Browser, chromium_missing
    from tests.installed import require_installed

    require_installed(chromium_missing())
    experiment = load_experiment(write_experiment(tmp_path, tiny_llama_dir))
    results = [{"arm": arm, "seed": 3, "train_dir": str(tmp_path / arm), "valid_loss": loss, "steps": 2,
                "trained_tokens": 100, "train_seconds": 1.0, "pass_at_k": {"pass@1": {"python": 0.5, "average": 0.5}}}
               for arm, loss in (("mft-case3", {"alpha": 1.0, "beta": 2.0}), ("mixed-sft", {"alpha": 1.1, "beta": 2.1}),
                                 ("sft-alpha", {"alpha": 0.9}), ("sft-beta", {"beta": 2.2}))]
    report = write_results(experiment, results, {"alpha": 2.0, "beta": 3.0})["report"]
    with Browser() as browser:
        browser.open(report.as_uri())
        text = browser.wait_for_text(["mft-pipeline experiment paper", "Reading:", "Validation loss per task",
                                      "single-task SFT", "HumanEval-X pass@k", "Arm runs", "Provenance"], timeout=60)
        assert "one seed, so the noise is unknown" in text
        images = browser.evaluate("[...document.images].map(i => i.complete && i.naturalWidth > 0)")
        assert images == [True]  # the plot decoded
        assert browser.evaluate("document.scripts.length") == 0
