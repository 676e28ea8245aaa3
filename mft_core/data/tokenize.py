"""Tokenize stage: ingest's Parquet records -> Arrow shards of token ids, loss masks and task ids.

Output directory:
  tokenizer/                  the tokenizer, its chat template set to reproduce the training prompt
  template.json               template name, role markers, eos/pad ids, seq_length, policy
  shards.json                 every shard: split, task, file, rows, tokens
  stats.json                  per task and split: samples, tokens, trained tokens, kept,
                              truncated, dropped, length histogram
  <split>/<task>-<NNNNN>.arrow   Arrow IPC stream files, columns:
      input_ids list<int32>, loss_mask list<uint8>, task_id int16, length int32, source string
  <split>/<task>-<NNNNN>.stats.json   per-shard stats (written last: the shard's "done" marker)

Work is cut into chunks by input size (`shard_size_mb`) along Parquet row groups, planned before
any worker starts, so the output is the same whatever the number of workers. Each chunk is one
shard, published atomically; a killed run keeps its finished shards and the rerun (same key)
only does the rest. Memory per worker is one row group plus one shard.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mft_core.config import PipelineConfig
from mft_core.console import announce
from mft_core.data.ingest import read_tasks
from mft_core.data.render import fit_to_length, generation_chat_template, make_template, render_records
from mft_core.modeling import load_tokenizer, resolve_special_tokens, resolve_tokenizer_folder, tokenizer_content_hash

log = logging.getLogger("mft.tokenize")

STAGE_VERSION = 2  # 2: pair records tokenized as MFTCoder tokenizes pairs (one prompt piece, nothing after EOS)
SPLITS = ("train", "valid")
HISTOGRAM_BINS = 16
RENDER_BATCH = 256

SHARD_SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("loss_mask", pa.list_(pa.uint8())),
        ("task_id", pa.int16()),
        ("length", pa.int32()),
        ("source", pa.string()),
    ]
)


@dataclass(frozen=True)
class Chunk:
    """A contiguous slice of one row group of one task's split file; becomes one shard."""

    split: str
    task: str
    task_id: int
    source_file: str  # relative to the ingest directory
    row_group: int
    start: int
    stop: int
    index: int  # shard number within (split, task)

    @property
    def shard_name(self) -> str:
        return f"{self.split}/{self.task}-{self.index:05d}"


MIN_CHUNKS = 16


def plan_chunks(ingest_dir: Path, shard_size_mb: float) -> list[Chunk]:
    """Cut every task's train and valid files into chunks of about `shard_size_mb` of input,
    and into at least about MIN_CHUNKS chunks in all, so that small inputs still keep every
    worker busy. The plan depends on the data only, never on the number of workers."""
    files = [(task, split, f"data/{task['name']}/{split}.parquet") for task in read_tasks(ingest_dir) for split in SPLITS]
    metas = {rel: pq.ParquetFile(ingest_dir / rel).metadata for _, _, rel in files}
    total = sum(m.row_group(g).total_byte_size for m in metas.values() for g in range(m.num_row_groups))
    target = min(shard_size_mb * 1e6, max(1.0, total / MIN_CHUNKS))
    chunks: list[Chunk] = []
    for task, split, rel in files:
        meta = metas[rel]
        index = 0
        for group in range(meta.num_row_groups):
            rows = meta.row_group(group).num_rows
            pieces = max(1, math.ceil(meta.row_group(group).total_byte_size / target))
            step = max(1, math.ceil(rows / pieces))
            for start in range(0, rows, step):
                chunks.append(Chunk(split, task["name"], task["id"], rel, group, start, min(rows, start + step), index))
                index += 1
    return chunks


def _empty_stats(seq_length: int) -> dict[str, Any]:
    return {
        "samples": 0, "tokens": 0, "trained_tokens": 0, "kept": 0, "truncated": 0, "dropped": 0,
        "histogram": {"bin_width": math.ceil(seq_length / HISTOGRAM_BINS), "counts": [0] * HISTOGRAM_BINS},
    }


def _add_stats(total: dict[str, Any], part: dict[str, Any]) -> None:
    for key in ("samples", "tokens", "trained_tokens", "kept", "truncated", "dropped"):
        total[key] += part[key]
    total["histogram"]["counts"] = [a + b for a, b in zip(total["histogram"]["counts"], part["histogram"]["counts"])]


# ----------------------------------------------------------------------------- worker side

