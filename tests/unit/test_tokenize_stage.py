"""The tokenize stage on ingest output: shards, stats, determinism across workers, resume, keys."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa

from mft_core.data.render import PRETRAIN_MARKERS, make_template, render_record
from mft_core.data.tokenize import open_shard
from mft_core.modeling import load_tokenizer
from mft_core.stages import compute_key, run_stage

REPO = Path(__file__).resolve().parents[2]


def chat(q, a):
    return {"chat_rounds": [{"role": "human", "content": q}, {"role": "bot", "content": a}]}


def make_project(root: Path, tokenizer_dir: Path, n: int = 60, **tokenize) -> Path:
    for name in ("alpha", "beta"):
        (root / name).mkdir(parents=True, exist_ok=True)
        lines = [json.dumps(chat(f"{name} question {i} " + "word " * (i % 40), f"def f{i}(x):\n    return x + {i}")) for i in range(n)]
        lines.append(json.dumps({"text": f"# {name} pretraining text\nprint('hello')"}))
        (root / name / "d.jsonl").write_text("\n".join(lines) + "\n")
    cfg = {
        "data": {"tasks": [{"path": "alpha"}, {"path": "beta"}]},
        "model": {"path": str(tokenizer_dir)},
        "ingest": {"decontaminate": {"enabled": False}, "min_valid": 4, "row_group_size": 64},
        "tokenize": {"seq_length": 64, "num_workers": 1, **tokenize},
    }
    (root / "pipeline.yaml").write_text(json.dumps(cfg))
    return root / "pipeline.yaml"


def tokenize(cfg):
    run_stage(cfg, "ingest")
    return run_stage(cfg, "tokenize")


def load(path: Path, **overrides):
    from mft_core.config import load_config

    return load_config(path, overrides)


def test_shards_stats_and_template(tmp_path, tiny_llama_dir):
    cfg = load(make_project(tmp_path, tiny_llama_dir))
    run = tokenize(cfg)
    out = run.directory
    shards = json.loads((out / "shards.json").read_text())
    assert {(s["split"], s["task"]) for s in shards} == {(sp, t) for sp in ("train", "valid") for t in ("alpha", "beta")}
    table = open_shard(out / shards[0]["file"])
    assert table.schema.field("input_ids").type == pa.list_(pa.int32())
    assert table.schema.field("loss_mask").type == pa.list_(pa.uint8())
    assert table.schema.field("task_id").type == pa.int16()
    row = table.slice(0, 1).to_pylist()[0]
    assert row["length"] == len(row["input_ids"]) == len(row["loss_mask"]) <= 64
    assert row["source"].startswith(("alpha/d.jsonl:", "beta/d.jsonl:"))

    import datasets

    ds = datasets.Dataset.from_file(str(out / shards[0]["file"]))
    assert len(ds) == shards[0]["rows"] and ds[0]["input_ids"] == row["input_ids"]

    stats = json.loads((out / "stats.json").read_text())
    alpha = stats["tasks"]["alpha"]
    total = alpha["train"]["kept"] + alpha["train"]["truncated"] + alpha["train"]["dropped"]
    assert total == json.loads((run_stage(cfg, "ingest").directory / "tasks.json").read_text())[0]["train"]
    assert alpha["train"]["truncated"] > 0  # long questions do not fit 64 tokens
    assert sum(alpha["train"]["histogram"]["counts"]) == alpha["train"]["samples"]
    template = json.loads((out / "template.json").read_text())
    assert template["template"] == "mftcoder" and template["role_markers"]["user_marker"] == "<s>human\n"

    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(out / "tokenizer")
    prompt = saved.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<s>human\nhi\n<s>bot\n"


def test_drop_policy_counts_and_never_keeps_over_length(tmp_path, tiny_llama_dir):
    cfg = load(make_project(tmp_path, tiny_llama_dir, overlength="drop"))
    out = tokenize(cfg).directory
    stats = json.loads((out / "stats.json").read_text())
    assert stats["tasks"]["alpha"]["train"]["dropped"] > 0 and stats["tasks"]["alpha"]["train"]["truncated"] == 0
    for shard in json.loads((out / "shards.json").read_text()):
        assert max(open_shard(out / shard["file"]).column("length").to_pylist() or [0]) <= 64


def test_output_is_identical_whatever_the_number_of_workers(tmp_path, tiny_llama_dir):
    a = load(make_project(tmp_path / "a", tiny_llama_dir, shard_size_mb=0.002))
    b = load(make_project(tmp_path / "b", tiny_llama_dir, shard_size_mb=0.002, num_workers=2))
    out_a, out_b = tokenize(a).directory, tokenize(b).directory
    manifest = lambda d: json.loads((d / "manifest.json").read_text())["files"]
    assert len(manifest(out_a)) > 12  # several shards per task and split
    assert manifest(out_a) == manifest(out_b)
    assert out_a.name == out_b.name  # num_workers is not part of the key


def test_key_follows_settings_and_tokenizer_content(tmp_path, tiny_llama_dir):
    path = make_project(tmp_path, tiny_llama_dir)
    ingest_dir = run_stage(load(path), "ingest").directory
    base = compute_key(load(path), "tokenize", ingest_dir)
    assert compute_key(load(path, **{"tokenize.num_workers": 2}), "tokenize", ingest_dir) == base
    assert compute_key(load(path, **{"tokenize.seq_length": 128}), "tokenize", ingest_dir) != base
    assert compute_key(load(path, **{"tokenize.overlength": "drop"}), "tokenize", ingest_dir) != base


RESUMABLE_RUN = """
import sys
from mft_core.config import load_config
from mft_core.stages import run_stage
run_stage(load_config(sys.argv[1]), "tokenize")
"""


def test_a_killed_run_keeps_finished_shards_and_the_rerun_does_the_rest(tmp_path, tiny_llama_dir):
    path = make_project(tmp_path, tiny_llama_dir, n=300, shard_size_mb=0.002)
    cfg = load(path)
    run_stage(cfg, "ingest")
    partial = next((cfg.runs_root / "tokenize").glob("*.partial"), None) if (cfg.runs_root / "tokenize").exists() else None
    assert partial is None
    proc = subprocess.Popen([sys.executable, "-c", RESUMABLE_RUN, str(path)], cwd=REPO)
    deadline = time.time() + 120
    while time.time() < deadline:
        stats_files = list((cfg.runs_root / "tokenize").glob("*.partial/train/*.stats.json"))
        if len(stats_files) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = next((cfg.runs_root / "tokenize").glob("*.partial"))
    # a shard is finished once its stats file exists (written after the .arrow rename)
    finished = {p: p.stat().st_mtime_ns for p in partial.glob("*/*.arrow") if p.with_suffix(".stats.json").exists()}
    assert finished and not list((cfg.runs_root / "tokenize").glob("*/_SUCCESS"))

    resumed = run_stage(cfg, "tokenize")
    for shard, mtime in finished.items():
        assert (resumed.directory / shard.relative_to(partial)).stat().st_mtime_ns == mtime  # not redone
    fresh = load(make_project(tmp_path / "fresh", tiny_llama_dir, n=300, shard_size_mb=0.002))
    uninterrupted = tokenize(fresh).directory
    files = lambda d: json.loads((d / "manifest.json").read_text())["files"]
    assert files(resumed.directory) == files(uninterrupted)


# ----------------------------------------------------------------------------- concatenated packing


def windows_of(out: Path, task: str, split: str) -> list[dict]:
    shards = [s for s in json.loads((out / "shards.json").read_text()) if (s["task"], s["split"]) == (task, split)]
    return [row for s in shards for row in open_shard(out / s["file"]).to_pylist()]


def test_concatenated_windows_hold_exactly_the_records_token_stream(tmp_path, tiny_llama_dir):
    """Continued pretraining: every record of a task rendered as MFTCoder's pretrain mode (no
    role markers; a chat record's turns, a text record's text, each closed by EOS) and joined in
    order into one stream; windows of seq_length tokens, each starting at the previous one's last
    token, hold exactly that stream (records split across windows), every token trained."""
    path = make_project(tmp_path, tiny_llama_dir, packing="concatenated")
    cfg = load(path)
    out = tokenize(cfg).directory
    ingest_dir = run_stage(cfg, "ingest").directory
    tokenizer = load_tokenizer(tiny_llama_dir)
    pretrain = make_template("mftcoder", PRETRAIN_MARKERS)
    import pyarrow.parquet as pq

    for task in ("alpha", "beta"):
        for split in ("train", "valid"):
            records = pq.read_table(ingest_dir / "data" / task / f"{split}.parquet").to_pylist()
            stream = [t for r in records for t in render_record(r, tokenizer, pretrain).input_ids]
            windows = windows_of(out, task, split)
            assert all(len(w["input_ids"]) == 64 for w in windows[:-1]) and 2 <= len(windows[-1]["input_ids"]) <= 64
            joined = windows[0]["input_ids"] + [t for w in windows[1:] for t in w["input_ids"][1:]]
            assert joined == stream, f"{task}/{split}: the windows are not the record stream"
            assert all(w["loss_mask"] == [1] * len(w["input_ids"]) for w in windows)
            assert stream.count(tokenizer.eos_token_id) == len(records)  # one EOS closes each record
    text = tokenizer.decode(windows_of(out, "alpha", "train")[0]["input_ids"])
    assert "<s>human" not in text and "<s>bot" not in text and "question" in text
    stats = json.loads((out / "stats.json").read_text())
    assert stats["packing"] == "concatenated" and not (out / "documents").exists()
    assert stats["tasks"]["alpha"]["train"]["samples"] == len(windows_of(out, "alpha", "train"))
    template = json.loads((out / "template.json").read_text())
    assert template["packing"] == "concatenated" and template["role_markers"]["user_marker"] == ""


def test_concatenated_output_is_the_same_for_any_worker_count_and_after_a_kill(tmp_path, tiny_llama_dir):
    settings = dict(n=300, shard_size_mb=0.002, packing="concatenated")
    uninterrupted = tokenize(load(make_project(tmp_path / "one", tiny_llama_dir, **settings))).directory
    two = tokenize(load(make_project(tmp_path / "two", tiny_llama_dir, num_workers=2, **settings))).directory
    files = lambda d: json.loads((d / "manifest.json").read_text())["files"]
    assert len([f for f in files(uninterrupted) if f["path"].endswith(".arrow")]) > 4  # several window shards
    assert files(two) == files(uninterrupted)

    path = make_project(tmp_path / "killed", tiny_llama_dir, **settings)
    cfg = load(path)
    run_stage(cfg, "ingest")
    proc = subprocess.Popen([sys.executable, "-c", RESUMABLE_RUN, str(path)], cwd=REPO)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((cfg.runs_root / "tokenize").glob("*.partial/documents/*/*.stats.json"))) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list((cfg.runs_root / "tokenize").glob("*.partial/documents/*/*.stats.json"))
    assert not list((cfg.runs_root / "tokenize").glob("*/_SUCCESS")), "killed too late"
    assert files(run_stage(cfg, "tokenize").directory) == files(uninterrupted)


def test_concatenated_key_leaves_out_what_has_no_effect_there(tmp_path, tiny_llama_dir):
    path = make_project(tmp_path, tiny_llama_dir)
    ingest_dir = run_stage(load(path), "ingest").directory
    concatenated = compute_key(load(path, **{"tokenize.packing": "concatenated"}), "tokenize", ingest_dir)
    assert concatenated != compute_key(load(path), "tokenize", ingest_dir)
    for setting in ({"tokenize.overlength": "drop"}, {"tokenize.template": "chat_template"}):
        assert compute_key(load(path, **{"tokenize.packing": "concatenated", **setting}), "tokenize", ingest_dir) == concatenated
