"""Tokenize throughput and packing efficiency on the demo data with the SmolLM2 tokenizer.

Baseline (the practical limit): the raw fast-tokenizer batch encode (`tokenizers`
`encode_batch`) of the same rendered texts, with the same number of processes, in the same run.
Both sides are timed end to end, process start-up included.
Packing: best-fit decreasing (ours) vs next-fit (MFTCoder's pack mode, last row kept) on the
real sample lengths.

    .venv/bin/python bench/tokenize.py [--workers 2] [--repeat 2]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, and this file would shadow the
# standard library's `tokenize` module: put the project root there instead.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import multiprocessing
import os
import resource
import shutil
import tempfile
import time

import pyarrow.parquet as pq  # noqa: E402

from bench.common import REPO, ensure_demo_data, save, table  # noqa: E402
from mft_core.config import load_config  # noqa: E402
from mft_core.data.pack import pack_best_fit_decreasing, pack_next_fit, packing_stats  # noqa: E402
from mft_core.data.render import _mftcoder_pieces, make_template  # noqa: E402
from mft_core.data.tokenize import open_shard, run_tokenize, tokenizer_folder  # noqa: E402
from mft_core.stages import run_stage  # noqa: E402

_TOKENIZER = None


def _init(path: str, threads: bool = False) -> None:
    global _TOKENIZER
    # Like the stage's workers: one process = one core, no rayon thread pool inside it.
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads else "false"
    from tokenizers import Tokenizer

    _TOKENIZER = Tokenizer.from_file(path)


def _encode(texts: list[str]) -> int:
    return sum(len(e.ids) for e in _TOKENIZER.encode_batch(texts, add_special_tokens=False))


def raw_batch_encode(texts: list[str], tokenizer_json: Path, workers: int) -> tuple[float, int]:
    """In `workers` fresh single-threaded processes (0: in this process, with the Rust thread pool)."""
    start = time.perf_counter()
    batches = [texts[i : i + 512] for i in range(0, len(texts), 512)]
    with multiprocessing.get_context("spawn").Pool(max(1, workers), _init, (str(tokenizer_json), workers == 0)) as pool:
        tokens = sum(pool.imap_unordered(_encode, batches))
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--scale", type=int, default=8,
                        help="also measure on the demo records repeated this many times (fixed start-up costs amortized)")
    args = parser.parse_args()
    results = {}
    for scale in sorted({1, args.scale}):
        results[f"x{scale}"] = measure(args, scale)
    path = save("tokenize", {"workers": args.workers, "baseline": "tokenizers encode_batch of the rendered texts, "
                             "same number of single-threaded processes", "runs": results})
    print(f"written {path}")


def replicate_ingest(ingest_dir: Path, scale: int) -> None:
    """Repeat every task's records `scale` times in place (benchmark only: bypasses dedup)."""
    import pyarrow as pa

    for path in ingest_dir.glob("data/*/*.parquet"):
        table = pq.read_table(path)
        pq.write_table(pa.concat_tables([table] * scale), path, row_group_size=8192)


def measure(args, scale: int) -> dict:

    ensure_demo_data(REPO / "demo-data")
    runs = Path(tempfile.mkdtemp(prefix="bench-tokenize-"))
    cfg = load_config(REPO / "pipeline.yaml", {"runs_root": str(runs), "tokenize.num_workers": args.workers})
    ingest_dir = run_stage(cfg, "ingest").directory
    if scale > 1:
        replicate_ingest(ingest_dir, scale)
    tok_json = tokenizer_folder(cfg) / "tokenizer.json"

    template = make_template()
    texts = []
    for path in sorted(ingest_dir.glob("data/*/*.parquet")):
        for record in pq.read_table(path, columns=["shape", "messages", "text"]).to_pylist():
            texts.append("".join(piece.text for piece in _mftcoder_pieces(record, template)))

    ours_s, base_s, base1_s = float("inf"), float("inf"), float("inf")
    for _ in range(args.repeat):
        out = runs / "out"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        start = time.perf_counter()
        stats = run_tokenize(cfg, ingest_dir, out)
        ours_s = min(ours_s, time.perf_counter() - start)
        seconds, base_tokens = raw_batch_encode(texts, tok_json, args.workers)
        base_s = min(base_s, seconds)
        base1_s = min(base1_s, raw_batch_encode(texts, tok_json, 0)[0])
    ours_tokens = sum(s["tokens"] for splits in stats["tasks"].values() for s in splits.values())
    child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    self_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    lengths = [n for shard in sorted((runs / "out" / "train").glob("*.arrow")) for n in open_shard(shard).column("length").to_pylist()]
    packing = {}
    for seq in (1024, 2048):
        bfd = packing_stats(pack_best_fit_decreasing(lengths, seq, seed=0), lengths, seq)
        nf = packing_stats(pack_next_fit(lengths, seq), lengths, seq)
        packing[seq] = {"best_fit_decreasing": bfd.efficiency, "next_fit": nf.efficiency, "rows_bfd": bfd.rows, "rows_next_fit": nf.rows}

    print(f"\n{len(texts)} records (demo x{scale}), {ours_tokens} tokens, {args.workers} workers (SmolLM2 tokenizer)")
    print(table(["what", "tokens/s", "vs raw encode"], [
        [f"raw batch encode, {args.workers} processes (baseline)", base_tokens / base_s, 1.0],
        ["raw batch encode, 1 process with Rust threads", base_tokens / base1_s, base_s / base1_s],
        [f"tokenize stage, {args.workers} workers", ours_tokens / ours_s, (ours_tokens / ours_s) / (base_tokens / base_s)],
    ]))
    print(f"peak RSS: bench process {self_rss:.0f} MB, largest worker {child_rss:.0f} MB")
    print(table(["seq_length", "best-fit decreasing", "next-fit", "rows BFD", "rows next-fit"],
                [[seq, p["best_fit_decreasing"], p["next_fit"], p["rows_bfd"], p["rows_next_fit"]] for seq, p in packing.items()]))
    shutil.rmtree(runs, ignore_errors=True)
    return {
        "records": len(texts), "tokens": ours_tokens,
        "tokens_per_s": {"ours": ours_tokens / ours_s, "raw_encode": base_tokens / base_s, "raw_encode_1proc": base_tokens / base1_s},
        "ratio_vs_raw_encode": (ours_tokens / ours_s) / (base_tokens / base_s),
        "peak_rss_mb": {"bench": self_rss, "worker_max": child_rss},
        "packing_efficiency": packing,
    }


if __name__ == "__main__":
    main()
