"""Ingest's per-record work in other processes: helper processes on this machine, or Ray tasks on
the cluster of the `cluster:` section.

Every plain JSON Lines file is cut into pieces at line boundaries; each piece's lines are checked
(mft_core/data/record_checks.py: parse, normalize, fingerprint, decontaminate, the work that needs
no other record). run_ingest takes the results in file-then-line order and does what depends on
earlier records as a one-process run does (dedup: the first occurrence wins; the split; the
writing), so the output is the same. .jsonl.gz and Parquet files are read by run_ingest itself.

- On this machine (`ingest.num_workers`): helper processes go through the plan from the front,
  each checking the pieces it claims first, while run_ingest goes on with the rest of its work;
  when run_ingest reaches a piece nobody has claimed it checks that piece itself, and while it
  waits for a helper's piece it checks one further ahead. So the processes share the work whatever
  their speeds, a helper that starts late only does less, and one that dies costs speed, not
  output: run_ingest checks the rest itself.
- On a cluster: each piece is a Ray task (ingest.piece_mb), a few per worker ahead of the one
  being consumed; the benchmark's n-gram index is built once and shared through the object store.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from mft_core.config import PipelineConfig
from mft_core.data.ingest import normalizer, task_files
from mft_core.data.record_checks import check_lines, check_piece, claim, line_pieces, piece_lines, receive_message

log = logging.getLogger("mft.ingest")

AHEAD_PER_WORKER = 2  # Ray: pieces submitted per worker before the driver takes the oldest result
LOCAL_PIECE_BYTES = 256 * 1024  # on this machine: about 10 ms of checking, so the processes share evenly
# With ingest.num_workers unset, helpers start only for this much JSON Lines: a helper takes about
# 60 ms to start and be sent the benchmark index, in which this process checks about 1 MB itself.
AUTO_MIN_BYTES = 2 * 1024 * 1024
PIPE_BYTES = 1 << 20  # Linux's limit for an unprivileged process (/proc/sys/fs/pipe-max-size)
MAX_AUTO_WORKERS = 2  # run_ingest's own share (re-parsing the kept records, dedup, Parquet) is then the limit

Piece = tuple[Path, int, int, Any]  # (file, start byte, stop byte, the task's normalize function)


def handles(path: Path) -> bool:
    """Plain JSON Lines: the files that can be cut at byte offsets."""
    return path.name.endswith(".jsonl")


def piece_plan(cfg: PipelineConfig, piece_bytes: int) -> list[Piece]:
    """The pieces of every task's plain JSON Lines files, in the order run_ingest reads them."""
    return [(path, start, stop, normalizer(task)) for task in cfg.data.tasks for path in task_files(task.path)
            if handles(path) for start, stop in line_pieces(path, piece_bytes)]


class PieceChecks:
    """The pieces' results in the order run_ingest reads the files; `lines(path)` gives one file's.
    `share(decontaminator)` hands the benchmark index to the processes that check (it is built
    while they start). `submit(index, piece)` starts piece `index` of the plan and returns a
    function that waits for its [(line, check_lines result)]; it is called in plan order, `ahead`
    pieces before their results are taken. `close()` stops what still runs."""

    def __init__(self, plan: list[Piece], share: Callable[[Any], None], submit: Callable[[int, Piece], Callable[[], list]],
                 ahead: int, where: str, close: Callable[[], None] = lambda: None):
        self.plan = iter(enumerate(plan))
        self.share, self.submit, self.ahead, self.where, self.close = share, submit, ahead, where, close
        self.pending: collections.deque = collections.deque()  # (path, result getter), in plan order
        self.file_order = {path: number for number, path in enumerate(dict.fromkeys(path for path, *_ in plan))}

    handles = staticmethod(handles)

    def lines(self, path: Path) -> Iterator[tuple[int, bytes, Any]]:
        """(1-based line number, line, check_record result, exception, or None for a blank line)."""
        if path not in self.file_order:
            return  # an empty file: no piece
        number = 0
        while True:
            for index, piece in self.plan:  # keep `ahead` pieces in flight
                self.pending.append((piece[0], self.submit(index, piece)))
                if len(self.pending) >= self.ahead:
                    break
            if self.pending and self.file_order[self.pending[0][0]] < self.file_order[path]:
                # run_ingest stopped reading that file (one JSON array: its first line says so)
                self.pending.popleft()
                continue
            if not self.pending or self.pending[0][0] != path:
                return  # this file's pieces are all taken (or it is empty)
            for line, checked in self.pending.popleft()[1]():
                number += 1
                yield number, line, checked


