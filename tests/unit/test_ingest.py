"""The ingest stage on real files: formats, rejects, dedup, decontamination, the split."""

import gzip
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mft_core.config import ConfigError, config_from_dict
from mft_core.data.ingest import IngestError, read_tasks, run_ingest
from mft_core.stages import run_stage

HUMANEVAL_X = Path(__file__).resolve().parents[3] / "shared" / "humaneval-x"


def chat(q, a):
    return {"chat_rounds": [{"role": "human", "content": q}, {"role": "bot", "content": a}]}


def write_jsonl(path: Path, records, gz=False, raw_lines=()):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r) + "\n" for r in records).encode() + b"".join(raw_lines)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def make_cfg(tmp_path, tasks, top=None, **ingest):
    ingest.setdefault("decontaminate", {"enabled": False})
    raw = {"runs_root": "runs", "data": {"tasks": tasks}, "ingest": ingest, **(top or {})}
    return config_from_dict(raw, tmp_path)


def rows(out: Path, task: str, split: str):
    return pq.read_table(out / "data" / task / f"{split}.parquet").to_pylist()


def ingest(tmp_path, cfg):
    out = tmp_path / "out"
    out.mkdir(parents=True, exist_ok=True)
    return run_ingest(cfg, out), out


def test_directory_task_reads_jsonl_and_gz_sorted_with_bom_crlf_and_blank_lines(tmp_path):
    write_jsonl(tmp_path / "t/b.jsonl.gz", [chat(f"gz{i}", "a") for i in range(10)], gz=True)
    (tmp_path / "t/a.jsonl").write_bytes(
        b"\xef\xbb\xbf" + json.dumps(chat("first", "a")).encode() + b"\r\n\r\n   \n" + json.dumps({"text": "t"}).encode() + b"\r\n"
    )
    (tmp_path / "t/notes.txt").write_text("ignored: not jsonl")
    cfg = make_cfg(tmp_path, [{"path": "t"}], min_valid=0, valid_fraction=0.0)
    stats, out = ingest(tmp_path, cfg)
    task = stats["tasks"]["t"]
    assert (task["files"], task["lines"], task["blank_lines"], task["kept"]) == (2, 14, 2, 12)
    train = rows(out, "t", "train")
    assert [r["source"] for r in train[:3]] == ["t/a.jsonl:1", "t/a.jsonl:4", "t/b.jsonl.gz:1"]
    assert train[0]["messages"] == [{"role": "user", "content": "first"}, {"role": "assistant", "content": "a"}]
    assert train[1]["text"] == "t" and train[1]["messages"] == []
    assert read_tasks(out) == [
        {"name": "t", "id": 0, "path": "t", "files": ["t/a.jsonl", "t/b.jsonl.gz"], "train": 12, "valid": 0}
    ]


def test_single_file_task_name_defaults_to_its_stem(tmp_path):
    write_jsonl(tmp_path / "code-gen.jsonl", [{"prompt": f"p{i}", "answer": "a"} for i in range(5)])
    cfg = make_cfg(tmp_path, [{"path": "code-gen.jsonl"}], min_valid=1)
    stats, out = ingest(tmp_path, cfg)
    assert list(stats["tasks"]) == ["code-gen"]
    assert stats["tasks"]["code-gen"]["valid"] >= 1


def test_on_error_fail_names_file_line_reason_and_fix(tmp_path):
    write_jsonl(tmp_path / "t/x.jsonl", [chat("q", "a")], raw_lines=[b'{"prompt": "p"}\n'])
    cfg = make_cfg(tmp_path, [{"path": "t"}], min_valid=0)
    with pytest.raises(IngestError) as info:
        ingest(tmp_path, cfg)
    message = str(info.value)
    assert f"{tmp_path / 't/x.jsonl'}:2" in message
    assert "unknown_shape" in message and "Fix:" in message and "on_error=skip" in message


