"""Content-addressed stage outputs: `runs/<stage>/<key16>/`.

A stage key hashes the stage name, a hand-bumped STAGE_VERSION, the canonical JSON of the stage's
config and the *content* of its inputs (the upstream `manifest.json`, or raw files by their bytes).
Paths alone never make a key: a changed file under the same path must change the key.

Publishing protocol (why a half-written directory is never read):
  1. the stage builds into `<key16>.partial/` (kept between runs, so resumable stages such as
     training can continue; others clear it first);
  2. `manifest.json` (files, sizes, sha256) and `_SUCCESS` are written into it;
  3. it is renamed to `<key16>/` in one atomic step.
A directory counts as finished only if it holds `_SUCCESS`. A `<key16>/` without it (a crash from
an older layout, or a hand edit) is removed before rebuilding. Two runs of the same key at once
serialize on `<key16>.lock` (fcntl): the second one finds the first one's output and reuses it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("mft.store")

SUCCESS = "_SUCCESS"
MANIFEST = "manifest.json"
CONFIG_COPY = "config.json"
KEY_PARTS = "key_parts.json"  # what the key hashed (stage, version, config, inputs): `mft status` compares them
KEY_LENGTH = 16
PREFECT_RESULTS = ".prefect-results"  # Prefect's result records of the stage tasks, named by the full key
_HASH_CACHE = ".file-hashes.json"


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class FileHashCache:
    """sha256 of raw input files, remembered by (size, mtime_ns) so that big inputs are read once."""

    def __init__(self, runs_root: Path):
        self.path = runs_root / _HASH_CACHE
        try:
            self.entries: dict[str, list] = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            self.entries = {}
        self.dirty = False

    def digest(self, path: Path) -> str:
        st = path.stat()
        key = str(path.resolve())
        hit = self.entries.get(key)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return hit[2]
        digest = sha256_file(path)
        self.entries[key] = [st.st_size, st.st_mtime_ns, digest]
        self.dirty = True
        return digest

    def save(self) -> None:
        if not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.entries))
        os.replace(tmp, self.path)
        self.dirty = False


# How long a machine of rank > 0 of a multi-machine run waits for machine 0, the only one that
# builds and publishes (machine 0 may still be tokenizing a large data set): $MFT_MACHINE_WAIT_S.
MACHINE_WAIT_S = float(os.environ.get("MFT_MACHINE_WAIT_S", 3600))


def wait_until(condition: Callable[[], bool], timeout_message: str) -> None:
    """Poll `condition` until it holds; TimeoutError(timeout_message) after MACHINE_WAIT_S."""
    deadline = time.monotonic() + MACHINE_WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(timeout_message)
        time.sleep(0.5)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` so that a reader (another process, another machine) sees the old file or the
    new one, never a part: a temporary file beside it, then a rename."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def stage_key(stage: str, version: int, config: Any, inputs: Iterable[str]) -> str:
    """The full sha256 hex key; its first KEY_LENGTH characters name the output directory."""
    h = hashlib.sha256()
    for part in (stage, str(version), canonical_json(config), *inputs):
        h.update(part.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def stage_dir(runs_root: Path, stage: str, key: str) -> Path:
    return runs_root / stage / key[:KEY_LENGTH]


def is_complete(directory: Path) -> bool:
    return (directory / SUCCESS).is_file()


def manifest_digest(directory: Path, context_files: Iterable[str] = ()) -> str:
    """What a downstream key hashes: the upstream manifest (its key, file names, sizes, sha256),
    without the `context_files` (fnmatch patterns): what describes how the run went (timings,
    logs, plots of them) rather than what it produced, so that a forced rebuild with the same
    results leaves every downstream key as it was."""
    manifest = json.loads((directory / MANIFEST).read_text())
    patterns = tuple(context_files)
    manifest["files"] = [entry for entry in manifest["files"]
                         if not any(fnmatch.fnmatch(entry["path"], pattern) for pattern in patterns)]
    return hashlib.sha256(canonical_json(manifest).encode()).hexdigest()


def write_manifest(directory: Path, stage: str, key: str) -> dict:
    files = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel in (MANIFEST, SUCCESS, CONFIG_COPY, KEY_PARTS):
            # config.json holds machine-specific absolute paths; its content is in the key already,
            # and leaving it out keeps downstream keys independent of the checkout's location.
            # key_parts.json is the key itself, spelled out: it adds nothing a downstream key needs.
            continue
        files.append({"path": rel, "size": path.stat().st_size, "sha256": sha256_file(path)})
    manifest = {"stage": stage, "key": key, "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


@contextlib.contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock (fcntl.flock) held for the block; says so when it must wait."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for %s (another process holds it)", lock_path)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def lock_held(lock_path: Path) -> bool:
    """Whether another process holds `lock_path` (exclusive_lock) right now."""
    try:
        fh = open(lock_path)
    except FileNotFoundError:
        return False
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


@contextlib.contextmanager
def lock_or_skip(lock_path: Path) -> Iterator[bool]:
    """exclusive_lock without waiting: yields False (and holds nothing) when another process has it."""
    with open(lock_path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class StageRun:
    """What `build_stage` did: where the output is and whether it was (re)computed."""

    directory: Path
    key: str
    computed: bool


def build_stage(
    runs_root: Path,
    stage: str,
    key: str,
    build: Callable[[Path], Any],
    *,
    config_copy: Any = None,
    key_parts: dict[str, Any] | None = None,
    force: bool = False,
    resumable: bool = False,
) -> StageRun:
    """Return the finished output of `stage` for `key`, building it with `build(work_dir)` if needed.

    `resumable`: keep what an interrupted earlier build left in the work directory (the stage
    itself must know how to continue from it); otherwise start from an empty directory.
    `key_parts`: the arguments of `stage_key` that gave `key`, written beside the output.
    """
    final = stage_dir(runs_root, stage, key)
    with exclusive_lock(final.with_name(final.name + ".lock")):
        if is_complete(final) and not force:
            return StageRun(final, key, computed=False)
        work = final.with_name(final.name + ".partial")
        if work.exists() and (force or not resumable):
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        build(work)
        if config_copy is not None:
            (work / CONFIG_COPY).write_text(json.dumps(config_copy, indent=1, default=str) + "\n")
        if key_parts is not None:
            (work / KEY_PARTS).write_text(json.dumps(key_parts, indent=1, default=str) + "\n")
        write_manifest(work, stage, key)
        (work / SUCCESS).write_text(time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n")
        _fsync_dir(work)
        if final.exists():  # forced rebuild, or a leftover without _SUCCESS
            stale = final.with_name(f"{final.name}.stale-{os.getpid()}")
            os.rename(final, stale)
            os.rename(work, final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.rename(work, final)
        _fsync_dir(final.parent)
        return StageRun(final, key, computed=True)
