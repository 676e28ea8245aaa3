"""The content-addressed store: keys, atomic publish, crash safety, concurrent builders."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from mft_core import store


def test_key_depends_on_stage_version_config_and_inputs():
    base = store.stage_key("ingest", 1, {"a": 1, "b": 2}, ["x:1"])
    assert base == store.stage_key("ingest", 1, {"b": 2, "a": 1}, ["x:1"])  # canonical JSON
    others = [
        store.stage_key("tokenize", 1, {"a": 1, "b": 2}, ["x:1"]),
        store.stage_key("ingest", 2, {"a": 1, "b": 2}, ["x:1"]),
        store.stage_key("ingest", 1, {"a": 1, "b": 3}, ["x:1"]),
        store.stage_key("ingest", 1, {"a": 1, "b": 2}, ["x:2"]),
    ]
    assert len({base, *others}) == 5


def test_file_hash_cache_follows_content_not_path(tmp_path):
    f = tmp_path / "raw.jsonl"
    f.write_text("one\n")
    cache = store.FileHashCache(tmp_path / "runs")
    first = cache.digest(f)
    cache.save()
    f.write_text("two\n")
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 1_000_000))
    assert store.FileHashCache(tmp_path / "runs").digest(f) != first


def test_build_publishes_manifest_and_success_and_reuses(tmp_path):
    calls = []

    def build(work: Path):
        calls.append(work)
        (work / "data.txt").write_text("hello")
        (work / "sub").mkdir()
        (work / "sub" / "x.bin").write_bytes(b"\0" * 10)

    run = store.build_stage(tmp_path, "ingest", "ab" * 32, build, config_copy={"k": 1})
    assert run.computed and store.is_complete(run.directory)
    manifest = json.loads((run.directory / "manifest.json").read_text())
    assert [f["path"] for f in manifest["files"]] == ["data.txt", "sub/x.bin"]
    assert manifest["files"][0]["sha256"] == store.sha256_file(run.directory / "data.txt")
    assert json.loads((run.directory / "config.json").read_text()) == {"k": 1}
    again = store.build_stage(tmp_path, "ingest", "ab" * 32, build)
    assert not again.computed and len(calls) == 1
    assert not (tmp_path / "ingest" / f"{'ab' * 8}.partial").exists()


def test_failed_build_leaves_nothing_that_looks_finished(tmp_path):
    def build(work: Path):
        (work / "half.txt").write_text("half")
        raise RuntimeError("boom")

    try:
        store.build_stage(tmp_path, "ingest", "cd" * 32, build)
    except RuntimeError:
        pass
    final = store.stage_dir(tmp_path, "ingest", "cd" * 32)
    assert not final.exists() and not store.is_complete(final)


SLOW_BUILDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from mft_core import store
    def build(work):
        (work / "part-1").write_text("x")
        Path(sys.argv[2]).write_text("started")
        time.sleep(60)
    store.build_stage(Path(sys.argv[1]), "ingest", "ef" * 32, build)
    """
)


def test_killed_mid_write_leaves_no_success_and_the_next_run_recomputes(tmp_path):
    marker = tmp_path / "started"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_BUILDER, str(tmp_path), str(marker)])
    deadline = time.time() + 30
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    final = store.stage_dir(tmp_path, "ingest", "ef" * 32)
    assert not store.is_complete(final) and not final.exists()
    run = store.build_stage(tmp_path, "ingest", "ef" * 32, lambda work: (work / "fresh").write_text("y"))
    assert run.computed and sorted(p.name for p in run.directory.iterdir()) == ["_SUCCESS", "fresh", "manifest.json"]


def _count_build(root: str, log: str) -> None:
    def build(work: Path):
        with open(log, "a") as fh:
            fh.write("built\n")
        time.sleep(0.5)
        (work / "out").write_text("x")

    store.build_stage(Path(root), "ingest", "12" * 32, build)


def test_two_runs_of_the_same_key_at_once_build_once(tmp_path):
    log = tmp_path / "builds.log"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_count_build, args=(str(tmp_path), str(log))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0]
    assert log.read_text() == "built\n"
    assert store.is_complete(store.stage_dir(tmp_path, "ingest", "12" * 32))


def test_force_replaces_a_finished_output(tmp_path):
    store.build_stage(tmp_path, "s", "34" * 32, lambda w: (w / "v").write_text("1"))
    run = store.build_stage(tmp_path, "s", "34" * 32, lambda w: (w / "v").write_text("2"), force=True)
    assert run.computed and (run.directory / "v").read_text() == "2"
    assert sorted(p.name for p in (tmp_path / "s").iterdir() if not p.name.endswith(".lock")) == ["34" * 8]
