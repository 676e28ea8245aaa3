"""Ingest stage: raw JSONL or Parquet (one directory or file per task) -> validated, normalized,
deduplicated, decontaminated records per task, split into train and valid Parquet files.

A Parquet row is read as the JSON line it would be (see read_parquet_rows) and located as
"file:row N" where a line is "file:line". Bad input never escapes as a bare exception: a bad
record, a damaged .gz or Parquet file, a JSON array saved as .jsonl is a reject (a reason of
records.REJECT_FIXES) with its location, and anything unexpected on a record is an IngestError
naming the record's location.

Output directory:
  tasks.json              [{name, id, path, files, train, valid}]  (task ids = order in the config)
  stats.json              per task: lines (Parquet rows count as lines), blank lines, accepted,
                          rejects by reason, duplicates, contaminated, train, valid; and totals
  rejects.jsonl           every line that was not kept: source file:line, reason, detail, excerpt
                          (the start of the line, or of a Parquet row as JSON)
  data/<task>/train.parquet, data/<task>/valid.parquet
      columns: task, task_id (int16), shape (chat | pair | text: the record's source shape, which
               decides how it is tokenized), messages (list<struct<role, content>>), text, source
               ("path:line"), record_hash (hex sha256 of the canonical content); a preference task
               (kind: preference, records.normalize_preference) adds chosen and rejected, its
               messages being the conversation they answer

Memory stays bounded whatever the input size: records stream from file to Parquet row groups.
The only state that grows is the dedup set (one 64-bit fingerprint per unique record); on a Ray
cluster it is spread over the nodes (mft_core/data/ingest_pieces.py).
"""

from __future__ import annotations

import gzip
import hashlib
import heapq
import json
import logging
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mft_core.config import PipelineConfig
from mft_core.console import announce
from mft_core.data.record_checks import BOM, check_record, dedup_key, parse_item
from mft_core.data.records import (
    REJECT_FIXES,
    RecordError,
    normalize_preference,
    normalize_record,
)
from mft_core.store import FileHashCache

log = logging.getLogger("mft.ingest")

STAGE_VERSION = 2  # 2: the `shape` column (pair records tokenize as MFTCoder tokenizes pairs)
DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
_GZIP_MAGIC = b"\x1f\x8b"
DECONTAM_INDEX_FOLDER = ".decontam-index"  # below runs_root: the benchmark's n-gram index, saved (decontam.saved_index)
_EXCERPT = 160
_PARQUET_BATCH_ROWS = 1024  # rows turned into Python objects at a time

RECORD_SCHEMA = pa.schema(
    [
        ("task", pa.string()),
        ("task_id", pa.int16()),
        ("shape", pa.string()),
        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("text", pa.string()),
        ("source", pa.string()),
        ("record_hash", pa.string()),
    ]
)
# A preference task's records (shape "preference"): `messages` is the shared conversation, ending
# with the user turn; the two answers follow it.
PREFERENCE_SCHEMA = RECORD_SCHEMA.append(pa.field("chosen", pa.string())).append(pa.field("rejected", pa.string()))


class IngestError(RuntimeError):
    """Ingest cannot produce a trustworthy output; the message says where and how to fix it."""


def task_files(path: Path | str, warn_ignored: bool = False) -> list[Path]:
    """A task is one file, or every **/*.jsonl, **/*.jsonl.gz and **/*.parquet below a directory,
    sorted. A hf://datasets/ URI is the file or folder it names in the dataset's downloaded
    snapshot. With warn_ignored, the other files of a directory are listed in a warning (ingest
    asks for it; the stage key does not, so that the warning is logged once)."""
    if isinstance(path, str):
        from mft_core.hub import resolve_dataset

        path = resolve_dataset(path)[1]
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise IngestError(f"task path {path} does not exist (fix data.tasks[].path in the config)")
    found = sorted(p for p in path.rglob("*") if p.is_file())
    files = [p for p in found if p.name.endswith(DATA_SUFFIXES)]
    # Hidden files and folders (.git/, a Hub clone's .gitattributes and .cache/, .DS_Store) are
    # tools' metadata, never data: listing them would only bury the files that matter.
    ignored = [
        rel
        for rel in (p.relative_to(path) for p in found if not p.name.endswith(DATA_SUFFIXES))
        if not any(part.startswith(".") for part in rel.parts)
    ]
    if not files:
        holds = f" (it holds {_listing([rel.as_posix() for rel in ignored])})" if ignored else ""
        raise IngestError(f"task directory {path} holds no *.jsonl, *.jsonl.gz or *.parquet file{holds}")
    if warn_ignored and ignored:
        log.warning(
            "task directory %s: %d files not read (only *.jsonl, *.jsonl.gz and *.parquet files are task data): %s",
            path,
            len(ignored),
            _listing([rel.as_posix() for rel in ignored]),
        )
    return files


