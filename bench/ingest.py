"""Ingest throughput on the demo data: our stage (validate, normalize, dedup, decontaminate,
split, write Parquet) vs the floor of any JSONL reader, plain `json.loads` line by line over the
same files, in the same run. "full" is the default, helper processes as ingest.num_workers
chooses them on this machine; "one process" sets it to 0.

    .venv/bin/python bench/ingest.py [--repeat 3] [--copies 10]

--copies N ingests N copies of the demo data, each record's first content prefixed with its copy's
number so that none is a duplicate (10 copies: 44 MB).

It decontaminates against the benchmark mft_core/benchmark.py resolves (HumanEval-X, or the
Python HumanEval fallback; $MFT_HUMANEVAL_X_DIR picks a HumanEval-X folder) and says which.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

# The project root replaces this folder on sys.path (bench/tokenize.py would shadow the stdlib).
sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import REPO, best_time, ensure_demo_data, save, table  # noqa: E402
from mft_core.config import load_config  # noqa: E402
from mft_core.data.decontam import Decontaminator  # noqa: E402
from mft_core.data.ingest import run_ingest, task_files  # noqa: E402
from mft_core.data.ingest_pieces import LOCAL_PIECE_BYTES, local_workers, piece_plan  # noqa: E402


def json_loads_baseline(files: list[Path]) -> int:
    count = 0
    for path in files:
        with open(path, "rb") as fh:
            for line in fh:
                if line.strip():
                    json.loads(line)
                    count += 1
    return count


def unique_copies(files: list[Path], copies: int, out: Path) -> Path:
    """The records of `files`, `copies` times, each copy's first content prefixed with its number."""
    out.parent.mkdir(parents=True)
    with open(out, "w") as fh:
        for copy in range(copies):
            for path in files:
                for line in path.read_text().splitlines():
                    if line.strip():
                        fh.write(line.replace('"content": "', f'"content": "copy {copy}: ', 1) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--copies", type=int, default=1)
    args = parser.parse_args()

    data = ensure_demo_data(REPO / "demo-data")
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    cfg = load_config(REPO / "pipeline.yaml", {"runs_root": str(work / "runs")})
    if args.copies > 1:
        data = work / "copies"
        for task in cfg.data.tasks:
            task.path = unique_copies(task_files(task.path), args.copies, data / task.task_name / "data.jsonl")
    files = [f for task in cfg.data.tasks for f in task_files(task.path)]
    size_mb = sum(f.stat().st_size for f in files) / 1e6

    # What "full" decontaminates against (HumanEval-X, or the Python fallback: mft_core/benchmark.py),
    # said once, so that a run without benchmark data cannot pass for one with it.
    decontaminator = Decontaminator.from_humaneval(cfg.humaneval_dir, n=cfg.ingest.decontaminate.ngram)
    if decontaminator is None:
        sys.exit("no benchmark data: ingest would not decontaminate (`mft data humaneval-x`)")
    benchmark = (f"{cfg.benchmark().describe()}: {len(decontaminator.names)} items, "
                 f"{decontaminator.ngram_count} distinct {decontaminator.n}-grams")

    base_s, records = best_time(lambda: json_loads_baseline(files), args.repeat)

    def ours(decontaminate: bool, num_workers: int | None = None) -> float:
        variant = cfg.model_copy(deep=True)
        variant.ingest.decontaminate.enabled = decontaminate
        variant.ingest.num_workers = num_workers

        def once():
            out = Path(tempfile.mkdtemp(prefix="bench-ingest-out-"))
            try:
                return run_ingest(variant, out)
            finally:
                shutil.rmtree(out)

        seconds, _ = best_time(once, args.repeat)
        return seconds

    full_s = ours(True)
    one_process_s = ours(True, num_workers=0)
    no_decontam_s = ours(False)
    no_decontam_one_process_s = ours(False, num_workers=0)
    helpers = local_workers(cfg, piece_plan(cfg, LOCAL_PIECE_BYTES))
    rows = []
    for name, seconds in [("json.loads baseline", base_s), (f"ingest (full: {helpers} helper process(es))", full_s),
                          ("ingest (full), one process", one_process_s), ("ingest, no decontamination", no_decontam_s),
                          ("ingest, no decontamination, one process", no_decontam_one_process_s)]:
        rows.append([name, records / seconds, size_mb / seconds, base_s / seconds])
    print(f"{records} records, {size_mb:.1f} MB in {len(files)} files ({data})")
    print(f"decontaminating against {benchmark}")
    print(table(["what", "records/s", "MB/s", "speed vs baseline"], rows))
    path = save("ingest" if args.copies == 1 else f"ingest-x{args.copies}", {
        "records": records, "megabytes": size_mb, "baseline": "json.loads per line", "benchmark": benchmark,
        "helper_processes": helpers,
        "seconds": {"baseline": base_s, "ingest_full": full_s, "ingest_full_one_process": one_process_s,
                    "ingest_no_decontam": no_decontam_s, "ingest_no_decontam_one_process": no_decontam_one_process_s},
        "ratio_vs_baseline": {"ingest_full": base_s / full_s, "ingest_full_one_process": base_s / one_process_s,
                              "ingest_no_decontam": base_s / no_decontam_s,
                              "ingest_no_decontam_one_process": base_s / no_decontam_one_process_s},
    })
    print(f"written {path}")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
