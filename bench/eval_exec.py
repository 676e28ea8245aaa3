"""Evaluation executor cost: CPU seconds per executed sample, per language.

Ours: the sandboxed ProgramRunner (namespaces, unprivileged uid, rlimits, Java compile server,
warm Go cache). Baseline: a naive runner, one plain subprocess per step with the same commands
and environment, no sandbox. Both run the canonical solutions of the same problems in the same
run, interleaved sample by sample, one worker each, so load changes hit both alike.

CPU per sample = CPU of every process involved (children, reaped: rusage; the long-lived Java
compile server: /proc of its JVM) plus the runner's own CPU. Rows:
- <language>: ours vs naive with identical commands (the sandbox overhead; target <= 10%);
- java (server vs plain javac+java): ours as used (compile server) vs plain `javac` + `java`
  without flags, the usual way (target: >= 3x cheaper);
- java (javac in sandbox): ours with java_compiler="javac" and the small-JVM flags vs the
  naive runner with the same flags (the sandbox overhead for Java alone).
The Java server's start-up (one per worker per run) is reported separately.

    .venv/bin/python bench/eval_exec.py [--limit 20] [--languages python cpp java js go]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

from bench.common import save, table  # noqa: E402
from mft_core.eval.assemble import Program, assemble_program  # noqa: E402
from mft_core.eval.execute import (JVM_FLAGS, SINGLE_THREAD_ENV, ExecutionConfig,  # noqa: E402
                                   ProgramRunner, missing_toolchain)
from mft_core.eval.problems import LANGUAGES, load_problems  # noqa: E402
from mft_core.eval.sandbox import processes_of_uid  # noqa: E402


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def jvm_cpu(runner: ProgramRunner) -> float:
    """CPU seconds of the compile-server JVMs (running as the slots' service uids)."""
    total = 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    for slot in runner._slots:  # noqa: SLF001 - the benchmark looks inside on purpose
        if slot.service_uid is None:
            continue
        for pid in processes_of_uid(slot.service_uid):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


@dataclass
class Meter:
    """Accumulates CPU and wall seconds over measured windows."""

    cpu: float = 0.0
    wall: float = 0.0
    samples: int = 0
    verdicts: dict = field(default_factory=dict)

    def add(self, cpu: float, wall: float, verdict: str) -> None:
        self.cpu += cpu
        self.wall += wall
        self.samples += 1
        self.verdicts[verdict] = self.verdicts.get(verdict, 0) + 1

    @property
    def cpu_per_sample(self) -> float:
        return self.cpu / max(1, self.samples)

    @property
    def wall_per_sample(self) -> float:
        return self.wall / max(1, self.samples)


def measure(fn, runner: ProgramRunner | None = None) -> tuple[float, float, object]:
    jvm0 = jvm_cpu(runner) if runner else 0.0
    cpu0, self0, wall0 = children_cpu(), time.process_time(), time.perf_counter()
    value = fn()
    wall = time.perf_counter() - wall0
    cpu = children_cpu() - cpu0 + time.process_time() - self0
    if runner:
        cpu += jvm_cpu(runner) - jvm0
    return cpu, wall, value


class NaiveRunner:
    """One plain subprocess per step, no sandbox: the baseline."""

    def __init__(self, runner: ProgramRunner, java_flags: bool):
        self.toolchains = runner.toolchains
        self.python = runner._run_argv(Program("python", "x.py", ""), runner._slots[0])[0][0]  # noqa: SLF001
        self.java_flags = java_flags
        self.gocache = self.toolchains / "go-cache" / "bench-naive"
        self.scratch = Path(tempfile.mkdtemp(dir=self.toolchains / "go-eval"))

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)

    def run(self, program: Program, timeout: float = 60) -> str:
        work = Path(tempfile.mkdtemp(dir=self.scratch))
        try:
            (work / program.filename).write_text(program.source)
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work),
                   "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
            language = program.language
            compile_argv = None
            if language == "python":
                run_argv, env = [self.python, "-I", program.filename], {**env, **SINGLE_THREAD_ENV}
            elif language == "cpp":
                compile_argv = ["g++", "-std=c++11", program.filename, "-o", "a.out"]
                compile_argv += ["-lcrypto"] if program.links_crypto else []
                run_argv = ["./a.out"]
            elif language == "java":
                flags = list(JVM_FLAGS) if self.java_flags else []
                compile_argv = ["javac", *(f"-J{f}" for f in flags), *(["-proc:none"] if flags else []),
                                "-d", "out", program.filename]
                run_argv = ["java", *flags, "-cp", "out", "Main"]
            elif language == "js":
                run_argv = ["node", program.filename]
                env["NODE_PATH"] = str(self.toolchains / "node_modules")
            else:
                compile_argv = ["go", "test", "-c", "-o", "main.test", program.filename]
                env.update(GOCACHE=str(self.gocache), GOFLAGS="-mod=vendor", GOPROXY="off",
                           GOSUMDB="off", CGO_ENABLED="0", GOTELEMETRY="off")
                run_argv = ["./main.test"]
            quiet = {"stdin": subprocess.DEVNULL, "capture_output": True, "cwd": work, "env": env,
                     "timeout": timeout}
            if compile_argv and subprocess.run(compile_argv, **quiet).returncode != 0:
                return "compile_error"
            done = subprocess.run(run_argv, **quiet)
            silent = not (done.stdout or done.stderr) or language != "js"
            return "passed" if done.returncode == 0 and silent else "failed"
        finally:
            shutil.rmtree(work, ignore_errors=True)


