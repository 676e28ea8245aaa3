"""Ingest's per-record work on the Ray cluster (config section `cluster:`).

Every plain JSON Lines file is cut into pieces of about cluster.ingest_piece_mb at line
boundaries; each piece is one Ray task that reads its lines and runs `check_record` on each
(parse, normalize, fingerprint, decontaminate: the work that needs no other record) with the
benchmark's n-gram index, built once on the driver and shared through Ray's object store.
run_ingest then takes the pieces' results in file-then-line order and does what depends on
earlier records as a local run does (dedup: the first occurrence wins; the split; the writing),
so the output is the local run's. .jsonl.gz and Parquet files are read by the driver.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mft_core.config import PipelineConfig
from mft_core.data.ingest import _BOM, check_record, task_files
from mft_core.data.records import normalize_preference, normalize_record


def line_pieces(path: Path, piece_bytes: int) -> list[tuple[int, int]]:
    """[start, stop) byte ranges covering the file, each but the last ending just after a newline."""
    size = path.stat().st_size
    pieces, start = [], 0
    with open(path, "rb") as fh:
        while start < size:
            fh.seek(min(size, start + piece_bytes))
            fh.readline()  # to the end of the line the cut falls in
            stop = min(size, fh.tell()) if start + piece_bytes < size else size
            pieces.append((start, stop))
            start = stop
    return pieces


def check_piece(path: str, start: int, stop: int, normalize, decontaminator) -> list[tuple[bytes, Any]]:
    """A Ray task: every line of the byte range, as read_lines gives it (the BOM of the file's first
    line dropped, CR/LF stripped), with its check_record result, or the exception check_record
    raised (run_ingest reports it with the line's place)."""
    with open(path, "rb") as fh:
        fh.seek(start)
        data = fh.read(stop - start)
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline ending the piece ends its last line
    if start == 0 and lines and lines[0].startswith(_BOM):
        lines[0] = lines[0][len(_BOM):]
    results = []
    for raw in lines:
        line = raw.rstrip(b"\r\n")
        try:
            checked = check_record(line, normalize, decontaminator) if line.strip() else None
        except Exception as error:  # noqa: BLE001 - located and raised by run_ingest
            checked = error
        results.append((line, checked))
    return results


def submit_checks(cfg: PipelineConfig, decontaminator) -> dict[Path, list]:
    """The pieces of every plain JSON Lines file of every task as Ray tasks, submitted now: the
    object refs of their results, per file, in order."""
    from mft_core.cluster import connect

    cluster = cfg.cluster
    ray = connect(cluster)
    shared_index = ray.put(decontaminator)  # built once; every task reads the same copy
    remote = ray.remote(check_piece).options(num_cpus=cluster.cpus_per_task, max_retries=cluster.max_retries,
                                             scheduling_strategy="SPREAD")
    piece_bytes = max(1, int(cluster.ingest_piece_mb * 1e6))
    refs: dict[Path, list] = {}
    for task in cfg.data.tasks:
        normalize = normalize_preference if task.kind == "preference" else normalize_record
        for path in task_files(task.path):
            if path.name.endswith(".jsonl"):
                refs[path] = [remote.remote(os.fspath(path), start, stop, normalize, shared_index)
                              for start, stop in line_pieces(path, piece_bytes)]
    return refs


def checked_lines(refs: list) -> Iterator[tuple[int, bytes, Any]]:
    """(1-based line number, line, check_record result or exception or None for a blank line) of
    one file, from its pieces' results in order."""
    import ray

    number = 0
    for ref in refs:
        for line, checked in ray.get(ref):
            number += 1
            yield number, line, checked
