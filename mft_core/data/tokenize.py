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

A preference task's shards (`"kind": "preference"` in shards.json) hold its pairs: rows 2p and
2p + 1 are pair p's chosen and rejected sides, rendered as fine-tuning renders a conversation,
with only the final answer trained; a pair fits one row whole (`fit_pair`). Its stats count pairs.

Work is cut into chunks by input size (`shard_size_mb`) along Parquet row groups, planned before
any worker starts, so the output is the same whatever the number of workers. Each chunk is one
shard, published atomically; a killed run keeps its finished shards and the rerun (same key)
only does the rest. Memory per worker is one row group plus one shard.

packing "concatenated" (continued pretraining, MFTCoder's mpt): the chunks' shards hold whole
records (documents/<split>/..., rendered as MFTCoder's pretrain mode: no role markers, every token
trained), then one pass per task and split joins them into a stream and cuts it into windows of
seq_length tokens, each starting at the previous window's last token: every token of the stream
but the first is a target exactly once, as in MFTCoder's windows of seq_length + 1 with stride
seq_length. The rest after the last full window is the last, shorter window. The window shards
are the output's <split>/<task>-<NNNNN>.arrow; documents/ goes once they are written.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import shutil
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
from mft_core.data.render import (
    PRETRAIN_MARKERS,
    FitStatus,
    RenderedSample,
    fit_to_length,
    generation_chat_template,
    make_template,
    render_records,
)
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
    preference: bool = False  # a preference task: its shard holds pairs (chosen, rejected, chosen, ...)

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
                chunks.append(Chunk(split, task["name"], task["id"], rel, group, start, min(rows, start + step), index,
                                    preference=task.get("kind") == "preference"))
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


DOCUMENTS = "documents"  # concatenated packing: the whole records, before they are cut into windows


def _init_worker(tokenizer_dir: str, template_name: str, role_markers: dict | None, eos_id: int,
                 seq_length: int, policy: str, ingest_dir: str, out_dir: str, trust_remote_code: bool,
                 packing: str) -> None:
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
        eos_id=eos_id, seq_length=seq_length, policy=policy, concatenated=packing == "concatenated",
        ingest_dir=Path(ingest_dir), out_dir=Path(out_dir),
    )


