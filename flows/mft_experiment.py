"""The flow `mft-experiment`: the arms of an experiment config (mft_core/experiment.py), each an
mft-pipeline subflow run, then the comparison table, plot and report.

Parameters (the same in `mft experiment` and `prefect deployment run mft-experiment/<name> -p ...`):
  config     path of the experiment config (relative to the working directory)
  overrides  {"dotted.key": value} on the experiment config (e.g. {"seeds": [1, 2, 3]})
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from flows.mft_pipeline import mft_pipeline
from mft_core.console import run_log
from mft_core.experiment import arm_result, cached_base_valid_loss, load_experiment, write_results


@flow(name="mft-experiment", log_prints=True)
def mft_experiment(config: str = "experiments/paper.yaml", overrides: dict[str, Any] | None = None) -> str:
    experiment = load_experiment(config, overrides)
    with run_log(experiment.base.runs_root):
        print(f"experiment {experiment.name}: {len(experiment.runs)} arm runs "
              f"({', '.join(run.label for run in experiment.runs)}) of {experiment.base_config}")
        results, tokenize_dirs = [], []
        for run in experiment.runs:
            outputs = mft_pipeline.with_options(flow_run_name=f"{experiment.name}-{run.label}")(
                config=str(experiment.base_config), stages=experiment.config.stages, overrides=run.overrides)
            results.append(arm_result(run, outputs))
            tokenize_dirs.append(outputs["tokenize"])
        base_loss = cached_base_valid_loss(experiment, tokenize_dirs)
        paths = write_results(experiment, results, base_loss)
        table = paths["markdown"].read_text()
        create_markdown_artifact(key="experiment", markdown=table,
                                 description=f"experiment {experiment.name}: arms x tasks")
        create_link_artifact(key="experiment-report", link=paths["report"].as_uri(), link_text=paths["report"].name,
                             description="the experiment's report.html (open it in a browser; it needs no network)")
        print(table)
        print(f"experiment results: {paths['markdown']}, {paths['json']}\nexperiment report: {paths['report']}")
    return str(paths["report"])
