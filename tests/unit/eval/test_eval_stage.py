"""The evaluate stage for real: tiny Llamas generate, the sandbox executes, pass@k is computed.

The "merge output" is a real folder like the merge stage writes: model/ (weights and a tokenizer
whose chat template renders the training prompt), template.json, merge_report.json and the store's
config.json. The slow end-to-end test uses the model of test_generate.py that has memorized one
problem per language: fine-tuned it must score 100% in every language with a toolchain, the random
base 0%. The resume test kills a real run with SIGKILL and checks the rerun against an
uninterrupted run.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eval_testing import require_toolchain, requires_humaneval_x
from tests.benchmark_data import HUMANEVAL_X
from mft_core.config import config_from_dict
from mft_core.data.render import MFTCoderTemplate, TokenizerChatTemplate, generation_chat_template, make_template
from mft_core.eval.execute import ToolchainMissing, missing_toolchain
from mft_core.eval.problems import LANGUAGES, language_of_task
from mft_core.eval.stage import (evaluate_key_parts, evaluate_summary, format_eval_table, merged_model_folder,
                                 pass_at_k_rows, prompt_modes, run_evaluate, training_template)
from mft_core.store import FileHashCache
from test_generate import MEMORIZED_TASKS, memorizing_llama_folder, save_llama
from tests.installed import require_installed

REPO = Path(__file__).resolve().parents[3]  # the checkout

pytestmark = requires_humaneval_x
MFTCODER = make_template("mftcoder")


def make_merge_dir(root: Path, model_dir: Path, template: MFTCoderTemplate = MFTCODER) -> Path:
    """A folder shaped like the merge stage's output, around a copy of `model_dir`."""
    from transformers import AutoTokenizer

    merge = root / "merge"
    shutil.copytree(model_dir, merge / "model")
    tokenizer = AutoTokenizer.from_pretrained(merge / "model")
    tokenizer.chat_template = generation_chat_template(template, tokenizer.eos_token)
    tokenizer.save_pretrained(merge / "model")
    (merge / "template.json").write_text(json.dumps({
        "template": "mftcoder", "role_markers": {"system_marker": template.system_marker,
                                                 "user_marker": template.user_marker,
                                                 "assistant_marker": template.assistant_marker},
        "eos_id": tokenizer.eos_token_id, "pad_id": tokenizer.eos_token_id}))
    (merge / "merge_report.json").write_text(json.dumps({"method": "lora", "model_dir": "model"}))
    (merge / "config.json").write_text(json.dumps({"stage": "merge", "config": {}}))  # the store's copy
    return merge


def raw_config(root: Path, base_dir: Path, **evaluate) -> dict:
    return {"runs_root": str(root / "runs"),  # the session's benchmark (tests/benchmark_data.py)
            "data": {"tasks": [{"path": "unused"}]}, "model": {"path": str(base_dir)},
            "train": {"precision": "fp32", "threads": 1},
            "evaluate": {"max_new_tokens": 8, "batch_size": 4, "workers": 2, **evaluate}}


def make_config(root: Path, base_dir: Path, **evaluate):
    return config_from_dict(raw_config(root, base_dir, **evaluate), root)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- key and inputs


def test_key_has_every_setting_but_workers(tmp_path, tiny_llama_dir):
    hashes = FileHashCache(tmp_path)
    part = lambda **e: evaluate_key_parts(make_config(tmp_path, tiny_llama_dir, languages=["python"], **e), hashes)  # noqa: E731
    config, inputs = part(limit=2)
    assert "workers" not in config and config["limit"] == 2 and config["precision"] == "fp32"
    assert [i.split(":")[0] for i in inputs] == ["humaneval-x", "base-model"]
    assert part(limit=2, workers=7) == (config, inputs)
    assert part(limit=3)[1][0] != inputs[0]  # other problems, other content
    assert part(limit=2, max_new_tokens=9)[0] != config
    assert [i.split(":")[0] for i in part(limit=2, evaluate_base=False)[1]] == ["humaneval-x"]


def test_key_follows_the_benchmark_content_not_its_path(tmp_path, tiny_llama_dir):
    copies = []
    for name, edit in (("a", False), ("b", False), ("c", True)):
        folder = tmp_path / name / "python"
        folder.mkdir(parents=True)
        source = HUMANEVAL_X.data_file("python")
        rows = [json.loads(line) for line in gzip.open(source, "rt")]
        if edit:
            rows[0]["test"] += "\n# one more line\n"
        with gzip.open(folder / "humaneval_python.jsonl.gz", "wt") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
        raw = raw_config(tmp_path, tiny_llama_dir, languages=["python"], limit=1)
        raw["humaneval_dir"] = str(folder.parent)
        copies.append(evaluate_key_parts(config_from_dict(raw, tmp_path), FileHashCache(tmp_path))[1][0])
    assert copies[0] == copies[1] != copies[2]


