"""Ingest's per-record work as Ray tasks on the cluster (config section `cluster:`).

Every plain JSON Lines file is cut into pieces of about ingest.piece_mb at line boundaries; each
piece is one job that reads its lines and runs `check_record` on each (parse, normalize,
fingerprint, decontaminate: the work that needs no other record) with the benchmark's n-gram
index, built once by the driver and shared through Ray's object store.
run_ingest takes the results in file-then-line order and does what depends on earlier records as
a local run does (dedup: the first occurrence wins; the split; the writing), so the output is the
same. A few pieces per worker run ahead of the one being consumed: memory stays bounded whatever
the input size. .jsonl.gz and Parquet files are read by run_ingest itself.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mft_core.config import PipelineConfig
from mft_core.data.ingest import _BOM, CheckedRecord, check_record, normalizer, task_files

AHEAD_PER_WORKER = 2  # pieces submitted per worker before the driver takes the oldest result


def line_pieces(path: Path, piece_bytes: int) -> list[tuple[int, int]]:
    """[start, stop) byte ranges covering the file, each but the last ending just after a newline."""
    size = path.stat().st_size
    pieces, start = [], 0
    with open(path, "rb") as fh:
        while start < size:
            if start + piece_bytes >= size:
                stop = size
            else:
                fh.seek(start + piece_bytes)
                fh.readline()  # to the end of the line the cut falls in
                stop = fh.tell()
            pieces.append((start, stop))
            start = stop
    return pieces


def check_piece(path: str, start: int, stop: int, normalize, decontaminator) -> list[tuple[bytes, Any]]:
    """Every line of the byte range as read_lines gives it (the BOM of the file's first line
    dropped, CR/LF stripped) with its check_record result (without the record itself): None for a
    blank line, or the exception check_record raised (run_ingest reports it with the line's place)."""
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
        if isinstance(checked, CheckedRecord) and checked.record is not None:
            # Sent back without the record: unpickling it costs the driver about what parsing the
            # line again does (run_ingest re-parses the records it keeps), and it is the bulk of the data.
            checked = checked._replace(record=None)
        results.append((line, checked))
    return results


class PieceChecks:
    """Checks the plain JSON Lines files of every task piece by piece in other processes, in the
    order run_ingest reads them (tasks, then their files), a few pieces per worker ahead of it
    across files; `lines(path)` gives one file's results."""

    def __init__(self, cfg: PipelineConfig, submit: Callable[[str, int, int, Any], Callable[[], list]], workers: int,
                 piece_bytes: int, where: str):
        self.plan = iter([(path, start, stop, normalizer(task)) for task in cfg.data.tasks
                          for path in task_files(task.path) if self.handles(path)
                          for start, stop in line_pieces(path, piece_bytes)])
        self.submit, self.ahead, self.where = submit, workers * AHEAD_PER_WORKER, where
        self.pending: collections.deque = collections.deque()  # (path, result getter), in plan order

    @staticmethod
    def handles(path: Path) -> bool:
        """Plain JSON Lines: the files that can be cut at byte offsets."""
        return path.name.endswith(".jsonl")

    def lines(self, path: Path) -> Iterator[tuple[int, bytes, Any]]:
        """(1-based line number, line, check_record result, exception, or None for a blank line)."""
        number = 0
        while True:
            for piece_path, start, stop, normalize in self.plan:  # keep `ahead` pieces in flight
                self.pending.append((piece_path, self.submit(os.fspath(piece_path), start, stop, normalize)))
                if len(self.pending) >= self.ahead:
                    break
            if not self.pending or self.pending[0][0] != path:
                return  # this file's pieces are all taken (or it is empty)
            for line, checked in self.pending.popleft()[1]():
                number += 1
                yield number, line, checked


def piece_checks(cfg: PipelineConfig, decontaminator) -> PieceChecks | None:
    """Ray tasks on the cluster of the `cluster:` section, else None (run_ingest checks every record)."""
    if cfg.cluster is None:
        return None
    from mft_core.cluster import connect

    cluster = cfg.cluster
    ray = connect(cluster)
    shared_index = ray.put(decontaminator)  # built once; every task reads the same copy
    remote = ray.remote(check_piece).options(num_cpus=cluster.cpus_per_task, max_retries=cluster.max_retries,
                                             scheduling_strategy="SPREAD")
    workers = max(1, int(ray.cluster_resources().get("CPU", 1) // cluster.cpus_per_task))

    def on_ray(path, start, stop, normalize):
        ref = remote.remote(path, start, stop, normalize, shared_index)
        return lambda: ray.get(ref)

    return PieceChecks(cfg, on_ray, workers, max(1, int(cfg.ingest.piece_mb * 1e6)),
                       f"Ray tasks on the cluster ({workers} at a time)")