class LocalHelpers:
    """Helper processes on this machine checking the pieces they claim first (record_checks.serve);
    `result(index)` is piece `index`'s [(line, result)], checked here when no helper has it."""

    OWN_AHEAD = 2  # pieces this process checks ahead of its position while it waits for a helper

    def __init__(self, plan: list[Piece], workers: int):
        self.plan, self.decontaminator = plan, None
        self.claims = tempfile.mkdtemp(prefix="mft-ingest-claims-")
        self.done: dict[int, tuple[bool, list]] = {}  # index -> (checked here, results)
        self.scan_from = 0  # pieces before it are claimed
        self.helpers: dict[int, subprocess.Popen] = {}  # the read end of its results pipe -> helper
        self.pieces_here = 0
        for _ in range(workers):
            read, write = os.pipe()
            # Room for a few pieces' results (about 200 kB each): a helper would otherwise wait,
            # its result unsent, until this process is done with the piece it checks itself.
            with contextlib.suppress(OSError):
                fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
            process = subprocess.Popen([sys.executable, "-S", "-m", "mft_core.data.record_checks", self.claims, str(write)],
                                       stdin=subprocess.PIPE, pass_fds=(write,), env=_helper_environment())
            os.close(write)
            self.helpers[read] = process

    def share(self, decontaminator) -> None:
        """Send the plan and the benchmark index to the helpers, from a thread: the pipe takes them
        only as fast as a helper that is still starting reads."""
        self.decontaminator = decontaminator
        setup = pickle.dumps(([(os.fspath(path), *rest) for path, *rest in self.plan], decontaminator))

        def send(stdin) -> None:
            with contextlib.suppress(OSError):  # a helper that died: _receive sees it
                stdin.write(setup)
                stdin.close()

        for process in self.helpers.values():
            threading.Thread(target=send, args=(process.stdin,), daemon=True).start()

    def result(self, index: int) -> list[tuple[bytes, Any]]:
        path, start, stop, normalize = self.plan[index]
        while index not in self.done:
            if claim(self.claims, index) or not self.helpers:
                self._check_here(index)  # nobody had it, or no helper is left to send it
            elif wait(list(self.helpers), timeout=0):
                self._receive()
            elif not self._check_ahead(index):  # a helper has it: check a later piece meanwhile
                self._receive()  # nothing left to check here: wait for the helpers
        here, results = self.done.pop(index)
        if here:
            return results
        return list(zip(piece_lines(path, start, stop), results))

    def _check_here(self, index: int) -> None:
        path, start, stop, normalize = self.plan[index]
        lines = piece_lines(path, start, stop)
        self.done[index] = (True, list(zip(lines, check_lines(lines, normalize, self.decontaminator, keep_records=True))))
        self.pieces_here += 1

    def _check_ahead(self, index: int) -> bool:
        """Check the first unclaimed piece after `index` here, if a few are not already waiting."""
        if sum(here for here, _ in self.done.values()) >= self.OWN_AHEAD:
            return False
        for ahead in range(max(index + 1, self.scan_from), len(self.plan)):
            self.scan_from = ahead + 1
            if claim(self.claims, ahead):
                self._check_here(ahead)
                return True
        return False

    def _receive(self) -> None:
        for fd in wait(list(self.helpers)):
            try:
                index, results = receive_message(fd)
            except EOFError:  # the helper has ended: after its last piece, or it failed
                code = self.helpers.pop(fd).wait()
                os.close(fd)
                if code != 0:
                    log.warning("ingest: a helper process failed (exit code %s); the pieces it had claimed are "
                                "checked here", code)
                    self._stop_all()
                return
            self.done[index] = (False, results)

    def _stop_all(self) -> None:
        """Helpers that lost one of their own: the rest is checked here (a piece a live helper had
        claimed would otherwise be waited for: claims do not say whose they are)."""
        for fd, process in self.helpers.items():
            process.kill()
            process.wait()
            os.close(fd)
        self.helpers.clear()

    def close(self) -> None:
        log.info("ingest: %d of %d JSON Lines pieces checked by the helper processes",
                 len(self.plan) - self.pieces_here, len(self.plan))
        self._stop_all()
        shutil.rmtree(self.claims, ignore_errors=True)


def _helper_environment() -> dict[str, str]:
    """The helpers start without site (python -S: a quarter of their start-up time goes to importing
    it), so the folder holding mft_core is put on their path; they import nothing else."""
    import mft_core

    root = str(Path(mft_core.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}


def local_workers(cfg: PipelineConfig, plan: list[Piece]) -> int:
    """Helper processes for this run: ingest.num_workers, or by default one per further usable core
    (at most MAX_AUTO_WORKERS) for at least AUTO_MIN_BYTES of JSON Lines."""
    if cfg.ingest.num_workers is not None:
        return cfg.ingest.num_workers
    if sum(stop - start for _, start, stop, _ in plan) < AUTO_MIN_BYTES:
        return 0
    return min(MAX_AUTO_WORKERS, len(os.sched_getaffinity(0)) - 1)


def piece_checks(cfg: PipelineConfig) -> PieceChecks | None:
    """Ray tasks on the cluster of the `cluster:` section, else helper processes on this machine
    (started now), or None (run_ingest checks every record in one pass)."""
    if cfg.cluster is not None:
        return _on_ray(cfg)
    plan = piece_plan(cfg, LOCAL_PIECE_BYTES)
    workers = local_workers(cfg, plan)
    if workers == 0 or not plan:
        return None
    helpers = LocalHelpers(plan, workers)
    return PieceChecks(plan, helpers.share, lambda index, piece: lambda: helpers.result(index), 1,
                       f"{workers} helper process(es) beside this one", close=helpers.close)


def _on_ray(cfg: PipelineConfig) -> PieceChecks:
    from mft_core.cluster import connect

    cluster = cfg.cluster
    ray = connect(cluster)
    remote = ray.remote(check_piece).options(num_cpus=cluster.cpus_per_task, max_retries=cluster.max_retries,
                                             scheduling_strategy="SPREAD")
    workers = max(1, int(ray.cluster_resources().get("CPU", 1) // cluster.cpus_per_task))
    shared = {}

    def share(decontaminator) -> None:
        shared["index"] = ray.put(decontaminator)  # built once; every task reads the same copy

    def on_ray(index, piece):
        path, start, stop, normalize = piece
        ref = remote.remote(os.fspath(path), start, stop, normalize, shared["index"])
        return lambda: ray.get(ref)

    plan = piece_plan(cfg, max(1, int(cfg.ingest.piece_mb * 1e6)))
    return PieceChecks(plan, share, on_ray, workers * AHEAD_PER_WORKER, f"Ray tasks on the cluster ({workers} at a time)")
