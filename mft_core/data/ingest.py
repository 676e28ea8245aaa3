"""Ingest stage: raw JSONL (one directory or file per task) -> validated, normalized,
deduplicated, decontaminated records per task, split into train and valid Parquet files.

Output directory:
  tasks.json              [{name, id, path, files, train, valid}]  (task ids = order in the config)
  stats.json              per task: lines, blank lines, accepted, rejects by reason, duplicates,
                          contaminated, train, valid; and totals
  rejects.jsonl           every line that was not kept: source file:line, reason, detail, excerpt
  data/<task>/train.parquet, data/<task>/valid.parquet
      columns: task, task_id (int16), messages (list<struct<role, content>>), text, source
               ("path:line"), record_hash (hex sha256 of the canonical content)

Memory stays bounded whatever the input size: records stream from file to Parquet row groups.
The only state that grows is the dedup set (one 64-bit fingerprint per unique record).
"""

from __future__ import annotations

import gzip
import hashlib
import heapq
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mft_core.config import PipelineConfig
from mft_core.data.records import REJECT_FIXES, RecordError, parse_line, record_fingerprint, record_text
from mft_core.store import FileHashCache, sha256_file

log = logging.getLogger("mft.ingest")

STAGE_VERSION = 1
_BOM = b"\xef\xbb\xbf"
_EXCERPT = 160

RECORD_SCHEMA = pa.schema(
    [
        ("task", pa.string()),
        ("task_id", pa.int16()),
        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("text", pa.string()),
        ("source", pa.string()),
        ("record_hash", pa.string()),
    ]
)


class IngestError(RuntimeError):
    """Ingest cannot produce a trustworthy output; the message says where and how to fix it."""


def task_files(path: Path) -> list[Path]:
    """A task is one file, or every **/*.jsonl and **/*.jsonl.gz below a directory, sorted."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise IngestError(f"task path {path} does not exist (fix data.tasks[].path in the config)")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith((".jsonl", ".jsonl.gz")))
    if not files:
        raise IngestError(f"task directory {path} holds no *.jsonl or *.jsonl.gz file")
    return files


def read_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line bytes without CR/LF) of a .jsonl or .jsonl.gz file; a UTF-8 BOM
    on the first line is dropped."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            yield lineno, raw.rstrip(b"\r\n")


def split_score(record_hash: bytes, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the record's content: adding records never moves the
    others between train and valid."""
    digest = hashlib.sha256(seed.to_bytes(8, "little", signed=True) + record_hash).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


