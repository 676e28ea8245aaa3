"""The config schema: errors name the key path; overrides; the resolved config."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mft_core.config import ConfigError, apply_overrides, load_config, parse_override

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path, text):
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    return path


MINIMAL = "data:\n  tasks:\n    - {path: data/a}\n"


def test_minimal_config_fills_defaults_and_resolves_paths_against_the_file(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.runs_root == tmp_path / "runs"
    assert cfg.data.tasks[0].path == tmp_path / "data/a" and cfg.data.tasks[0].task_name == "a"
    assert cfg.ingest.on_error == "fail" and cfg.ingest.decontaminate.ngram == 13


@pytest.mark.parametrize(
    "text,expected",
    [
        (MINIMAL + "ingest:\n  on_eror: skip\n", "ingest.on_eror: unknown key"),
        (MINIMAL + "trian: {}\n", "trian: unknown key"),
        (MINIMAL + "ingest:\n  valid_fraction: lots\n", "ingest.valid_fraction: Input should be a valid number"),
        (MINIMAL + "ingest:\n  on_error: ignore\n", "ingest.on_error: Input should be 'fail' or 'skip'"),
        (MINIMAL + "ingest:\n  decontaminate: {ngram: 2}\n", "ingest.decontaminate.ngram: Input should be greater than or equal to 4"),
        ("data:\n  tasks: []\n", "data.tasks: List should have at least 1 item"),
        ("runs_root: runs\n", "data: required key is missing"),
        ("data:\n  tasks:\n    - {path: a, weight: 0}\n", "data.tasks.0.weight: Input should be greater than 0"),
        ("data:\n  tasks: '[/data/a,/data/b]'\n", "data.tasks: Input should be a valid list"),
        (MINIMAL + "train: {attention: flash_attention_2, precision: fp32}\n", "flash_attention_2 has no fp32 kernels"),
        (MINIMAL + "train: {method: qlora, precision: fp32}\n", "qlora stores its 4-bit weights in bf16"),
    ],
)
def test_errors_name_the_key_path(tmp_path, text, expected):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert expected in str(info.value)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "data:\n  tasks:\n    - {path: a\n")
    with pytest.raises(ConfigError, match=r"pipeline.yaml:\d+: not valid YAML"):
        load_config(path)


def test_overrides_set_nested_keys_and_list_items(tmp_path):
    path = write(tmp_path, MINIMAL)
    overrides = dict(parse_override(s) for s in ["ingest.on_error=skip", "ingest.valid_fraction=0.2", "data.tasks.0.weight=2.5", "ingest.decontaminate.enabled=false"])
    cfg = load_config(path, overrides)
    assert cfg.ingest.on_error == "skip" and cfg.ingest.valid_fraction == 0.2
    assert cfg.data.tasks[0].weight == 2.5 and cfg.ingest.decontaminate.enabled is False
    with pytest.raises(ConfigError, match="not an index"):
        apply_overrides({"data": {"tasks": []}}, {"data.tasks.3.weight": 1})
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_override("ingest.on_error")
    with pytest.raises(ConfigError, match="ingest.bogus: unknown key"):
        load_config(path, {"ingest.bogus": 1})


def test_mft_config_show_prints_the_resolved_config_with_overrides(tmp_path):
    path = write(tmp_path, MINIMAL)
    out = subprocess.run(
        [sys.executable, "-m", "mft_core.cli", "config", "show", "--config", str(path), "--set", "ingest.min_valid=3"],
        capture_output=True, text=True, check=True, cwd=REPO,
    ).stdout
    shown = yaml.safe_load(out)
    assert shown["ingest"]["min_valid"] == 3
    assert shown["runs_root"] == str(tmp_path / "runs")
    bad = subprocess.run(
        [sys.executable, "-m", "mft_core.cli", "config", "show", "--config", str(path), "--set", "ingest.nope=1"],
        capture_output=True, text=True, cwd=REPO,
    )
    assert bad.returncode == 2 and "ingest.nope: unknown key" in bad.stderr


def test_the_shipped_pipeline_yaml_is_valid():
    cfg = load_config(REPO / "pipeline.yaml")
    assert [t.task_name for t in cfg.data.tasks] == ["text-to-code", "code-completion", "docstring-generation"]


def test_readme_configuration_reference_is_the_generated_one():
    from mft_core.config import reference_markdown

    readme = (REPO / "README.md").read_text()
    start = readme.index("<!-- config-reference:")
    block = readme[readme.index("\n", start) + 1 : readme.index("<!-- config-reference end -->")]
    assert block == reference_markdown(), "README is stale: paste the output of `mft config reference`"


@pytest.mark.parametrize("preset", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_in_configs_is_valid(preset):
    cfg = load_config(preset)
    assert cfg.data.tasks and cfg.train.launch.num_processes >= 1