def bench_language(language: str, limit: int) -> list[dict]:
    problems = load_problems(language)
    programs = [assemble_program(p, p.canonical_solution) for p in problems[:limit]]
    warmup = assemble_program(problems[-1], problems[-1].canonical_solution)
    config = ExecutionConfig(workers={language: 1})
    # (row label, our config, naive runner with the small-JVM flags?)
    variants = [(language, config, False)]
    if language == "java":
        javac_config = ExecutionConfig(workers={language: 1}, java_compiler="javac")
        variants = [("java (server vs flagged javac+java)", config, True),
                    ("java (javac in sandbox)", javac_config, True)]
    rows = []
    for name, variant_config, java_flags in variants:
        with ProgramRunner(variant_config, workers=1) as runner:
            start_cpu, _, _ = measure(lambda: runner.prepare(language), runner)
            warm_cpu, _, _ = measure(lambda: runner.run(warmup), runner)
            naive = NaiveRunner(runner, java_flags)
            naive.run(warmup)  # warms the naive Go cache and the page cache
            plain = (NaiveRunner(runner, java_flags=False)
                     if variant_config.java_compiler == "server" and language == "java" else None)
            ours_meter, naive_meter, plain_meter = Meter(), Meter(), Meter()
            try:
                for index, program in enumerate(programs):
                    cpu, wall, verdict = measure(lambda: naive.run(program))
                    naive_meter.add(cpu, wall, verdict)
                    cpu, wall, record = measure(lambda: runner.run(program, ("bench", index)), runner)
                    ours_meter.add(cpu, wall, record["verdict"])
                    if plain is not None:
                        cpu, wall, verdict = measure(lambda: plain.run(program))
                        plain_meter.add(cpu, wall, verdict)
            finally:
                naive.close()
                if plain is not None:
                    plain.close()
        rows.append(_row(name, ours_meter, naive_meter))
        if plain is not None:
            row = _row("java (server vs plain javac+java)", ours_meter, plain_meter)
            row["server_start_cpu_s"] = round(start_cpu + warm_cpu, 3)
            rows.append(row)
    return rows


def _row(label: str, ours: Meter, naive: Meter) -> dict:
    return {"row": label, "samples": ours.samples,
            "naive_cpu_s_per_sample": round(naive.cpu_per_sample, 4),
            "ours_cpu_s_per_sample": round(ours.cpu_per_sample, 4),
            "cpu_ratio_ours_over_naive": round(ours.cpu_per_sample / naive.cpu_per_sample, 3),
            "naive_wall_s_per_sample": round(naive.wall_per_sample, 4),
            "ours_wall_s_per_sample": round(ours.wall_per_sample, 4),
            "ours_verdicts": ours.verdicts, "naive_verdicts": naive.verdicts}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=20, help="canonical problems per language")
    parser.add_argument("--languages", nargs="+", default=list(LANGUAGES))
    args = parser.parse_args()
    rows = []
    for language in args.languages:
        reason = missing_toolchain(language)
        if reason:
            print(f"skipping {language}: {reason}", file=sys.stderr)
            continue
        rows += bench_language(language, args.limit)
        print(f"{language}: done", file=sys.stderr, flush=True)
    headers = ["row", "samples", "naive CPU s", "ours CPU s", "ours/naive", "naive wall s",
               "ours wall s"]
    print(table(headers, [[r["row"], r["samples"], r["naive_cpu_s_per_sample"],
                           r["ours_cpu_s_per_sample"], r["cpu_ratio_ours_over_naive"],
                           r["naive_wall_s_per_sample"], r["ours_wall_s_per_sample"]] for r in rows]))
    starts = [r for r in rows if "server_start_cpu_s" in r]
    for row in starts:
        print(f"java compile server start-up (once per worker per run): "
              f"{row['server_start_cpu_s']:.2f} CPU s")
    path = save("eval_exec", {"limit_per_language": args.limit, "rows": rows,
                              "targets": {"sandbox_overhead_max": 1.10, "java_speedup_min": 3.0}})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