class _ParquetSink:
    """Rows buffered up to one row group, then written: bounded memory."""

    def __init__(self, path: Path, row_group_size: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = pq.ParquetWriter(path, RECORD_SCHEMA, compression="zstd")
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
            columns = [pa.array([row[f.name] for row in self.rows], type=f.type) for f in RECORD_SCHEMA]
            self.writer.write_table(pa.Table.from_arrays(columns, schema=RECORD_SCHEMA))
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
    """The n-gram decontaminator over the benchmark texts, or None (with a notice) when disabled
    or when no benchmark data is found."""
    if not cfg.ingest.decontaminate.enabled:
        return None
    from mft_core.data.decontam import Decontaminator

    directory = cfg.resolved_humaneval_dir()
    decontaminator = Decontaminator.from_humaneval(directory, n=cfg.ingest.decontaminate.ngram) if directory else None
    if decontaminator is None:
        log.warning(
            "decontamination is on but no HumanEval-X data was found (humaneval_dir / $MFT_HUMANEVAL_X_DIR); "
            "records are NOT decontaminated"
        )
    return decontaminator


def benchmark_digest(cfg: PipelineConfig) -> str:
    """Content hash of the decontamination reference, so new benchmark data recomputes ingest."""
    if not cfg.ingest.decontaminate.enabled:
        return "decontamination-off"
    directory = cfg.resolved_humaneval_dir()
    if directory is None:
        return "no-benchmark-data"
    h = hashlib.sha256()
    for path in sorted(directory.glob("*/*.jsonl.gz")):
        h.update(path.relative_to(directory).as_posix().encode() + b"\0" + sha256_file(path).encode())
    return h.hexdigest()


def ingest_key_parts(cfg: PipelineConfig, hashes: FileHashCache) -> tuple[dict[str, Any], list[str]]:
    """(config part, input content digests) of the ingest stage key. Paths enter only relative to
    their task, so moving the project does not change the key; file content always does."""
    config = {
        "ingest": cfg.stage_section("ingest"),
        "tasks": [t.task_name for t in cfg.data.tasks],
    }
    inputs = [f"benchmark:{benchmark_digest(cfg)}"]
    for task in cfg.data.tasks:
        for path in task_files(task.path):
            rel = path.name if task.path.is_file() else path.relative_to(task.path).as_posix()
            inputs.append(f"{task.task_name}/{rel}:{hashes.digest(path)}")
    hashes.save()
    return config, inputs


def _excerpt(raw: bytes) -> str:
    text = raw[: _EXCERPT * 4].decode("utf-8", errors="replace")
    return text[:_EXCERPT] + ("…" if len(text) > _EXCERPT or len(raw) > _EXCERPT * 4 else "")


def run_ingest(cfg: PipelineConfig, out_dir: Path) -> dict[str, Any]:
    """Build the ingest output into `out_dir` (an empty work directory). Returns stats.json's content."""
    settings = cfg.ingest
    decontaminator = _load_decontaminator(cfg)
    seen: set[int] = set()
    all_stats: dict[str, TaskStats] = {}
    tasks_meta: list[dict[str, Any]] = []
    total_lines = 0
    first_rejects: list[str] = []

    with open(out_dir / "rejects.jsonl", "w", encoding="utf-8") as rejects:

        def reject(stats: TaskStats, source: str, reason: str, detail: str, raw: bytes, kind: str) -> None:
            if kind == "invalid" and len(first_rejects) < 5:
                first_rejects.append(f"  {source}: {reason}: {detail}")
            rejects.write(
                json.dumps(
                    {"source": source, "kind": kind, "reason": reason, "detail": detail, "excerpt": _excerpt(raw)},
                    ensure_ascii=False,
                )
                + "\n"
            )

        for task_id, task in enumerate(cfg.data.tasks):
            name = task.task_name
            stats = all_stats[name] = TaskStats()
            files = task_files(task.path)
            stats.files = len(files)
            sinks = {
                split: _ParquetSink(out_dir / "data" / name / f"{split}.parquet", settings.row_group_size)
                for split in ("train", "valid")
            }
            # The min_valid lowest-scoring train candidates are held back (a max-heap of
            # (-score, n, row)), so that a task whose hash split gives too few validation
            # records can be topped up at the end without a second pass over the data.
            held: list[tuple[float, int, dict[str, Any]]] = []
            for path in files:
                shown = cfg.display_path(path)
                for lineno, raw in read_lines(path):
                    stats.lines += 1
                    source = f"{shown}:{lineno}"
                    if not raw.strip():
                        stats.blank_lines += 1
                        continue
                    try:
                        record = parse_line(raw)
                    except RecordError as err:
                        if settings.on_error == "fail":
                            raise IngestError(
                                f"{path}:{lineno}: invalid record ({err.reason}): {err.detail}. "
                                f"Fix: {REJECT_FIXES[err.reason]}. To skip invalid records instead, set "
                                "ingest.on_error=skip (they are then counted and listed in rejects.jsonl)."
                            ) from None
                        stats.rejected[err.reason] += 1
                        reject(stats, source, err.reason, err.detail, raw, "invalid")
                        continue
                    fingerprint = record_fingerprint(record)
                    if settings.dedup:
                        short = int.from_bytes(fingerprint[:8], "little")
                        if short in seen:
                            stats.duplicates += 1
                            reject(stats, source, "duplicate", "exact duplicate of an earlier record", raw, "filtered")
                            continue
                        seen.add(short)
                    if decontaminator is not None and decontaminator.contaminated(record_text(record)):
                        stats.contaminated += 1
                        problems = ", ".join(decontaminator.matches(record_text(record))[:5])
                        reject(stats, source, "contaminated", f"overlaps HumanEval-X {problems}", raw, "filtered")
                        continue
                    stats.accepted += 1
                    row = {
                        "task": name,
                        "task_id": task_id,
                        "messages": record["messages"],
                        "text": record["text"],
                        "source": source,
                        "record_hash": fingerprint.hex(),
                    }
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
            need = max(0, settings.min_valid - sinks["valid"].count)
            for rank, (_, _, row) in enumerate(sorted(held, key=lambda item: (-item[0], item[1]))):
                sinks["valid" if rank < need else "train"].add(row)
            for sink in sinks.values():
                sink.close()
            stats.train, stats.valid = sinks["train"].count, sinks["valid"].count
            total_lines += stats.lines
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
