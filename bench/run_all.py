"""`make bench`: every benchmark in bench/, one after the other (never two heavy jobs at once on
a 2-core machine). Each prints its table and writes bench/results/<name>.json."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ORDER = ["ingest.py", "tokenize.py", "train.py", "eval_exec.py", "eval_generate.py", "cluster.py"]


def main() -> int:
    failed = []
    for name in ORDER:
        script = BENCH / name
        if not script.exists():
            continue
        print(f"\n=== bench/{name} ===", flush=True)
        if subprocess.run([sys.executable, str(script)], cwd=BENCH.parent).returncode != 0:
            failed.append(name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