def pair_records(record: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A preference record -> the chosen and the rejected conversation, as chat records: rendered
    exactly as fine-tuning renders a conversation, so the aligned model keeps its chat format."""
    def side(answer: str) -> dict[str, Any]:
        return {"shape": "chat", "messages": [*record["messages"], {"role": "assistant", "content": answer}], "text": None}

    return side(record["chosen"]), side(record["rejected"])


def final_answer_only(sample: RenderedSample) -> RenderedSample:
    """Only the last assistant answer trained: a preference pair compares that answer alone (the
    rounds before it are the same on both sides, and are context)."""
    if len(sample.round_ends) < 2:
        return sample
    start = sample.round_ends[-2]
    return RenderedSample(sample.input_ids, [0] * start + sample.loss_mask[start:], sample.round_ends)


def fit_pair(chosen: RenderedSample, rejected: RenderedSample, seq_length: int, policy: str
             ) -> tuple[tuple[RenderedSample, RenderedSample] | None, FitStatus]:
    """A pair is packed whole into one row: both sides together fit seq_length. Over it, `drop`
    drops the pair and `truncate` cuts the end of each longer side to half a row (the pair is
    dropped when a side keeps no trained token)."""
    if len(chosen) + len(rejected) <= seq_length:
        return (chosen, rejected), FitStatus.KEPT
    if policy == "drop":
        return None, FitStatus.DROPPED
    half = seq_length // 2
    cut = [RenderedSample(s.input_ids[:half], s.loss_mask[:half], [min(e, half) for e in s.round_ends]) for s in (chosen, rejected)]
    if not all(any(s.loss_mask[1:]) for s in cut):
        return None, FitStatus.DROPPED
    return (cut[0], cut[1]), FitStatus.TRUNCATED


class _ShardRows:
    """What one chunk's shard accumulates: the samples' token ids, loss masks, lengths and sources,
    and the stats (samples, tokens, the length histogram, kept / truncated / dropped)."""

    def __init__(self, seq_length: int):
        self.stats = _empty_stats(seq_length)
        self.ids: list[int] = []
        self.mask: list[int] = []
        self.lengths: list[int] = []
        self.sources: list[str] = []

    def add(self, sides: list[RenderedSample], source: str) -> None:
        """One sample, or a preference pair's two sides (consecutive rows, counted as one sample)."""
        length = sum(len(side) for side in sides)
        stats = self.stats
        stats["samples"] += 1
        stats["tokens"] += length
        stats["trained_tokens"] += sum(side.num_trained for side in sides)
        stats["histogram"]["counts"][min(HISTOGRAM_BINS - 1, (length - 1) // stats["histogram"]["bin_width"])] += 1
        for side in sides:
            self.ids.extend(side.input_ids)
            self.mask.extend(side.loss_mask)
            self.lengths.append(len(side))
            self.sources.append(source)

    def write(self, base: Path, chunk: Chunk) -> str:
        _write_shard(base / chunk.shard_name, _shard_columns(self.ids, self.mask, self.lengths, chunk.task_id, self.sources),
                     {"chunk": asdict(chunk), "stats": self.stats})
        return chunk.shard_name


def _chunk_records(chunk: Chunk, columns: list[str]) -> list[dict[str, Any]]:
    table = pq.ParquetFile(_WORKER["ingest_dir"] / chunk.source_file).read_row_group(chunk.row_group, columns=columns)
    return table.slice(chunk.start, chunk.stop - chunk.start).to_pylist()


def _tokenize_chunk(chunk: Chunk) -> str:
    w = _WORKER
    if chunk.preference:
        return _tokenize_pairs(chunk)
    records = _chunk_records(chunk, ["shape", "messages", "text", "source"])
    shard = _ShardRows(w["seq_length"])
    for begin in range(0, len(records), RENDER_BATCH):
        batch = records[begin : begin + RENDER_BATCH]
        for record, sample in zip(batch, render_records(batch, w["tokenizer"], w["template"], w["eos_id"])):
            if w["concatenated"]:  # a whole document of the stream, every token trained: windows cut it later
                fitted, status = RenderedSample(sample.input_ids, [1] * len(sample), sample.round_ends), FitStatus.KEPT
            else:
                fitted, status = fit_to_length(sample, w["seq_length"], w["policy"])
            shard.stats[status.value] += 1
            if fitted is None:
                log.debug("dropped over-length sample %s (%d tokens)", record["source"], len(sample))
                continue
            shard.add([fitted], record["source"])
    return shard.write(w["out_dir"] / DOCUMENTS if w["concatenated"] else w["out_dir"], chunk)


def _tokenize_pairs(chunk: Chunk) -> str:
    """A preference chunk -> a shard of pairs: rows 2p and 2p + 1 are pair p's chosen and rejected
    sides, each with only its final answer trained. Stats count pairs (samples) and both sides' tokens."""
    w = _WORKER
    records = _chunk_records(chunk, ["messages", "source", "chosen", "rejected"])
    shard = _ShardRows(w["seq_length"])
    for begin in range(0, len(records), RENDER_BATCH):
        batch = records[begin : begin + RENDER_BATCH]
        sides = [side for record in batch for side in pair_records(record)]
        rendered = [final_answer_only(sample) for sample in render_records(sides, w["tokenizer"], w["template"], w["eos_id"])]
        for index, record in enumerate(batch):
            fitted, status = fit_pair(rendered[2 * index], rendered[2 * index + 1], w["seq_length"], w["policy"])
            shard.stats[status.value] += 1
            if fitted is not None:
                shard.add(list(fitted), record["source"])
    return shard.write(w["out_dir"], chunk)


def tokenize_chunk_task(init_args: tuple, chunk: Chunk) -> tuple[str, float]:
    """One chunk as a Ray task on any node: (shard name, the worker's peak memory in MB). A Ray
    worker process runs many tasks: its tokenizer is loaded by the first one with these settings."""
    from mft_core.train.metrics import peak_rss_mb

    if _WORKER.get("init_args") != init_args:
        _init_worker(*init_args)
        _WORKER["init_args"] = init_args
    return _tokenize_chunk(chunk), peak_rss_mb()


def _tokenize_on_cluster(cfg: PipelineConfig, init_args: tuple, pending: list[Chunk]) -> None:
    """The chunks as Ray tasks (cluster: section): each writes its shard into the work folder on
    shared storage, atomically, so a task run again after its node was lost writes the same bytes.
    The nodes were checked by the preflight (mft_core.cluster.check_nodes)."""
    from mft_core.cluster import run_tasks

    peak = finished = 0

    def done(index: int, result: tuple[str, float]) -> None:
        nonlocal peak, finished
        peak, finished = max(peak, result[1]), finished + 1
        log.info("tokenized %s (%d/%d) on the cluster", result[0], finished, len(pending))

    run_tasks(cfg.cluster, tokenize_chunk_task, [(init_args, chunk) for chunk in pending], on_done=done)
    announce(log, "tokenize", f"{len(pending)} shard(s) done on the cluster; peak memory of a Ray worker {peak:.0f} MB")


def _write_shard(out: Path, arrays: list[pa.Array], stats: dict[str, Any]) -> None:
    """out.arrow, then out.stats.json, each published atomically: the stats file, written last,
    means the shard is complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".arrow.tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, SHARD_SCHEMA) as writer:
        writer.write_table(pa.Table.from_arrays(arrays, schema=SHARD_SCHEMA))
    os.replace(tmp, out.with_name(out.name + ".arrow"))
    stats_tmp = out.with_name(out.name + ".stats.json.tmp")
    stats_tmp.write_text(json.dumps(stats) + "\n")
    os.replace(stats_tmp, out.with_name(out.name + ".stats.json"))


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


def _shard_done(base: Path, chunk: Chunk) -> bool:
    return (base / f"{chunk.shard_name}.stats.json").is_file() and (base / f"{chunk.shard_name}.arrow").is_file()


# ----------------------------------------------------------------------------- concatenated windows


def cut_windows(out_dir: Path, chunks: list[Chunk], seq_length: int, shard_size_mb: float
                ) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """The documents of each task and split, in chunk order, as one stream cut into windows of
    seq_length tokens, each starting at the previous one's last token (module docstring), written
    as window shards of about shard_size_mb. Returns (stats per task and split, shards.json rows).
    Memory: one documents shard and one window shard at a time."""
    per_shard = max(1, int(shard_size_mb * 1e6 // (5 * seq_length)))  # int32 id + uint8 mask per token
    stats: dict[str, dict[str, Any]] = {}
    shards: list[dict[str, Any]] = []
    for (task, split), group in itertools.groupby(chunks, key=lambda c: (c.task, c.split)):
        group = list(group)
        task_id = group[0].task_id
        split_stats = stats.setdefault(task, {s: _empty_stats(seq_length) for s in SPLITS})[split]
        width = split_stats["histogram"]["bin_width"]
        pending: list[tuple[np.ndarray, str]] = []  # windows not written yet: (ids, source)

        def flush() -> None:
            index = sum(1 for s in shards if s["task"] == task and s["split"] == split)
            name = f"{split}/{task}-{index:05d}"
            lengths = [len(ids) for ids, _ in pending]
            ids = np.concatenate([ids for ids, _ in pending])
            arrays = _shard_columns(ids, np.ones(len(ids), dtype=np.uint8), lengths, task_id, [s for _, s in pending])
            _write_shard(out_dir / name, arrays, {"windows": len(pending), "tokens": int(len(ids))})
            shards.append({"split": split, "task": task, "task_id": task_id, "file": f"{name}.arrow",
                           "rows": len(pending), "tokens": int(len(ids))})
            pending.clear()

        def emit(ids: np.ndarray, source: str) -> None:
            pending.append((ids, source))
            split_stats["samples"] += 1
            split_stats["tokens"] += len(ids)
            split_stats["trained_tokens"] += len(ids)
            split_stats["histogram"]["counts"][min(HISTOGRAM_BINS - 1, (len(ids) - 1) // width)] += 1
            if len(pending) == per_shard:
                flush()

        stream = np.zeros(0, dtype=np.int32)
        starts = np.zeros(0, dtype=np.int64)  # where each document of the stream starts
        sources: list[str] = []
        for chunk in group:
            table = open_shard(out_dir / DOCUMENTS / f"{chunk.shard_name}.arrow")
            column = table.column("input_ids").combine_chunks()
            offsets = column.offsets.to_numpy().astype(np.int64)
            starts = np.concatenate([starts, offsets[:-1] + len(stream)])
            stream = np.concatenate([stream, column.values.to_numpy()])
            sources += table.column("source").to_pylist()
            split_stats["kept"] += table.num_rows  # documents: every one kept whole across windows
            begin = 0
            while begin + seq_length <= len(stream):
                emit(stream[begin : begin + seq_length], _window_source(starts, sources, begin, begin + seq_length))
                begin += seq_length - 1
            # carried into the next chunk: the rest of the stream and the documents it holds
            first = max(0, int(np.searchsorted(starts, begin, side="right")) - 1)
            stream, starts, sources = stream[begin:], np.maximum(starts[first:] - begin, 0), sources[first:]
        if len(stream) >= 2:  # one token left is the last window's last: already predicted
            emit(stream, _window_source(starts, sources, 0, len(stream)))
        if pending:
            flush()
    return stats, shards


def _window_source(starts: np.ndarray, sources: list[str], begin: int, end: int) -> str:
    """The documents a window [begin, end) of the stream holds: `first`, or `first .. last`."""
    first = int(np.searchsorted(starts, begin, side="right")) - 1
    last = int(np.searchsorted(starts, end - 1, side="right")) - 1
    return sources[first] if first == last else f"{sources[first]} .. {sources[last]}"


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
    if cfg.tokenize.packing == "concatenated":  # no effect there: MFTCoder's pretrain rendering, nothing cut
        for key in ("template", "role_markers", "overlength"):
            section.pop(key)
    return section, [f"tokenizer:{tokenizer_content_hash(tokenizer_folder(cfg))}"]


def run_tokenize(cfg: PipelineConfig, ingest_dir: Path, out_dir: Path) -> dict[str, Any]:
    settings = cfg.tokenize
    tok_dir = tokenizer_folder(cfg)
    tokenizer = load_tokenizer(tok_dir, cfg.model.trust_remote_code)
    model_config = tok_dir / "config.json"  # absent when only the tokenizer was extracted
    eos_id, pad_id = resolve_special_tokens(
        tokenizer, json.loads(model_config.read_text()) if model_config.is_file() else None
    )
    concatenated = settings.packing == "concatenated"
    # Continued pretraining renders as MFTCoder's pretrain mode: the mftcoder template without markers.
    template_name, markers = ("mftcoder", PRETRAIN_MARKERS) if concatenated else (settings.template, settings.role_markers)
    template = make_template(template_name, markers)

    chunks = plan_chunks(ingest_dir, settings.shard_size_mb)
    base = out_dir / DOCUMENTS if concatenated else out_dir
    pending = [c for c in chunks if not _shard_done(base, c)]
    if len(pending) < len(chunks):
        log.info("resuming: %d of %d shards are already done", len(chunks) - len(pending), len(chunks))
    workers = min(settings.num_workers or os.cpu_count() or 1, max(1, len(pending)))
    where = f"{workers} worker(s)"
    if cfg.cluster is not None:
        from mft_core.cluster import driver_description

        where = f"Ray tasks on the {driver_description(cfg.cluster)}"
    rendering = "concatenated windows, no markers" if concatenated else f"template {template_name}"
    announce(log, "tokenize", f"start: {len(pending)} shard(s) with {where}, {rendering}, "
                              f"seq_length {settings.seq_length}")
    init_args = (str(tok_dir), template_name, markers, eos_id, settings.seq_length,
                 settings.overlength, str(ingest_dir), str(out_dir), cfg.model.trust_remote_code, settings.packing)
    if cfg.cluster is not None:
        _tokenize_on_cluster(cfg, init_args, pending)
    elif workers == 1:
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

    if concatenated:
        stats, shards = cut_windows(out_dir, chunks, settings.seq_length, settings.shard_size_mb)
    else:
        stats, shards = {}, []
        for chunk in chunks:
            part = json.loads((out_dir / f"{chunk.shard_name}.stats.json").read_text())["stats"]
            task_stats = stats.setdefault(chunk.task, {split: _empty_stats(settings.seq_length) for split in SPLITS})
            _add_stats(task_stats[chunk.split], part)
            shards.append({"split": chunk.split, "task": chunk.task, "task_id": chunk.task_id,
                           "file": f"{chunk.shard_name}.arrow", "rows": part["samples"] * (2 if chunk.preference else 1),
                           "tokens": part["tokens"], **({"kind": "preference"} if chunk.preference else {})})

    tokenizer.chat_template = (
        generation_chat_template(template, tokenizer.convert_ids_to_tokens(eos_id))
        if template_name == "mftcoder" else tokenizer.chat_template
    )
    tokenizer.save_pretrained(out_dir / "tokenizer")
    (out_dir / "template.json").write_text(json.dumps({
        "template": template_name,
        "role_markers": asdict(template) if template_name == "mftcoder" else None,
        "eos_id": eos_id, "pad_id": pad_id, "seq_length": settings.seq_length, "overlength": settings.overlength,
        "packing": settings.packing,
    }, indent=1) + "\n")
    (out_dir / "shards.json").write_text(json.dumps(shards, indent=1) + "\n")
    summary = {"tasks": stats, "seq_length": settings.seq_length, "shards": len(shards), "packing": settings.packing}
    (out_dir / "stats.json").write_text(json.dumps(summary, indent=1) + "\n")
    if (out_dir / DOCUMENTS).exists():  # concatenated: cut into windows, no part of the output
        shutil.rmtree(out_dir / DOCUMENTS)
    return summary


def open_shard(path: Path) -> pa.Table:
    """A shard, memory-mapped (zero-copy)."""
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all()
