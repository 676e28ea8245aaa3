"""Ingest's per-record work in other processes: helper processes on this machine, or Ray tasks on
the cluster of the `cluster:` section.

The files are cut into pieces: plain JSON Lines files at line boundaries, and on a cluster each
.jsonl.gz or Parquet file is one piece too. Each piece's lines (or rows) are checked
(mft_core/data/record_checks.py: parse, normalize, fingerprint, decontaminate, the work that needs
no other record). run_ingest takes the results in file-then-line order and does what depends on
earlier records as a one-process run does (the split, the writing; dedup, where the first
occurrence wins), so the output is the same.

- On this machine (`ingest.num_workers`): helper processes go through the plan from the front,
  each checking the pieces it claims first, while run_ingest goes on with the rest of its work;
  when run_ingest reaches a piece nobody has claimed it checks that piece itself, and while it
  waits for a helper's piece it checks one further ahead. So the processes share the work whatever
  their speeds, a helper that starts late only does less, and one that dies costs speed, not
  output: run_ingest checks the rest itself. .jsonl.gz and Parquet files are read by run_ingest.
- On a cluster: each piece is a Ray task (ingest.piece_mb), a few per worker ahead of the one
  being consumed; the benchmark's n-gram index is built once and shared through the object store.
  Exact dedup is hash-partitioned: one actor per node holds the fingerprints whose key falls in
  its partition. run_ingest's process sends each piece's fingerprints, in file-then-line order,
  to their partitions when it reaches the piece's first record, and each partition answers which
  ones it has seen before; an actor runs one caller's calls in the order they were sent, so the
  first occurrence wins as in one process, and the fingerprints are held across the nodes.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import logging
import os
import pickle
import select
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mft_core.config import PipelineConfig
from mft_core.data.ingest import normalizer, task_files
from mft_core.data.record_checks import (
    CheckedRecord,
    SeenFingerprints,
    check_items,
    check_piece,
    claim,
    dedup_key,
    line_pieces,
    piece_lines,
    receive_message,
)

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


def piece_plan(cfg: PipelineConfig, piece_bytes: int, whole_files: bool = False) -> list[Piece]:
    """The pieces of every task's plain JSON Lines files, in the order run_ingest reads them; with
    whole_files, every other data file as one piece (stop None) in its place."""
    plan = []
    for task in cfg.data.tasks:
        normalize = normalizer(task)
        for path in task_files(task.path):
            if handles(path):
                plan += [(path, start, stop, normalize) for start, stop in line_pieces(path, piece_bytes)]
            elif whole_files:
                plan.append((path, 0, None, normalize))
    return plan


def check_whole_file(path: str, normalize, decontaminator) -> list[tuple[Any, Any]]:
    """(line or Parquet row, check_items result without the record) of a .jsonl.gz or Parquet
    file, read as run_ingest reads it; a damaged file's readable part, then (None, DamagedFile)."""
    from mft_core.data.ingest import DamagedFile, read_lines, read_parquet_rows

    items, damage = [], []
    try:
        for _, item in read_parquet_rows(Path(path)) if path.endswith(".parquet") else read_lines(Path(path)):
            items.append(item)
    except DamagedFile as err:
        damage.append((None, err))
    return list(zip(items, check_items(items, normalize, decontaminator))) + damage


def check_on_cluster(path: str, start: int, stop: int | None, normalize, decontaminator) -> list[tuple[Any, Any]]:
    """A Ray task: one piece of the plan."""
    if stop is None:
        return check_whole_file(path, normalize, decontaminator)
    return check_piece(path, start, stop, normalize, decontaminator)