def _listing(names: list[str], limit: int = 20) -> str:
    """Names for a message, the first `limit` of them."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class DamagedFile(Exception):
    """A .gz or Parquet file that cannot be read past its `last_good` line (or row): truncated or
    corrupt. The lines before it were read and are valid input."""

    def __init__(self, last_good: int, detail: str):
        super().__init__(detail)
        self.last_good = last_good
        self.detail = detail

    def __reduce__(self):  # it comes back from a Ray task
        return DamagedFile, (self.last_good, self.detail)


def read_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line bytes without CR/LF) of a .jsonl or .jsonl.gz file; a UTF-8 BOM
    on the first line is dropped. A truncated or corrupt .gz raises DamagedFile once the lines
    before the damage are read."""
    opener = gzip.open if path.name.endswith(".gz") else open
    lineno = 0
    try:
        with opener(path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                if lineno == 1 and raw.startswith(BOM):
                    raw = raw[len(BOM) :]
                yield lineno, raw.rstrip(b"\r\n")
    except EOFError:
        raise DamagedFile(lineno, "the gzip data is truncated: it ends before its end-of-stream marker") from None
    except (gzip.BadGzipFile, zlib.error) as err:
        with open(path, "rb") as fh:
            not_gzip = lineno == 0 and fh.read(len(_GZIP_MAGIC)) != _GZIP_MAGIC
        problem = "the gzip data is corrupt"
        if not_gzip:
            problem = "not a gzip file (rename it to .jsonl if it is plain JSON Lines)"
        raise DamagedFile(lineno, f"{problem}: {err}") from None


def read_parquet_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | RecordError]]:
    """(1-based row number, row as a JSON object) of a Parquet file, read a row group at a time
    in batches (bounded memory). Columns are keys; a struct is an object, a list an array.

    A null is an absent key, at every level: Parquet has no absent key. A column (or struct
    field) is on every row, null where the record had no such key: converting JSON Lines to
    Parquet (the Hub, `datasets`) makes a column of every key of any record. Kept, a null `prompt`
    column would make a chat_rounds row a broken prompt/answer pair (shapes are detected with
    `key in obj`), and a turn's null `name` field would be a key JSON Lines never had.

    A row whose strings are not valid UTF-8 comes as its RecordError; a file that cannot be read
    raises DamagedFile after the rows before the damage."""
    rowno = 0
    try:
        for batch in _row_group_batches(path):
            try:
                rows = batch.to_pylist()
            except UnicodeDecodeError:  # find the bad rows one by one (rare)
                rows = [_row_or_error(batch.slice(i, 1)) for i in range(batch.num_rows)]
            for row in rows:
                rowno += 1
                yield rowno, row if isinstance(row, RecordError) else _without_nulls(row)
    except (PermissionError, FileNotFoundError, IsADirectoryError):
        raise  # the file system's problem, not the data's: never a skippable reject
    except (pa.ArrowException, OSError) as err:  # pyarrow reports a damaged page as a plain OSError
        problem = "not a readable Parquet file" if rowno == 0 else "the Parquet data is damaged"
        raise DamagedFile(rowno, f"{problem}: {err}") from None


def _row_group_batches(path: Path) -> Iterator[pa.RecordBatch]:
    """The record batches of a Parquet file, one row group after the other: a damaged row group
    then costs only its own rows (iter_batches over the whole file makes batches that span two)."""
    with pq.ParquetFile(path) as parquet:
        for group in range(parquet.num_row_groups):
            yield from parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, row_groups=[group])


