"""Ingest's work on one record that needs no other record (parse, normalize, fingerprint,
decontaminate), by the record, by the piece of a JSON Lines file, and in a helper process.

Pieces are byte ranges of a plain JSON Lines file cut at line boundaries. Whatever checks a piece
(this process, a helper process beside it: mft_core/data/ingest_pieces.py, or a Ray task on a
cluster) sees its lines exactly as run_ingest's read_lines gives them, so the results are the same.

A helper process (`python -m mft_core.data.record_checks CLAIMS FD`) reads the plan of pieces and
the decontaminator (or the path of its saved index) from its stdin, then goes through the plan
from the front and checks every piece it claims first; a claim is a file created with O_EXCL in
the folder CLAIMS, so that of the processes that want a piece exactly one gets it. The results go back over the pipe FD as
length-prefixed pickles (send_message, receive_message). This module imports only what checking
needs (no pyarrow, no pydantic, no multiprocessing): a helper starts in about 40 ms.
"""

from __future__ import annotations

import importlib
import os
import pickle
import signal
import struct
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from mft_core.data.records import RecordError, normalize_record, parse_line, record_fingerprint, record_text

if TYPE_CHECKING:
    from mft_core.data.decontam import Decontaminator

BOM = b"\xef\xbb\xbf"


class CheckedRecord(NamedTuple):
    """What check_record finds about one line or Parquet row."""

    record: dict[str, Any] | None  # the canonical record (records.py), None when invalid
    error: RecordError | None  # why it is not a valid record
    fingerprint: bytes | None  # records.record_fingerprint: the dedup and split key
    overlaps: list[str]  # the benchmark items it shares an n-gram with ([] when clean or not checked)
    # On a cluster: whether it is the first record of its content in task, file and line order
    # (the cluster's dedup partitions decide); None: run_ingest's own set decides.
    first: bool | None = None


def parse_item(item: bytes | dict[str, Any] | RecordError, normalize=normalize_record) -> dict[str, Any]:
    """A JSON Lines line or a Parquet row -> canonical record, or raise RecordError."""
    if isinstance(item, bytes):
        return parse_line(item, normalize)
    if isinstance(item, RecordError):  # a Parquet row that could not be decoded
        raise item
    return normalize(item)


def check_record(
    item: bytes | dict[str, Any] | RecordError, normalize=normalize_record, decontaminator: Decontaminator | None = None
) -> CheckedRecord:
    """A JSON Lines line (bytes, from read_lines) or a Parquet row (from read_parquet_rows) ->
    canonical record and fingerprint, or the RecordError; and the benchmark items it overlaps.
    Its arguments pickle (normalize is a module-level function), so other processes can run it;
    what depends on earlier records (dedup: the first occurrence in task, file and line order
    wins), the split and the writing stay with run_ingest."""
    try:
        record = parse_item(item, normalize)
    except RecordError as err:
        return CheckedRecord(None, err, None, [])
    overlaps = decontaminator.matches(record_text(record)) if decontaminator is not None else []
    return CheckedRecord(record, None, record_fingerprint(record), overlaps)


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


def piece_lines(path: str | Path, start: int, stop: int) -> list[bytes]:
    """The lines of the byte range as read_lines gives them: the BOM of the file's first line
    dropped, CR/LF stripped."""
    with open(path, "rb") as fh:
        fh.seek(start)
        data = fh.read(stop - start)
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline ending the piece ends its last line
    if start == 0 and lines and lines[0].startswith(BOM):
        lines[0] = lines[0][len(BOM):]
    return [line.rstrip(b"\r") for line in lines]


def check_items(items: list, normalize, decontaminator, keep_records: bool = False) -> list[Any]:
    """check_record of every line (or Parquet row): None for a blank line, or the exception
    check_record raised (run_ingest reports it with the line's place). Without keep_records the
    results come without the record (run_ingest parses again the records it keeps): Ray's
    transfer of a record costs the driver about what parsing its line does, and it is the bulk of
    the data."""
    results = []
    for item in items:
        try:
            blank = isinstance(item, bytes) and not item.strip()
            checked = None if blank else check_record(item, normalize, decontaminator)
        except Exception as error:  # noqa: BLE001 - located and raised by run_ingest
            checked = error
        if not keep_records and isinstance(checked, CheckedRecord) and checked.record is not None:
            checked = checked._replace(record=None)
        results.append(checked)
    return results


def dedup_key(fingerprint: bytes) -> int:
    """The 64 bits of a record's fingerprint that exact dedup compares."""
    return int.from_bytes(fingerprint[:8], "little")


def check_piece(path: str, start: int, stop: int, normalize, decontaminator) -> list[tuple[bytes, Any]]:
    """(line, check_items result without the record) of every line of the byte range."""
    lines = piece_lines(path, start, stop)
    return list(zip(lines, check_items(lines, normalize, decontaminator)))


class SeenFingerprints:
    """A Ray actor (mft_core/data/ingest_pieces.py DedupPartitions): the dedup keys of one
    partition seen so far. Here, in the light module, so that an actor starts without the
    ingest stack (pyarrow, pydantic)."""

    def __init__(self) -> None:
        self.seen: set[int] = set()

    def first_seen(self, keys: list[int]) -> list[bool]:
        """For each key in order, whether it is new (then it is remembered)."""
        seen, new = self.seen, []
        for key in keys:
            new.append(key not in seen)
            seen.add(key)
        return new


def claim(claims: str | Path, index: int) -> bool:
    """True for the one process that asks first for piece `index` of the plan."""
    try:
        os.close(os.open(os.path.join(claims, str(index)), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def send_message(fd: int, message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(struct.pack("<Q", len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def receive_message(fd: int) -> Any:
    """The next message sent to the pipe `fd`; EOFError when the sender has closed it."""
    (size,) = struct.unpack("<Q", _read_exactly(fd, 8))
    return pickle.loads(_read_exactly(fd, size))


def _read_exactly(fd: int, size: int) -> bytes:
    chunks = []
    while size:
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            raise EOFError("the helper process closed its pipe")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def serve(claims: str, fd: int) -> None:
    """A helper process: check the pieces of the plan this process claims first, in plan order,
    and send (index, results) for each."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: run_ingest stops the helpers
    decontam = importlib.import_module("mft_core.data.decontam")  # while run_ingest builds or reads the index

    plan, decontaminator = pickle.load(sys.stdin.buffer)
    if isinstance(decontaminator, Path):  # the index as saved_index saved it
        decontaminator = decontam.Decontaminator.read(decontaminator)
    for index, (path, start, stop, normalize) in enumerate(plan):
        if claim(claims, index):
            send_message(fd, (index, check_items(piece_lines(path, start, stop), normalize, decontaminator,
                                                keep_records=True)))
    os.close(fd)


if __name__ == "__main__":
    # Run from the module under its own name: results made from this file's __main__ copy would
    # unpickle as __main__.CheckedRecord in run_ingest.
    from mft_core.data import record_checks

    record_checks.serve(sys.argv[1], int(sys.argv[2]))