class PieceChecks:
    """The pieces' results in the order run_ingest reads the files; `lines(path)` gives one file's.
    `share(decontaminator)` hands the benchmark index to the processes that check (it is built
    while they start). `submit(index, piece)` starts piece `index` of the plan and returns a
    function that waits for its [(line, check_items result)]; it is called in plan order, `ahead`
    pieces before their results are taken. `close()` stops what still runs."""

    def __init__(self, plan: list[Piece], share: Callable[[Any], None], submit: Callable[[int, Piece], Callable[[], list]],
                 ahead: int, where: str, close: Callable[[], None] = lambda: None,
                 first_seen: Callable[[list[int]], list[bool]] | None = None):
        self.plan = iter(enumerate(plan))
        self.share, self.submit, self.ahead, self.where, self.close = share, submit, ahead, where, close
        self.first_seen = first_seen  # the cluster's dedup: fingerprint keys, in order -> whether each is new
        self.pending: collections.deque = collections.deque()  # (path, result getter), in plan order
        self.file_order = {path: number for number, path in enumerate(dict.fromkeys(path for path, *_ in plan))}

    def handles(self, path: Path) -> bool:
        """Whether the file's lines come from here (it has pieces)."""
        return path in self.file_order

    def lines(self, path: Path) -> Iterator[tuple[int, Any, Any]]:
        """(1-based line or row number, the line or row, its check_items result); a damaged file
        raises DamagedFile after its readable lines, as read_lines does."""
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
                return  # this file's pieces are all taken
            results = self.pending.popleft()[1]()
            verdicts = None
            for item, checked in results:
                if item is None:
                    raise checked  # DamagedFile: the rest of the file cannot be read
                valid = isinstance(checked, CheckedRecord) and checked.error is None
                if valid and self.first_seen is not None:
                    # Asked at the piece's first record, not before: run_ingest may have stopped
                    # reading the file (a JSON array), and what it does not read must not count.
                    if verdicts is None:
                        verdicts = iter(self.first_seen([dedup_key(c.fingerprint) for _, c in results
                                                         if isinstance(c, CheckedRecord) and c.error is None]))
                    checked = checked._replace(first=next(verdicts))
                number += 1
                yield number, item, checked


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
            try:
                process = subprocess.Popen([sys.executable, "-S", "-m", "mft_core.data.record_checks", self.claims,
                                            str(write)], stdin=subprocess.PIPE, pass_fds=(write,), env=_helper_environment())
            except OSError as err:  # no interpreter to start (an embedded Python): this process checks everything
                log.warning("ingest: cannot start a helper process (%s); checking every record here", err)
                os.close(read)
                break
            finally:
                os.close(write)
            self.helpers[read] = process

    def share(self, decontaminator) -> None:
        """Send the plan and the benchmark index to the helpers, from a thread: the pipe takes them
        only as fast as a helper that is still starting reads."""
        self.decontaminator = decontaminator
        # A saved index goes as its path: each helper reads it in as fast as it would unpickle it,
        # and this process does not pickle it.
        index = decontaminator.saved_at if decontaminator is not None and decontaminator.saved_at else decontaminator
        setup = pickle.dumps(([(os.fspath(path), *rest) for path, *rest in self.plan], index))

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
            elif select.select(list(self.helpers), [], [], 0)[0]:
                self._receive()
            elif not self._check_ahead(index):  # a helper has it: check a later piece meanwhile
                self._receive()  # nothing left to check here: wait for the helpers
        here, results = self.done.pop(index)
        for dropped in [earlier for earlier in self.done if earlier < index]:
            del self.done[dropped]  # pieces of a file run_ingest stopped reading (one JSON array)
        if here:
            return results
        return list(zip(piece_lines(path, start, stop), results))

    def _check_here(self, index: int) -> None:
        path, start, stop, normalize = self.plan[index]
        lines = piece_lines(path, start, stop)
        self.done[index] = (True, list(zip(lines, check_items(lines, normalize, self.decontaminator, keep_records=True))))
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
        for fd in select.select(list(self.helpers), [], [])[0]:
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
        """Stop every helper; the rest is checked here. After one helper fails the others stop too:
        claims do not say whose they are, so a piece a live helper had claimed could not be told
        from one the failed helper took with it."""
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
                       f"JSON Lines checked by {workers} helper process(es) beside this one", close=helpers.close)


class DedupPartitions:
    """One SeenFingerprints actor per node. first_seen sends each key to partition key % count (the
    calls of one piece together, in order) and gives the answers in the keys' order. A lost
    partition cannot be rebuilt: the run fails with what to do."""

    def __init__(self, ray, nodes: list[dict[str, Any]]):
        from mft_core.cluster import on_node

        self.ray = ray
        actor = ray.remote(SeenFingerprints)
        self.partitions = [actor.options(num_cpus=0, max_restarts=0, scheduling_strategy=on_node(ray, node["NodeID"]))
                           .remote() for node in nodes]

    def first_seen(self, keys: list[int]) -> list[bool]:
        count = len(self.partitions)
        parts: list[list[int]] = [[] for _ in range(count)]
        for key in keys:
            parts[key % count].append(key)
        try:
            answers = self.ray.get([partition.first_seen.remote(part) for partition, part in zip(self.partitions, parts)])
        except self.ray.exceptions.RayActorError as err:
            from mft_core.data.ingest import IngestError

            raise IngestError(f"a dedup partition on the cluster was lost (its node or actor died: {err}); the "
                              "fingerprints it held are gone, so ingest cannot tell duplicates apart. Run the stage "
                              "again.") from None
        answer_of = [iter(answer) for answer in answers]
        return [next(answer_of[key % count]) for key in keys]


def _on_ray(cfg: PipelineConfig) -> PieceChecks:
    from mft_core.cluster import alive_nodes, connect

    cluster = cfg.cluster
    ray = connect(cluster)
    remote = ray.remote(check_on_cluster).options(num_cpus=cluster.cpus_per_task, max_retries=cluster.max_retries,
                                                  scheduling_strategy="SPREAD")
    workers = max(1, int(ray.cluster_resources().get("CPU", 1) // cluster.cpus_per_task))
    shared = {}

    def share(decontaminator) -> None:
        shared["index"] = ray.put(decontaminator)  # built once; every task reads the same copy

    def on_ray(index, piece):
        path, start, stop, normalize = piece
        ref = remote.remote(os.fspath(path), start, stop, normalize, shared["index"])
        return lambda: ray.get(ref)

    nodes = alive_nodes(ray)
    first_seen = DedupPartitions(ray, nodes).first_seen if cfg.ingest.dedup else None
    plan = piece_plan(cfg, max(1, int(cfg.ingest.piece_mb * 1e6)), whole_files=True)
    return PieceChecks(plan, share, on_ray, workers * AHEAD_PER_WORKER,
                       f"files checked by Ray tasks on the cluster ({workers} at a time), dedup in {len(nodes)} partitions",
                       first_seen=first_seen)