def normalizer(task):
    """The function that turns one of the task's records into its canonical form."""
    return normalize_preference if task.kind == "preference" else normalize_record


def _items(path: Path, unit: str, checks) -> Iterator[tuple[int, Any, Any]]:
    """(number, line or row, its check_record result when other processes made it, else None) of
    one file, in order."""
    if checks is not None and checks.handles(path):
        yield from checks.lines(path)
        return
    for number, item in read_parquet_rows(path) if unit else read_lines(path):
        yield number, item, None


def _json_array(err: RecordError, raw: bytes) -> RecordError | None:
    """The first non-blank line of a file failed: when it opens a JSON array, the file was saved as
    one JSON array (`[{...}, {...}]`, on one line or pretty-printed), not as JSON Lines."""
    if not raw.lstrip().startswith(b"[") or err.reason not in ("bad_json", "not_object"):
        return None
    if err.reason == "not_object":  # the whole array is on this line
        return RecordError("json_array", "this is a JSON array, not JSON Lines: this line holds a whole array")
    return RecordError(
        "json_array", "this is a JSON array, not JSON Lines: the array spans several lines, so the whole file is skipped"
    )


def _row_or_error(one_row: pa.RecordBatch) -> dict[str, Any] | RecordError:
    try:
        return one_row.to_pylist()[0]
    except UnicodeDecodeError as err:
        return RecordError("invalid_utf8", f"a string column holds an invalid byte ({err.reason})")


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value