def test_on_error_skip_counts_rejects_per_reason_and_lists_them(tmp_path):
    good = [chat(f"q{i}", "a") for i in range(200)]
    bad = [b'{"prompt": "p"}\n', b"not json\n", b'{"text": "\xff"}\n']
    write_jsonl(tmp_path / "t/x.jsonl", good, raw_lines=bad)
    cfg = make_cfg(tmp_path, [{"path": "t"}], on_error="skip", max_reject_fraction=0.05)
    stats, out = ingest(tmp_path, cfg)
    task = stats["tasks"]["t"]
    assert task["rejected_by_reason"] == {"bad_json": 1, "invalid_utf8": 1, "unknown_shape": 1}
    assert task["kept"] == 200
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [r["source"] for r in rejects] == ["t/x.jsonl:201", "t/x.jsonl:202", "t/x.jsonl:203"]
    assert all(r["kind"] == "invalid" and r["excerpt"] for r in rejects)


def test_too_many_rejects_fail_even_with_skip(tmp_path):
    write_jsonl(tmp_path / "t/x.jsonl", [chat(f"q{i}", "a") for i in range(20)], raw_lines=[b"nope\n"] * 5)
    cfg = make_cfg(tmp_path, [{"path": "t"}], on_error="skip", max_reject_fraction=0.1, min_valid=0)
    with pytest.raises(IngestError, match=r"(?s)5 of 25 records .* t/x.jsonl:21: bad_json"):
        ingest(tmp_path, cfg)


def test_exact_dedup_within_and_across_tasks_first_wins(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [chat("same", "x"), chat("same", "x"), chat("other", "y")])
    # the same content in another shape (prompt/answer) is the same canonical record
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "same", "answer": "x"}, chat("b-only", "z")])
    cfg = make_cfg(tmp_path, [{"path": "a.jsonl"}, {"path": "b.jsonl"}], min_valid=0)
    stats, out = ingest(tmp_path, cfg)
    assert stats["tasks"]["a"]["duplicates"] == 1 and stats["tasks"]["a"]["kept"] == 2
    assert stats["tasks"]["b"]["duplicates"] == 1 and stats["tasks"]["b"]["kept"] == 1
    filtered = [json.loads(l) for l in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["source"], r["reason"]) for r in filtered] == [("a.jsonl:2", "duplicate"), ("b.jsonl:1", "duplicate")]
    no_dedup = make_cfg(tmp_path, [{"path": "a.jsonl"}, {"path": "b.jsonl"}], min_valid=0, dedup=False)
    stats, _ = ingest(tmp_path / "second", no_dedup)
    assert stats["totals"]["duplicates"] == 0 and stats["totals"]["train"] + stats["totals"]["valid"] == 5


@pytest.mark.skipif(not HUMANEVAL_X.is_dir(), reason="HumanEval-X data not found beside the project")
def test_decontamination_removes_a_humaneval_prompt(tmp_path):
    first = json.loads(gzip.open(HUMANEVAL_X / "python/humaneval_python.jsonl.gz").readline())
    clean = [chat(f"Write a function number {i} that adds two numbers", f"def add{i}(a, b):\n    return a + b") for i in range(30)]
    leaked = chat("Complete this:\n" + first["prompt"], first["canonical_solution"])
    write_jsonl(tmp_path / "t.jsonl", clean + [leaked])
    top = {"humaneval_dir": str(HUMANEVAL_X)}
    cfg = make_cfg(tmp_path, [{"path": "t.jsonl"}], top=top, decontaminate={"enabled": True, "ngram": 13})
    stats, out = ingest(tmp_path, cfg)
    assert stats["decontamination"] == "on"
    assert stats["tasks"]["t"]["contaminated"] == 1 and stats["tasks"]["t"]["kept"] == 30
    reject = json.loads((out / "rejects.jsonl").read_text())
    assert reject["source"] == "t.jsonl:31" and "Python/0" in reject["detail"]