# ----------------------------------------------------------------------------- the merge output


def test_merged_model_folder_and_template(tmp_path, tiny_llama_dir):
    markers = make_template("mftcoder", {"system": "<|sys|>", "user": "<|user|>\n", "assistant": "<|bot|>\n"})
    merge = make_merge_dir(tmp_path, tiny_llama_dir, markers)
    assert merged_model_folder(merge) == merge / "model"
    template, eos = training_template(merge, merge / "model")
    assert template == markers and eos == 2
    (merge / "template.json").write_text('{"template": "jinja"}')
    with pytest.raises(ValueError, match=r"merge/template.json: not a template.json of the tokenize stage"):
        training_template(merge, merge / "model")
    (merge / "template.json").unlink()  # an older merge output: the tokenizer's chat template renders it
    assert training_template(merge, merge / "model") == (TokenizerChatTemplate(), None)
    assert merged_model_folder(tiny_llama_dir) == tiny_llama_dir  # a plain HF folder is fine too
    shutil.rmtree(merge / "model")
    (merge / "merge_report.json").unlink()
    with pytest.raises(FileNotFoundError, match="holds no Hugging Face model folder"):
        merged_model_folder(merge)  # its config.json is the store's, not a model's


def test_missing_toolchains_stop_the_stage_first(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("MFT_TOOLCHAINS_DIR", str(tmp_path / "no-toolchains"))
    assert missing_toolchain("js")  # js-md5 lives in the toolchain folder
    cfg = make_config(tmp_path, tiny_llama_dir, languages=["python", "js"], limit=1)
    with pytest.raises(ToolchainMissing, match=r"cannot evaluate js.*js-md5.*make toolchains.*evaluate.languages"):
        run_evaluate(cfg, make_merge_dir(tmp_path, tiny_llama_dir), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_prompt_modes_follow_the_setting(tmp_path, tiny_llama_dir):
    modes = lambda mode: prompt_modes(make_config(tmp_path, tiny_llama_dir, prompt_mode=mode).evaluate)  # noqa: E731
    assert modes("auto") == {"finetuned": "chat", "base": "completion"}
    assert modes("chat") == {"finetuned": "chat", "base": "chat"}
    assert modes("completion") == {"finetuned": "completion", "base": "completion"}


# ----------------------------------------------------------------------------- end to end


def test_the_base_model_is_evaluated_once_for_every_fine_tune_of_it(tmp_path, tiny_llama_dir, tiny_tokenizer, caplog):
    """Two training configs give two merged models; the base model's generations and verdicts are
    built once (keyed by the base model and the evaluation settings) and reused by the second."""
    require_toolchain("python")
    other = tmp_path / "other-finetune"
    save_llama(other, tiny_tokenizer, seed=1)  # another fine-tuned model: other weights, same tokenizer
    cfg = make_config(tmp_path, tiny_llama_dir, languages=["python"], limit=2)
    first = run_evaluate(cfg, make_merge_dir(tmp_path / "a", tiny_llama_dir), tmp_path / "out-a")
    base_dirs = list((cfg.runs_root / "evaluate-base").glob("*[!k]"))
    assert len(base_dirs) == 1
    built = (base_dirs[0] / "generations.jsonl").stat().st_mtime_ns
    with caplog.at_level("INFO"):
        second = run_evaluate(cfg, make_merge_dir(tmp_path / "b", other), tmp_path / "out-b")
    assert "base: reused its evaluation" in caplog.text
    assert list((cfg.runs_root / "evaluate-base").glob("*[!k]")) == base_dirs  # nothing new built
    assert (base_dirs[0] / "generations.jsonl").stat().st_mtime_ns == built
    assert second["models"]["base"] == first["models"]["base"]  # the side-by-side report keeps its base row
    # Another generation setting is another base evaluation.
    longer = make_config(tmp_path, tiny_llama_dir, languages=["python"], limit=2, max_new_tokens=12)
    run_evaluate(longer, make_merge_dir(tmp_path / "c", tiny_llama_dir), tmp_path / "out-c")
    assert len(list((cfg.runs_root / "evaluate-base").glob("*[!k]"))) == 2


def test_stage_end_to_end(tmp_path, tiny_llama_dir):
    require_toolchain("python")
    cfg = make_config(tmp_path, tiny_llama_dir, languages=["python"], limit=2)
    out = tmp_path / "out"
    seen = []
    summary = run_evaluate(cfg, make_merge_dir(tmp_path, tiny_llama_dir), out, progress=lambda *p: seen.append(p))
    assert sorted(p.name for p in out.iterdir()) == ["execution", "generations.jsonl", "report.md", "results.jsonl",
                                                     "summary.json"]
    assert json.loads((out / "summary.json").read_text()) == summary
    assert seen[-1][:2] == (8, 8) and [done for done, *_ in seen] == sorted(done for done, *_ in seen)
    # The console's line goes with it: per model and language, done/total (and passed once executed).
    assert re.fullmatch(r"base: executed python 2/2 \(\d passed\)", seen[-1][2])
    assert any(line == "fine-tuned: generated python 2/2" for *_, line in seen)

    # The fine-tuned model's generations here, the base model's in its own shared output.
    base_output = cfg.runs_root / summary["models"]["base"]["evaluation_output"]
    assert base_output.parent == cfg.runs_root / "evaluate-base" and (base_output / "_SUCCESS").is_file()
    generations = read_jsonl(out / "generations.jsonl") + read_jsonl(base_output / "generations.jsonl")
    assert sorted((g["model"], g["task_id"]) for g in generations) == [
        (model, task) for model in ("base", "finetuned") for task in ("Python/0", "Python/1")]
    for g in generations:
        if g["model"] == "finetuned":  # the training rendering around the instruction
            assert g["prompt_mode"] == "chat"
            assert g["prompt"].startswith("<s>human\nComplete the following Python code.\n\nfrom typing import List")
            assert g["prompt"].endswith('    """\n\n<s>bot\n')
        else:
            assert g["prompt_mode"] == "completion" and g["prompt"].startswith("from typing import List")
        assert g["new_tokens"] <= 8 and g["stopped"] in ("eos", "complete", "max_new_tokens")

    results = read_jsonl(out / "results.jsonl")
    assert [(r["model"], r["task_id"]) for r in results] == [
        ("base", "Python/0"), ("base", "Python/1"), ("finetuned", "Python/0"), ("finetuned", "Python/1")]
    assert all(r["verdict"] in ("passed", "failed", "timeout") and "cpu_s" in r for r in results)

    assert summary["languages"] == ["python"] and summary["problems"] == {"python": 2} and summary["ks"] == [1]
    for model in summary["models"].values():
        python = model["pass_at_k"]["languages"]["python"]
        assert python["problems"] == 2 and python["samples"] == 2 and 0 <= python["pass@1"] <= 1
        assert model["pass_at_k"]["average"]["pass@1"] == python["pass@1"]
        assert sum(model["verdicts"]["python"].values()) == 2
        assert model["generation"]["samples"] == 2 and model["generation"]["tokens_per_s"] > 0
    assert summary["models"]["finetuned"]["prompt_mode"] == "chat"
    assert summary["models"]["base"]["prompt_mode"] == "completion"

    table = format_eval_table(summary)
    assert "base pass@1" in table and "fine-tuned pass@1" in table and "change pass@1" in table
    alone = format_eval_table({**summary, "models": {"finetuned": summary["models"]["finetuned"]}})
    assert "fine-tuned pass@1" in alone and "base" not in alone and "change" not in alone
    assert "| python | 2 |" in (out / "report.md").read_text()
    assert evaluate_summary(out).startswith(f"evaluate ({out})\n")
    assert {(row["model"], row["language"]) for row in pass_at_k_rows(summary)} == {
        (model, language) for model in ("base", "fine-tuned") for language in ("python", "average")}

    # A rerun on the finished work directory generates and executes nothing again.
    files = [out / "generations.jsonl", out / "execution/finetuned.jsonl", base_output / "generations.jsonl",
             base_output / "execution/base.jsonl"]
    before = {path: path.read_bytes() for path in files}
    again = run_evaluate(cfg, tmp_path / "merge", out)
    assert without_wall_times(again) == without_wall_times(summary)
    assert {path: path.read_bytes() for path in files} == before


def without_wall_times(summary: dict) -> dict:
    summary = json.loads(json.dumps(summary))
    for model in summary["models"].values():
        model["generation"].pop("wall_s")
        model["execution"].pop("wall_s")
    return summary


def available_languages() -> list[str]:
    return [language for language in LANGUAGES if not missing_toolchain(language)]


@pytest.mark.slow
def test_memorized_model_scores_full_marks(tmp_path, test_cache_root, tiny_llama_dir):
    """Fine-tuned (a model that knows one problem per language) vs base (random): the whole chain
    (chat prompt, generation, stop, extraction, truncation, assembly, sandbox, pass@k) works in
    every language whose toolchain is installed."""
    languages = available_languages()
    if not languages:
        require_installed("no HumanEval-X toolchain installed (scripts/install-toolchains.sh)")
    merge = tmp_path / "merge"
    shutil.copytree(memorizing_llama_folder(test_cache_root, tiny_llama_dir), merge / "model")
    shutil.copyfile(merge / "model" / "template.json", merge / "template.json")
    (merge / "merge_report.json").write_text(json.dumps({"model_dir": "model"}))
    task_ids = [t for t in MEMORIZED_TASKS if language_of_task(t) in languages]
    cfg = make_config(tmp_path, tiny_llama_dir, languages=languages, task_ids=task_ids, max_new_tokens=96,
                      prompt_mode="chat")  # the base gets the same (training) prompts
    summary = run_evaluate(cfg, merge, tmp_path / "out")
    finetuned, base = summary["models"]["finetuned"]["pass_at_k"], summary["models"]["base"]["pass_at_k"]
    assert {lang: row["pass@1"] for lang, row in finetuned["languages"].items()} == {lang: 1.0 for lang in languages}
    assert {lang: row["pass@1"] for lang, row in base["languages"].items()} == {lang: 0.0 for lang in languages}
    assert finetuned["average"]["pass@1"] == 1.0
    report = (tmp_path / "out" / "report.md").read_text()
    for language in languages:
        assert f"| {language} | 1 | 0.0% | 100.0% | +100.0 |" in report
    base_output = cfg.runs_root / summary["models"]["base"]["evaluation_output"]
    generations = read_jsonl(tmp_path / "out" / "generations.jsonl") + read_jsonl(base_output / "generations.jsonl")
    assert {g["stopped"] for g in generations if g["model"] == "finetuned"} == {"complete"}  # the closing fence
    prompts = {model: [g["prompt"] for g in generations if g["model"] == model] for model in ("base", "finetuned")}
    assert sorted(prompts["base"]) == sorted(prompts["finetuned"])
    assert all(p.startswith("<s>human\nComplete the following ") for p in prompts["base"])


RUN = """
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from mft_core.config import config_from_dict
from mft_core.eval.stage import run_evaluate

raw, base, merge, out = json.loads(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
run_evaluate(config_from_dict(raw, base), merge, out)
"""


@pytest.mark.slow
def test_killed_run_resumes_without_duplicates_or_losses(tmp_path, tiny_tokenizer):
    require_toolchain("js")
    model = save_llama(tmp_path / "lively", tiny_tokenizer, seed=2, tie_word_embeddings=False, initializer_range=0.2)
    merge = make_merge_dir(tmp_path, model)
    raw = raw_config(tmp_path, model, languages=["js"], limit=12, max_new_tokens=48, batch_size=1)
    out = tmp_path / "out"
    generations = out / "generations.jsonl"
    child = subprocess.Popen([sys.executable, "-c", RUN, json.dumps(raw), str(tmp_path), str(merge), str(out)],
                             cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None:
        if generations.exists() and generations.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.01)
    assert child.poll() is None, "the run ended before it could be killed: " + child.stderr.read().decode()[-3000:]
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    child.stderr.close()
    first = generations.read_text().splitlines()
    assert 3 <= len(first) < 24 and not (out / "summary.json").exists()

    cfg = config_from_dict(raw, tmp_path)
    summary = run_evaluate(cfg, merge, out)
    lines = generations.read_text().splitlines()
    assert lines[:len(first)] == first  # what the killed run wrote is kept as it was
    base_generations = cfg.runs_root / summary["models"]["base"]["evaluation_output"] / "generations.jsonl"
    lines += base_generations.read_text().splitlines()  # the base model's, in its own output
    keys = [(g["model"], g["task_id"], g["sample_index"]) for g in map(json.loads, lines)]
    assert len(keys) == len(set(keys)) == 24
    assert sum(m["execution"]["samples"] for m in summary["models"].values()) == 24

    reference = run_evaluate(cfg, merge, tmp_path / "uninterrupted")
    by_key = lambda path: {(g["model"], g["task_id"]): (g["raw"], g["generation"]) for g in read_jsonl(path)}  # noqa: E731
    assert by_key(generations) == by_key(tmp_path / "uninterrupted" / "generations.jsonl")
    verdicts = lambda path: [(r["model"], r["task_id"], r["verdict"]) for r in read_jsonl(path)]  # noqa: E731
    assert verdicts(out / "results.jsonl") == verdicts(tmp_path / "uninterrupted" / "results.jsonl")
    assert {t: m["pass_at_k"] for t, m in summary["models"].items()} == \
        {t: m["pass_at_k"] for t, m in reference["models"].items()}