_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_dir: str, template_name: str, role_markers: dict | None, eos_id: int,
                 seq_length: int, policy: str, ingest_dir: str, out_dir: str, trust_remote_code: bool) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process = one core; no nested threads
    tokenizer_json = Path(tokenizer_dir) / "tokenizer.json"
    if template_name == "mftcoder" and tokenizer_json.is_file():
        # The mftcoder rendering only batch-encodes text pieces: the bare Rust tokenizer gives
        # the same ids and spares each worker the transformers import (seconds per process).
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_json))
    else:
        tokenizer = load_tokenizer(Path(tokenizer_dir), trust_remote_code)
    _WORKER.update(
        tokenizer=tokenizer,
        template=make_template(template_name, role_markers),
        eos_id=eos_id, seq_length=seq_length, policy=policy,
        ingest_dir=Path(ingest_dir), out_dir=Path(out_dir),
    )


def _tokenize_chunk(chunk: Chunk) -> str:
    w = _WORKER
    table = pq.ParquetFile(w["ingest_dir"] / chunk.source_file).read_row_group(
        chunk.row_group, columns=["shape", "messages", "text", "source"]
    ).slice(chunk.start, chunk.stop - chunk.start)
    records = table.to_pylist()
    stats = _empty_stats(w["seq_length"])
    ids: list[int] = []
    mask: list[int] = []
    lengths: list[int] = []
    sources: list[str] = []
    width = stats["histogram"]["bin_width"]
    for begin in range(0, len(records), RENDER_BATCH):
        batch = records[begin : begin + RENDER_BATCH]
        for record, sample in zip(batch, render_records(batch, w["tokenizer"], w["template"], w["eos_id"])):
            fitted, status = fit_to_length(sample, w["seq_length"], w["policy"])
            stats[status.value] += 1
            if fitted is None:
                log.debug("dropped over-length sample %s (%d tokens)", record["source"], len(sample))
                continue
            length = len(fitted.input_ids)
            stats["samples"] += 1
            stats["tokens"] += length
            stats["trained_tokens"] += fitted.num_trained
            stats["histogram"]["counts"][min(HISTOGRAM_BINS - 1, (length - 1) // width)] += 1
            ids.extend(fitted.input_ids)
            mask.extend(fitted.loss_mask)
            lengths.append(length)
            sources.append(record["source"])

    out = w["out_dir"] / chunk.shard_name
    out.parent.mkdir(parents=True, exist_ok=True)
    arrays = _shard_columns(ids, mask, lengths, chunk.task_id, sources)
    tmp = out.with_name(out.name + ".arrow.tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, SHARD_SCHEMA) as writer:
        writer.write_table(pa.Table.from_arrays(arrays, schema=SHARD_SCHEMA))
    os.replace(tmp, out.with_name(out.name + ".arrow"))
    # The stats file is written last: its presence means the shard is complete.
    stats_tmp = out.with_name(out.name + ".stats.json.tmp")
    stats_tmp.write_text(json.dumps({"chunk": asdict(chunk), "stats": stats}) + "\n")
    os.replace(stats_tmp, out.with_name(out.name + ".stats.json"))
    return chunk.shard_name


def _from_numpy(values: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
    # Built from buffers: pa.array() imports pandas (a third of a second per worker process).
    return pa.Array.from_buffers(arrow_type, len(values), [None, pa.py_buffer(values)])


def _shard_columns(ids: list[int], mask: list[int], lengths: list[int], task_id: int, sources: list[str]) -> list[pa.Array]:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    encoded = [s.encode("utf-8") for s in sources]
    text_offsets = np.zeros(len(encoded) + 1, dtype=np.int32)
    np.cumsum([len(b) for b in encoded], out=text_offsets[1:])
    arrow_offsets = _from_numpy(offsets, pa.int32())
    return [
        pa.ListArray.from_arrays(arrow_offsets, _from_numpy(np.array(ids, dtype=np.int32), pa.int32())),
        pa.ListArray.from_arrays(arrow_offsets, _from_numpy(np.array(mask, dtype=np.uint8), pa.uint8())),
        _from_numpy(np.full(len(lengths), task_id, dtype=np.int16), pa.int16()),
        _from_numpy(np.array(lengths, dtype=np.int32), pa.int32()),
        pa.Array.from_buffers(pa.string(), len(encoded), [None, pa.py_buffer(text_offsets), pa.py_buffer(b"".join(encoded))]),
    ]


def _shard_done(out_dir: Path, chunk: Chunk) -> bool:
    return (out_dir / f"{chunk.shard_name}.stats.json").is_file() and (out_dir / f"{chunk.shard_name}.arrow").is_file()


# ----------------------------------------------------------------------------- stage


def tokenizer_folder(cfg: PipelineConfig) -> Path:
    return resolve_tokenizer_folder(cfg.model.path, cfg.runs_root)


def tokenize_key_parts(cfg: PipelineConfig) -> tuple[dict[str, Any], list[str]]:
    """The key: the tokenize section without num_workers and shard_size_mb (the samples, their
    order and their tokens do not depend on them: only how they are cut into files) and the
    tokenizer's content hash (not its path)."""
    section = cfg.stage_section("tokenize")
    section.pop("num_workers")
    section.pop("shard_size_mb")
    return section, [f"tokenizer:{tokenizer_content_hash(tokenizer_folder(cfg))}"]


def run_tokenize(cfg: PipelineConfig, ingest_dir: Path, out_dir: Path) -> dict[str, Any]:
    settings = cfg.tokenize
    tok_dir = tokenizer_folder(cfg)
    tokenizer = load_tokenizer(tok_dir, cfg.model.trust_remote_code)
    model_config = tok_dir / "config.json"  # absent when only the tokenizer was extracted
    eos_id, pad_id = resolve_special_tokens(
        tokenizer, json.loads(model_config.read_text()) if model_config.is_file() else None
    )
    template = make_template(settings.template, settings.role_markers)

    chunks = plan_chunks(ingest_dir, settings.shard_size_mb)
    pending = [c for c in chunks if not _shard_done(out_dir, c)]
    if len(pending) < len(chunks):
        log.info("resuming: %d of %d shards are already done", len(chunks) - len(pending), len(chunks))
    workers = min(settings.num_workers or os.cpu_count() or 1, max(1, len(pending)))
    announce(log, "tokenize", f"start: {len(pending)} shard(s) with {workers} worker(s), template {settings.template}, "
                              f"seq_length {settings.seq_length}")
    init_args = (str(tok_dir), settings.template, settings.role_markers, eos_id, settings.seq_length,
                 settings.overlength, str(ingest_dir), str(out_dir), cfg.model.trust_remote_code)
    if workers == 1:
        _init_worker(*init_args)
        for done, chunk in enumerate(pending, 1):
            _tokenize_chunk(chunk)
            log.info("tokenized %s (%d/%d)", chunk.shard_name, done, len(pending))
    else:
        # spawn, not fork: the parent has loaded a tokenizer with its own thread pool.
        context = multiprocessing.get_context("spawn")
        with context.Pool(workers, initializer=_init_worker, initargs=init_args) as pool:
            for done, name in enumerate(pool.imap_unordered(_tokenize_chunk, pending), 1):
                log.info("tokenized %s (%d/%d)", name, done, len(pending))

    stats: dict[str, dict[str, Any]] = {}
    shards = []
    for chunk in chunks:
        part = json.loads((out_dir / f"{chunk.shard_name}.stats.json").read_text())["stats"]
        task_stats = stats.setdefault(chunk.task, {split: _empty_stats(settings.seq_length) for split in SPLITS})
        _add_stats(task_stats[chunk.split], part)
        shards.append({"split": chunk.split, "task": chunk.task, "task_id": chunk.task_id,
                       "file": f"{chunk.shard_name}.arrow", "rows": part["samples"], "tokens": part["tokens"]})

    tokenizer.chat_template = (
        generation_chat_template(template, tokenizer.convert_ids_to_tokens(eos_id))
        if settings.template == "mftcoder" else tokenizer.chat_template
    )
    tokenizer.save_pretrained(out_dir / "tokenizer")
    (out_dir / "template.json").write_text(json.dumps({
        "template": settings.template,
        "role_markers": asdict(template) if settings.template == "mftcoder" else None,
        "eos_id": eos_id, "pad_id": pad_id, "seq_length": settings.seq_length, "overlength": settings.overlength,
    }, indent=1) + "\n")
    (out_dir / "shards.json").write_text(json.dumps(shards, indent=1) + "\n")
    summary = {"tasks": stats, "seq_length": settings.seq_length, "shards": len(chunks)}
    (out_dir / "stats.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def open_shard(path: Path) -> pa.Table:
    """A shard, memory-mapped (zero-copy)."""
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all()