def test_split_is_deterministic_and_stable_when_records_are_added(tmp_path):
    base = [chat(f"question {i}", f"answer {i}") for i in range(400)]
    write_jsonl(tmp_path / "v1/t.jsonl", base)
    write_jsonl(tmp_path / "v2/t.jsonl", base + [chat(f"new {i}", "n") for i in range(200)])
    settings = dict(valid_fraction=0.1, min_valid=0)

    def valid_hashes(sub):
        cfg = make_cfg(tmp_path, [{"path": f"{sub}/t.jsonl"}], **settings)
        _, out = ingest(tmp_path / sub, cfg)
        return {r["record_hash"] for r in rows(out, "t", "valid")}, {r["record_hash"] for r in rows(out, "t", "train")}

    valid1, train1 = valid_hashes("v1")
    assert valid_hashes("v1") == (valid1, train1)  # deterministic
    assert 20 <= len(valid1) <= 65  # ~10% of 400
    valid2, train2 = valid_hashes("v2")
    assert valid1 <= valid2 and train1 <= train2  # old records stay on their side


def test_min_valid_tops_up_small_tasks_and_too_small_tasks_fail(tmp_path):
    write_jsonl(tmp_path / "small.jsonl", [chat(f"q{i}", "a") for i in range(12)])
    cfg = make_cfg(tmp_path, [{"path": "small.jsonl"}], valid_fraction=0.0, min_valid=5)
    stats, out = ingest(tmp_path, cfg)
    assert (stats["tasks"]["small"]["valid"], stats["tasks"]["small"]["train"]) == (5, 7)
    write_jsonl(tmp_path / "tiny.jsonl", [chat(f"q{i}", "a") for i in range(3)])
    cfg = make_cfg(tmp_path, [{"path": "tiny.jsonl"}], min_valid=5)
    with pytest.raises(IngestError, match="task 'tiny'.*only 3 usable records.*ingest.min_valid"):
        ingest(tmp_path / "x", cfg)


def test_missing_task_path_and_empty_directory_are_clear_errors(tmp_path):
    cfg = make_cfg(tmp_path, [{"path": "nowhere"}])
    with pytest.raises(IngestError, match="does not exist"):
        ingest(tmp_path, cfg)
    (tmp_path / "empty").mkdir()
    cfg = make_cfg(tmp_path, [{"path": "empty"}])
    with pytest.raises(IngestError, match="no \\*.jsonl"):
        ingest(tmp_path, cfg)


def test_two_tasks_with_the_same_name_are_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"data.tasks\[0\] and data.tasks\[1\] are both named 'code'"):
        make_cfg(tmp_path, [{"path": "x/code"}, {"path": "y/code"}])


def test_changed_raw_file_changes_the_key_and_recomputes(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", [chat(f"q{i}", "a") for i in range(20)])
    cfg = make_cfg(tmp_path, [{"path": "t.jsonl"}], min_valid=2)
    first = run_stage(cfg, "ingest")
    again = run_stage(cfg, "ingest")
    assert first.computed and not again.computed and again.directory == first.directory
    write_jsonl(tmp_path / "t.jsonl", [chat(f"q{i}", "b") for i in range(20)])  # same path, new content
    changed = run_stage(cfg, "ingest")
    assert changed.computed and changed.directory != first.directory
    forced = run_stage(cfg, "ingest", force=True)
    assert forced.computed and forced.directory == changed.directory


def test_mft_ingest_runs_the_stage_without_prefect_and_reports_errors(tmp_path):
    import subprocess
    import sys

    write_jsonl(tmp_path / "t.jsonl", [chat(f"q{i}", "a") for i in range(20)])
    (tmp_path / "p.yaml").write_text("data:\n  tasks: [{path: t.jsonl}]\ningest: {decontaminate: {enabled: false}, min_valid: 2}\n")
    cmd = [sys.executable, "-m", "mft_core.cli", "ingest", "--config", str(tmp_path / "p.yaml")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "ingest (" in done.stdout and "(all)" in done.stdout
    assert len(list((tmp_path / "runs" / "ingest").glob("*/_SUCCESS"))) == 1
    (tmp_path / "t.jsonl").write_text('{"prompt": "only a prompt"}\n')
    failed = subprocess.run(cmd, capture_output=True, text=True)
    assert failed.returncode == 1
    assert f"{tmp_path / 't.jsonl'}:1: invalid record (unknown_shape)" in failed.stderr