def split_score(record_hash: bytes, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the record's content: adding records never moves the
    others between train and valid."""
    digest = hashlib.sha256(seed.to_bytes(8, "little", signed=True) + record_hash).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


class _ParquetSink:
    """Rows buffered up to one row group, then written: bounded memory."""

    def __init__(self, path: Path, row_group_size: int, schema: pa.Schema = RECORD_SCHEMA):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.writer = pq.ParquetWriter(path, schema, compression="zstd")
        self.rows: list[dict[str, Any]] = []
        self.row_group_size = row_group_size
        self.count = 0

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.count += 1
        if len(self.rows) >= self.row_group_size:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            columns = [pa.array([row[f.name] for row in self.rows], type=f.type) for f in self.schema]
            self.writer.write_table(pa.Table.from_arrays(columns, schema=self.schema))
            self.rows = []

    def close(self) -> None:
        self.flush()
        self.writer.close()


@dataclass
class TaskStats:
    files: int = 0
    lines: int = 0
    blank_lines: int = 0
    accepted: int = 0
    rejected: Counter = field(default_factory=Counter)
    duplicates: int = 0
    contaminated: int = 0
    train: int = 0
    valid: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "lines": self.lines,
            "blank_lines": self.blank_lines,
            "rejected": sum(self.rejected.values()),
            "rejected_by_reason": dict(sorted(self.rejected.items())),
            "duplicates": self.duplicates,
            "contaminated": self.contaminated,
            "kept": self.train + self.valid,
            "train": self.train,
            "valid": self.valid,
        }


def _load_decontaminator(cfg: PipelineConfig):
    """The n-gram decontaminator over the benchmark the evaluate stage will use, or None (with a
    notice) when disabled or when there is no benchmark at all."""
    if not cfg.ingest.decontaminate.enabled:
        return None
    from mft_core.data.decontam import saved_index

    hashes = FileHashCache(cfg.runs_root)
    decontaminator = saved_index(cfg.runs_root / DECONTAM_INDEX_FOLDER, cfg.humaneval_dir,
                                 cfg.ingest.decontaminate.ngram, hashes.digest)
    hashes.save()
    if decontaminator is None:
        log.warning("decontamination is on but there is no benchmark data (`mft data humaneval-x`); "
                    "records are NOT decontaminated")
    else:
        log.info("decontaminating against %s", cfg.benchmark().describe())
    return decontaminator


def benchmark_digest(cfg: PipelineConfig) -> str:
    """Content hash of the decontamination reference, so other benchmark data recomputes ingest."""
    if not cfg.ingest.decontaminate.enabled:
        return "decontamination-off"
    return cfg.benchmark().digest()


def ingest_key_parts(cfg: PipelineConfig, hashes: FileHashCache) -> tuple[dict[str, Any], list[str]]:
    """(config part, input content digests) of the ingest stage key. Paths enter only relative to
    their task, so moving the project does not change the key; file content always does."""
    section = cfg.stage_section("ingest")
    for layout_only in ("row_group_size", "piece_mb", "num_workers"):  # how the work is cut, not what it gives
        section.pop(layout_only)
    config = {"ingest": section, "tasks": [t.task_name for t in cfg.data.tasks]}
    preference = [t.task_name for t in cfg.data.tasks if t.kind == "preference"]
    if preference:  # only then: the keys of configs without preference data stay as they were
        config["preference_tasks"] = preference
    inputs = [f"benchmark:{benchmark_digest(cfg)}"]
    for task in cfg.data.tasks:
        root = task.path
        if isinstance(root, str):  # hf://datasets/...: its commit enters the key beside the files' content
            from mft_core.hub import resolve_dataset

            snapshot, root = resolve_dataset(root)
            inputs.append(f"hf-dataset:{snapshot.pinned}")
        for path in task_files(root):
            rel = path.name if root.is_file() else path.relative_to(root).as_posix()
            inputs.append(f"{task.task_name}/{rel}:{hashes.digest(path)}")
    hashes.save()
    return config, inputs


def _excerpt(item: bytes | dict[str, Any] | RecordError) -> str:
    """The start of a rejected line, or of a Parquet row as JSON (as ingest saw it: nulls dropped)."""
    if isinstance(item, dict):
        # default=str: Parquet values that JSON has no type for (timestamps, decimals, binary)
        item = json.dumps(item, ensure_ascii=False, default=str).encode("utf-8", "backslashreplace")
    raw = item if isinstance(item, bytes) else b""  # a row that could not even be decoded
    text = raw[: _EXCERPT * 4].decode("utf-8", errors="replace")
    return text[:_EXCERPT] + ("…" if len(text) > _EXCERPT or len(raw) > _EXCERPT * 4 else "")


def run_ingest(cfg: PipelineConfig, out_dir: Path) -> dict[str, Any]:
    """Build the ingest output into `out_dir` (an empty work directory). Returns stats.json's content."""
    from mft_core.data.ingest_pieces import piece_checks

    checks = piece_checks(cfg)  # helper processes start while the benchmark index is built
    try:
        decontaminator = _load_decontaminator(cfg)
        if checks is not None:
            checks.share(decontaminator)
        announce(log, "ingest", f"start: {len(cfg.data.tasks)} task(s) ({', '.join(t.task_name for t in cfg.data.tasks)}), "
                                f"decontamination {'on' if cfg.ingest.decontaminate.enabled else 'off'}"
                                + (f", {checks.where}" if checks is not None else ""))
        return _ingest(cfg, out_dir, decontaminator, checks)
    finally:
        if checks is not None:
            checks.close()  # helper processes stopped, whatever happened


def _ingest(cfg: PipelineConfig, out_dir: Path, decontaminator, checks) -> dict[str, Any]:
    settings = cfg.ingest
    seen: set[int] = set()
    all_stats: dict[str, TaskStats] = {}
    tasks_meta: list[dict[str, Any]] = []
    total_lines = 0
    first_rejects: list[str] = []

    with open(out_dir / "rejects.jsonl", "w", encoding="utf-8") as rejects:

        def reject(stats: TaskStats, source: str, reason: str, detail: str, item, kind: str) -> None:
            if kind == "invalid" and len(first_rejects) < 5:
                first_rejects.append(f"  {source}: {reason}: {detail}")
            rejects.write(
                json.dumps(
                    {"source": source, "kind": kind, "reason": reason, "detail": detail, "excerpt": _excerpt(item)},
                    ensure_ascii=False,
                )
                + "\n"
            )

        def invalid(stats: TaskStats, location: str, source: str, err: RecordError, item) -> None:
            """A record (or the rest of a file) that cannot be used: stop the run with where, what
            and how to fix it (on_error=fail), or count it and list it in rejects.jsonl (skip)."""
            if settings.on_error == "fail":
                raise IngestError(
                    f"{location}: invalid record ({err.reason}): {err.detail}. "
                    f"Fix: {REJECT_FIXES[err.reason]}. To skip invalid records instead, set "
                    "ingest.on_error=skip (they are then counted and listed in rejects.jsonl)."
                ) from None
            stats.rejected[err.reason] += 1
            reject(stats, source, err.reason, err.detail, item, "invalid")

        for task_id, task in enumerate(cfg.data.tasks):
            name = task.task_name
            stats = all_stats[name] = TaskStats()
            files = task_files(task.path, warn_ignored=True)
            stats.files = len(files)
            preference = task.kind == "preference"
            normalize = normalizer(task)
            schema = PREFERENCE_SCHEMA if preference else RECORD_SCHEMA
            sinks = {
                split: _ParquetSink(out_dir / "data" / name / f"{split}.parquet", settings.row_group_size, schema)
                for split in ("train", "valid")
            }
            # The min_valid lowest-scoring train candidates are held back (a max-heap of
            # (-score, n, row)), so that a task whose hash split gives too few validation
            # records can be topped up at the end without a second pass over the data.
            held: list[tuple[float, int, dict[str, Any]]] = []
            for path in files:
                shown = cfg.display_path(path)
                # A Parquet record is located by its row number, a JSON Lines one by its line number.
                unit = "row " if path.name.endswith(".parquet") else ""
                first = not unit  # the first non-blank line tells a JSON array saved as .jsonl apart
                number = 0
                try:
                    for number, item, checked in _items(path, unit, checks):
                        stats.lines += 1
                        source = f"{shown}:{unit}{number}"
                        if isinstance(item, bytes) and not item.strip():
                            stats.blank_lines += 1
                            continue
                        # The per-record guard: whatever fails on a record says where it is. An
                        # unexpected error is not skipped, even with on_error=skip: it may be a bug
                        # of ingest rather than bad data, and skipping could drop good records unseen.
                        try:
                            if checked is None:  # not checked on the cluster: here
                                checked = check_record(item, normalize, decontaminator)
                            elif isinstance(checked, Exception):
                                raise checked
                            if checked.error is not None:
                                array = _json_array(checked.error, item) if first else None
                                first = False
                                invalid(stats, f"{path}:{unit}{number}", source, array or checked.error, item)
                                if array and checked.error.reason == "bad_json":
                                    break  # a pretty-printed array: the other lines are the rest of it
                                continue
                            first = False
                            if settings.dedup:
                                first_seen = checked.first
                                if first_seen is None:  # not decided by the cluster's dedup partitions: here
                                    short = dedup_key(checked.fingerprint)
                                    first_seen = short not in seen
                                    seen.add(short)
                                if not first_seen:
                                    stats.duplicates += 1
                                    detail = "exact duplicate of an earlier record"
                                    reject(stats, source, "duplicate", detail, item, "filtered")
                                    continue
                            if checked.overlaps:
                                stats.contaminated += 1
                                detail = f"overlaps HumanEval-X {', '.join(checked.overlaps[:5])}"
                                reject(stats, source, "contaminated", detail, item, "filtered")
                                continue
                        except IngestError:
                            raise
                        except Exception as err:
                            raise IngestError(
                                f"{path}:{unit}{number}: unexpected {type(err).__name__} while ingesting this record: "
                                f"{err}. Ingest does not handle this input (a bug): please report it with the record; "
                                "remove the record to go on."
                            ) from err
                        record, fingerprint = checked.record, checked.fingerprint
                        if record is None:  # checked by a Ray task, which sends no record back (ingest_pieces)
                            record = parse_item(item, normalize)
                        stats.accepted += 1
                        row = {
                            "task": name,
                            "task_id": task_id,
                            "shape": record["shape"],
                            "messages": record["messages"],
                            "text": record["text"],
                            "source": source,
                            "record_hash": fingerprint.hex(),
                        }
                        if preference:
                            row.update(chosen=record["chosen"], rejected=record["rejected"])
                        score = split_score(fingerprint, settings.split_seed)
                        if score < settings.valid_fraction:
                            sinks["valid"].add(row)
                        elif settings.min_valid == 0:
                            sinks["train"].add(row)
                        elif len(held) < settings.min_valid:
                            heapq.heappush(held, (-score, stats.accepted, row))
                        else:
                            _, _, evicted = heapq.heappushpop(held, (-score, stats.accepted, row))
                            sinks["train"].add(evicted)
                except DamagedFile as err:
                    # The unreadable rest of the file counts as one line and one reject; with
                    # on_error=skip the records before it are kept: they were read whole.
                    stats.lines += 1
                    noun, at = ("row" if unit else "line"), f"{unit}{err.last_good + 1}"
                    where = f"after {noun} {err.last_good}, the last good {noun}" if err.last_good else f"before {noun} 1"
                    detail = f"{err.detail}; the damage is {where}, nothing after it can be read"
                    invalid(stats, f"{path}:{at}", f"{shown}:{at}", RecordError("corrupt_file", detail), b"")
                except IngestError:
                    raise
                except Exception as err:  # reading failed (permissions, I/O): not a data problem, not skipped
                    raise IngestError(
                        f"{path}: cannot read the file past {unit or 'line '}{number}: {type(err).__name__}: {err}"
                    ) from err
            need = max(0, settings.min_valid - sinks["valid"].count)
            for rank, (_, _, row) in enumerate(sorted(held, key=lambda item: (-item[0], item[1]))):
                sinks["valid" if rank < need else "train"].add(row)
            for sink in sinks.values():
                sink.close()
            stats.train, stats.valid = sinks["train"].count, sinks["valid"].count
            total_lines += stats.lines
            if stats.lines == stats.blank_lines:
                raise IngestError(
                    f"task {name!r} ({task.path}) holds no record: its files are empty or hold only blank lines: "
                    f"{_listing([cfg.display_path(p) for p in files])}. Fix data.tasks[].path or the files."
                )
            if stats.valid < settings.min_valid or stats.train == 0:
                raise IngestError(
                    f"task {name!r} ({task.path}) has only {stats.accepted} usable records after validation, "
                    f"dedup and decontamination: too few for {settings.min_valid} validation records and "
                    "at least one training record. Add data, or lower ingest.min_valid."
                )
            tasks_meta.append(
                {
                    "name": name,
                    "id": task_id,
                    "path": cfg.display_path(task.path),
                    "files": [cfg.display_path(p) for p in files],
                    "train": stats.train,
                    "valid": stats.valid,
                    **({"kind": "preference"} if preference else {}),
                }
            )

    invalid = sum(sum(s.rejected.values()) for s in all_stats.values())
    non_blank = sum(s.lines - s.blank_lines for s in all_stats.values())
    if non_blank and invalid / non_blank > settings.max_reject_fraction:
        by_reason = Counter()
        for s in all_stats.values():
            by_reason.update(s.rejected)
        raise IngestError(
            f"{invalid} of {non_blank} records ({invalid / non_blank:.1%}) are invalid, more than "
            f"ingest.max_reject_fraction={settings.max_reject_fraction}: {dict(by_reason)}. First ones:\n"
            + "\n".join(first_rejects)
            + f"\nAll of them are in {out_dir / 'rejects.jsonl'}. Fix the data, or raise the limit."
        )

    summary = {
        "tasks": {name: s.as_dict() for name, s in all_stats.items()},
        "totals": {
            "lines": total_lines,
            "rejected": invalid,
            "duplicates": sum(s.duplicates for s in all_stats.values()),
            "contaminated": sum(s.contaminated for s in all_stats.values()),
            "train": sum(s.train for s in all_stats.values()),
            "valid": sum(s.valid for s in all_stats.values()),
        },
        "decontamination": "on" if decontaminator is not None else "off",
    }
    (out_dir / "tasks.json").write_text(json.dumps(tasks_meta, indent=1) + "\n")
    (out_dir / "stats.json").write_text(json.dumps(summary, indent=1) + "\n")
    for name, s in all_stats.items():
        if s.rejected:
            log.warning("task %s: %d invalid records skipped: %s", name, sum(s.rejected.values()), dict(s.rejected))
    return summary


def read_tasks(ingest_dir: Path) -> list[dict[str, Any]]:
    return json.loads((ingest_dir / "tasks.json").read_text())
