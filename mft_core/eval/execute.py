"""Execute HumanEval-X samples in the sandbox and record one verdict per sample.

Verdicts: `passed`, `failed` (ran and did not pass; its `reason` is one of FAILURE_REASONS),
`compile_error` (C++, Java, Go), `timeout` (a compile or run step hit its wall-clock limit).
A pass needs positive evidence (`run_verdict`): exit status 0 *and* the completion marker, a
random token written into the program's descriptor 3 that the harness (assemble.py) prints only
after the last test has passed; an output stream cut at its cap is never a pass. Nothing else
counts as a pass: an executor error is recorded as `failed` with an `error` field.

Per language (what runs, see shared/reference/humaneval-x.md section 3):
- python: `python3 -I program.py` with an interpreter the sandbox uid can run that has numpy
  (the first of $MFT_EVAL_PYTHON, this interpreter, /usr/bin/python3 that works; probed once).
- cpp: `g++ -std=c++11 test.cpp -o a.out [-lcrypto]`, then `./a.out`.
- java: Main.java compiled by a warm compile server (one long-lived JVM per worker calling
  javax.tools, annotation processing off, restarted after a number of compilations or on a
  hang), or by plain `javac` with C1/SerialGC flags when `java_compiler="javac"`; then
  `java -cp out Main` with small-heap flags (no -ea, like CodeGeeX).
- js: `node test.js` with NODE_PATH=<toolchains>/node_modules (js-md5). Pass = exit 0, stdout
  exactly the marker and nothing on stderr (CodeGeeX's rule, "no output at all", with the marker:
  `console.assert` only prints).
- go: in a subdirectory of the module root <toolchains>/go-eval (go.mod, go.sum, vendor/):
  `go test -c -o main.test main_test.go` (vet on, as in CodeGeeX, unless `go_vet=False`) with
  GOFLAGS=-mod=vendor GOPROXY=off GOSUMDB=off and a per-worker GOCACHE kept under
  <toolchains>/go-cache (warm builds take ~0.4 s, cold ones seconds), then `./main.test`.

Toolchains: scripts/install-toolchains.sh. The toolchain folder is $MFT_TOOLCHAINS_DIR or
<repo>/.toolchains; per-sample directories live under it. With namespaces every step sees it
read-only at a fixed path (sandbox.TOOLCHAINS_IN_SANDBOX) whatever its place on the host, with
its own work directory writable; `SandboxSlot.in_sandbox` turns host paths into the paths used
in commands and environment variables.

Resumable: `execute_samples` appends one JSON line per finished sample to `results_path` and,
called again on the same file, skips samples already recorded (key: task_id + sample_index).
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import queue
import secrets
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from mft_core.eval.assemble import Program, assemble_program
from mft_core.eval.problems import (LANGUAGES, Problem, language_of_task, normalize_language,
                                    normalize_task_id, select_problems)
from mft_core.eval.sandbox import (Isolation, Limits, SampleDir, SandboxError, SandboxSlot, StepResult,
                                   acquire_slots, check_reachable, default_hidden, detect_isolation,
                                   require_isolation,
                                   toolchains_dir)

log = logging.getLogger(__name__)

VERDICTS = ("passed", "failed", "compile_error", "timeout")
GIB = 1 << 30
MIB = 1 << 20

# Heap and reservation flags that let a JVM start under a 2 GiB address-space limit (a default
# JVM reserves ~4 GiB) and cut its start-up CPU (C1 only, serial GC, no perf-data file).
JVM_FLAGS = ("-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
             "-XX:ReservedCodeCacheSize=32m", "-XX:CompressedClassSpaceSize=64m",
             "-XX:MaxMetaspaceSize=128m", "-XX:-UsePerfData", "-Xshare:auto")
# The compile server lives long: full JIT pays off there.
JAVA_SERVER_FLAGS = ("-Xmx384m", "-XX:+UseSerialGC", "-XX:ReservedCodeCacheSize=64m",
                     "-XX:CompressedClassSpaceSize=64m", "-XX:MaxMetaspaceSize=192m",
                     "-XX:-UsePerfData", "-Xshare:auto")

# Address-space limits measured on Debian 12 (reference section 7): numpy/g++ run in 256 MB,
# node needs ~1 GB, Go ~1 GB, a JVM with the flags above ~1 GB. Each gets headroom.
ADDRESS_SPACE = {
    ("python", "run"): 1 * GIB,
    ("cpp", "compile"): 2 * GIB,
    ("cpp", "run"): 1 * GIB,
    ("java", "compile"): 2 * GIB,
    ("java", "run"): 2 * GIB,
    ("js", "run"): 2 * GIB,
    ("go", "compile"): 2 * GIB,
    ("go", "run"): 2 * GIB,
}
COMPILED_LANGUAGES = ("cpp", "java", "go")
SINGLE_THREAD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
                     "MKL_NUM_THREADS": "1", "NUMEXPR_NUM_THREADS": "1"}


def cpu_limit_for(timeout_s: float) -> int:
    """RLIMIT_CPU for a step: a backstop behind the wall-clock timeout, never before it.

    The limit counts the CPU of all threads of a process, and a JVM or a Go binary can burn
    several cores at once, so it is the timeout times the number of cores, plus a second.
    """
    return math.ceil(timeout_s) * (os.cpu_count() or 1) + 1


class ToolchainMissing(RuntimeError):
    """A language's toolchain is not installed; the message says how to install it."""


class ResultsFileBusy(RuntimeError):
    """Another run is appending to the same results file."""


def _default_workers() -> dict[str, int]:
    cores = os.cpu_count() or 1
    return {language: max(1, min(cores, 4)) for language in LANGUAGES}


@dataclass
class ExecutionConfig:
    """How samples are executed. Timeouts are wall-clock seconds per step."""

    workers: dict[str, int] = field(default_factory=_default_workers)
    compile_timeout_s: float = 60.0
    run_timeout_s: dict[str, float] = field(
        default_factory=lambda: {language: 10.0 for language in LANGUAGES})
    java_compiler: str = "server"  # "server" (warm javax.tools JVM) or "javac"
    java_server_max_compilations: int = 400
    go_vet: bool = True
    toolchains: Path | None = None
    output_tail_chars: int = 2000
    allow_unsandboxed: bool = False  # run generated code even without namespaces (see require_isolation)
    hidden: tuple[Path, ...] = ()  # folders programs must not see besides $HOME and the checkout (runs root)

    def __post_init__(self) -> None:
        if self.java_compiler not in ("server", "javac"):
            raise ValueError(f"java_compiler must be 'server' or 'javac', got {self.java_compiler!r}")
        for language, count in self.workers.items():
            if count < 1:
                raise ValueError(f"workers[{language!r}] must be >= 1, got {count}")
        if self.compile_timeout_s <= 0 or any(t <= 0 for t in self.run_timeout_s.values()):
            raise ValueError("timeouts must be positive")

    @property
    def toolchains_path(self) -> Path:
        return Path(self.toolchains) if self.toolchains else toolchains_dir()

    def workers_for(self, language: str) -> int:
        return self.workers.get(language, 1)

    def run_timeout_for(self, language: str) -> float:
        return self.run_timeout_s.get(language, 10.0)

    def limits(self, language: str, step: str) -> Limits:
        timeout = self.compile_timeout_s if step == "compile" else self.run_timeout_for(language)
        return Limits(address_space_bytes=ADDRESS_SPACE[(language, step)],
                      cpu_seconds=cpu_limit_for(timeout),
                      file_size_bytes=(64 if step == "compile" else 16) * MIB)


# --------------------------------------------------------------------------------------------
# Toolchain checks

def missing_toolchain(language: str, toolchains: Path | None = None) -> str | None:
    """Why `language` cannot run here (with the fix), or None when its toolchain is present."""
    language = normalize_language(language)
    root = toolchains or toolchains_dir()
    fix = "run scripts/install-toolchains.sh"

    def need_binary(name: str, package: str) -> str | None:
        return None if shutil.which(name) else f"{name} not found (apt package {package}; {fix})"

    checks: list[str | None]
    if language == "python":
        checks = [None if _plausible_sandbox_pythons() else
                  f"no python3 with numpy that an unprivileged uid can run (tried "
                  f"{', '.join(_python_candidates())}; apt packages python3 python3-numpy; {fix})"]
    elif language == "cpp":
        checks = [need_binary("g++", "g++"),
                  None if Path("/usr/include/boost/any.hpp").is_file()
                  else f"boost headers missing (apt package libboost-dev; {fix})",
                  None if Path("/usr/include/openssl/md5.h").is_file()
                  else f"OpenSSL headers missing (apt package libssl-dev; {fix})"]
    elif language == "java":
        checks = [need_binary("javac", "openjdk-17-jdk-headless"),
                  need_binary("java", "openjdk-17-jdk-headless")]
    elif language == "js":
        checks = [need_binary("node", "nodejs"),
                  None if (root / "node_modules" / "js-md5" / "package.json").is_file()
                  else f"js-md5 missing in {root / 'node_modules'} ({fix})"]
    else:
        checks = [need_binary("go", "golang-go"),
                  None if (root / "go-eval" / "vendor" / "modules.txt").is_file()
                  else f"Go module root {root / 'go-eval'} with vendor/ missing ({fix})"]
    problems = [reason for reason in checks if reason]
    return "; ".join(problems) if problems else None


def _python_candidates() -> list[str]:
    candidates = [os.environ.get("MFT_EVAL_PYTHON", ""), sys.executable, "/usr/bin/python3"]
    seen: list[str] = []
    for candidate in candidates:
        if candidate and os.path.exists(candidate) and candidate not in seen:
            seen.append(candidate)
    return seen


@functools.lru_cache(maxsize=1)
def _plausible_sandbox_pythons() -> tuple[str, ...]:
    """Candidates that import numpy and, when we are root, sit in world-reachable folders.

    A cheap pre-check for `missing_toolchain`; `sandbox_python` makes the real test.
    """
    plausible = []
    for candidate in _python_candidates():
        real = Path(os.path.realpath(candidate))
        if os.geteuid() == 0 and any(not os.stat(d).st_mode & 0o001 for d in real.parents):
            continue  # e.g. a pyenv under /root (mode 700): the sandbox uid cannot run it
        done = subprocess.run([candidate, "-I", "-c", "import numpy"], capture_output=True,
                              timeout=60, env={"PATH": "/usr/bin:/bin", **SINGLE_THREAD_ENV})
        if done.returncode == 0:
            plausible.append(candidate)
    return tuple(plausible)


_python_choice: dict[Isolation, str] = {}
_python_choice_lock = threading.Lock()


def sandbox_python(slot: SandboxSlot, scratch: Path) -> str:
    """The first Python interpreter that the sandbox uid can run and that imports numpy."""
    with _python_choice_lock:
        if slot.isolation in _python_choice:
            return _python_choice[slot.isolation]
        tried = []
        for candidate in _python_candidates():
            with slot.sample_dir(scratch) as sample:
                result = slot.run([candidate, "-I", "-c", "import numpy"], sample=sample,
                                  step="probe", timeout_s=60, env=SINGLE_THREAD_ENV,
                                  limits=Limits(address_space_bytes=ADDRESS_SPACE[("python", "run")],
                                                cpu_seconds=60))
            if result.passed_exit:
                log.info("python samples run with %s", candidate)
                _python_choice[slot.isolation] = candidate
                return candidate
            tried.append(f"{candidate} (exit {result.returncode}: "
                         f"{result.output_tail(200).strip() or 'no output'})")
        raise ToolchainMissing(
            "python: no interpreter that the sandbox uid can run with numpy; tried "
            + "; ".join(tried) + ". Run scripts/install-toolchains.sh (installs python3-numpy) "
            "or set MFT_EVAL_PYTHON to an interpreter outside /root that has numpy")


# --------------------------------------------------------------------------------------------
# Java compile server (javax.tools in one long-lived JVM). It only compiles: model code never
# runs inside it (annotation processing is off). Protocol on stdin/stdout, one request a line:
#   request:  <source path>\t<output dir>\n
#   response: OK|ERROR <cpu nanoseconds of the JVM for this request> <n>\n<n bytes of diagnostics>
JAVA_COMPILE_SERVER_SOURCE = r"""
import java.io.*;
import java.lang.management.ManagementFactory;
import java.nio.charset.StandardCharsets;
import java.util.*;
import javax.tools.*;

public class MftCompileServer {
    public static void main(String[] args) throws Exception {
        JavaCompiler compiler = ToolProvider.getSystemJavaCompiler();
        StandardJavaFileManager files =
            compiler.getStandardFileManager(null, Locale.ROOT, StandardCharsets.UTF_8);
        com.sun.management.OperatingSystemMXBean os =
            (com.sun.management.OperatingSystemMXBean) ManagementFactory.getOperatingSystemMXBean();
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        OutputStream out = new BufferedOutputStream(new FileOutputStream(FileDescriptor.out));
        out.write("READY\n".getBytes(StandardCharsets.UTF_8));
        out.flush();
        String line;
        while ((line = in.readLine()) != null) {
            String[] request = line.split("\t");
            long cpuBefore = os.getProcessCpuTime();
            StringWriter diagnostics = new StringWriter();
            boolean ok;
            try {
                File source = new File(request[0]);
                String sourceDir = source.getParent();
                List<String> options = List.of("-d", request[1], "-proc:none", "-encoding", "UTF-8",
                                               "-classpath", sourceDir, "-sourcepath", sourceDir);
                ok = compiler.getTask(diagnostics, files, null, options, null,
                                      files.getJavaFileObjects(source)).call();
            } catch (Throwable error) {
                ok = false;
                diagnostics.write("compile server: " + error);
            }
            long cpu = os.getProcessCpuTime() - cpuBefore;
            byte[] message = diagnostics.toString().getBytes(StandardCharsets.UTF_8);
            out.write(((ok ? "OK " : "ERROR ") + cpu + " " + message.length + "\n")
                      .getBytes(StandardCharsets.UTF_8));
            out.write(message);
            out.flush();
        }
    }
}
"""


def java_compile_server_classes(toolchains: Path) -> Path:
    """Compile the server once (trusted code, as the current user) into the toolchain folder."""
    digest = hashlib.sha256(JAVA_COMPILE_SERVER_SOURCE.encode()).hexdigest()[:12]
    target = toolchains / "java-compile-server" / digest
    if (target / "MftCompileServer.class").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "MftCompileServer.class").is_file():
            return target
        staging = Path(tempfile.mkdtemp(dir=target.parent))
        (staging / "MftCompileServer.java").write_text(JAVA_COMPILE_SERVER_SOURCE)
        done = subprocess.run(["javac", "-d", str(staging), str(staging / "MftCompileServer.java")],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            raise ToolchainMissing(f"java: cannot build the compile server: {done.stderr[-1000:]}")
        for path in (staging, *staging.iterdir()):
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        os.replace(staging, target)
    os.chmod(target.parent, 0o755)  # the server runs as an unprivileged uid
    return target


@dataclass
class CompileOutcome:
    ok: bool
    timed_out: bool
    wall_s: float
    cpu_s: float
    diagnostics: str


class JavaCompileServer:
    """One warm JVM compiling Main.java files for one sandbox slot (runs as its service uid)."""

    def __init__(self, slot: SandboxSlot, classes_dir: Path, state_dir: Path, limits: Limits,
                 max_compilations: int):
        self.slot = slot
        self._workspace: Path | None = None  # the slot directory holding the samples
        self.classes_dir = classes_dir
        self.state_dir = state_dir
        self.limits = limits
        self.max_compilations = max_compilations
        self._proc: subprocess.Popen | None = None
        self._buffer = b""
        self._compilations = 0
        self._cpu_s = 0.0

    def _start(self, workspace: Path, timeout_s: float) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o711)
        argv = ["java", *JAVA_SERVER_FLAGS, "-cp", str(self.slot.in_sandbox(self.classes_dir)),
                "MftCompileServer"]
        self._proc = self.slot.start_service(argv, cwd=self.classes_dir, limits=self.limits,
                                             stderr_path=self.state_dir / "server.stderr",
                                             writable=[workspace])
        self._workspace = workspace
        self._buffer, self._compilations, self._cpu_s = b"", 0, 0.0
        line = self._read_line(time.monotonic() + timeout_s)
        if line != b"READY":
            stderr = (self.state_dir / "server.stderr").read_text(errors="replace")[-1000:]
            self.close()
            raise SandboxError(f"java compile server did not start (got {line!r}): {stderr}")

    def _read_more(self, deadline: float) -> bool:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            return False
        chunk = os.read(fd, 65536)
        if not chunk:
            raise EOFError("compile server exited")
        self._buffer += chunk
        return True

    def _read_line(self, deadline: float) -> bytes | None:
        while b"\n" not in self._buffer:
            if not self._read_more(deadline):
                return None
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def _read_bytes(self, count: int, deadline: float) -> bytes | None:
        while len(self._buffer) < count:
            if not self._read_more(deadline):
                return None
        data, self._buffer = self._buffer[:count], self._buffer[count:]
        return data

    def compile(self, sample: SampleDir, source: Path, out_dir: Path,
                timeout_s: float) -> CompileOutcome:
        """Compile `source` into `out_dir` (both in `sample.work`); a hang past `timeout_s`
        kills the server. The server sees the slot directory holding the sample writable."""
        if (self._proc is None or self._compilations >= self.max_compilations
                or self._cpu_s > 300 or self._workspace != sample.root):
            self.close()  # bounded memory growth and RLIMIT_CPU: start afresh now and then
            self._start(sample.root, timeout_s=120)
        start = time.perf_counter()
        deadline = time.monotonic() + timeout_s
        assert self._proc is not None and self._proc.stdin is not None
        in_sandbox = self.slot.in_sandbox
        try:
            self._proc.stdin.write(f"{in_sandbox(source)}\t{in_sandbox(out_dir)}\n".encode())
            self._proc.stdin.flush()
            header = self._read_line(deadline)
            parts = header.decode().split() if header is not None else []
            body = self._read_bytes(int(parts[2]), deadline) if len(parts) == 3 else None
        except (OSError, EOFError, ValueError) as error:
            self.close()
            return CompileOutcome(False, False, time.perf_counter() - start, 0.0,
                                  f"compile server failed: {error}")
        if header is None or body is None:  # hung (or pathological input): kill and restart later
            self.close()
            return CompileOutcome(False, True, time.perf_counter() - start, 0.0,
                                  "compile timed out")
        self._compilations += 1
        cpu_s = int(parts[1]) / 1e9
        self._cpu_s += cpu_s
        return CompileOutcome(parts[0] == "OK", False, time.perf_counter() - start, cpu_s,
                              body.decode("utf-8", errors="replace"))

    def close(self) -> None:
        if self._proc is not None:
            self.slot.stop_service(self._proc)
            self._proc = None


# --------------------------------------------------------------------------------------------
# One program

# Why a run that was not a pass failed (the `reason` of a "failed" verdict).
FAILURE_REASONS = {
    "exit_status": "the program exited with a non-zero status (a failed assertion, a crash, a limit)",
    "output_limit": "stdout or stderr reached its size cap; the program is not trusted to have finished",
    "no_completion_marker": "it exited 0 but never printed the completion marker: the tests did not all run",
    "unexpected_output": "JavaScript printed something besides the marker (a failed console.assert prints)",
}


def run_verdict(language: str, step: StepResult, completion_marker: str, output_cap: int) -> tuple[str, str | None]:
    """(verdict, failure reason) of a run step. A pass needs positive evidence: exit status 0, the
    completion marker as the last line of stdout (assemble.py prints it after the last test), for
    Go the test binary's own PASS line just before it, for JavaScript nothing else printed at all
    (console.assert only prints), and neither output stream cut at its cap."""
    if step.timed_out:
        return "timeout", None
    if step.stdout_bytes >= output_cap or step.stderr_bytes >= output_cap:
        return "failed", "output_limit"
    if step.returncode != 0:
        return "failed", "exit_status"
    lines = [line for line in step.stdout_tail.splitlines() if line.strip()] or [""]
    if lines[-1] != completion_marker or (language == "go" and lines[-2:-1] != ["PASS"]):
        return "failed", "no_completion_marker"
    if language == "js" and (step.stderr_bytes or step.stdout_tail.strip() != completion_marker):
        return "failed", "unexpected_output"
    return "passed", None


def _result(key: tuple[str, int], language: str, verdict: str, *, compile_s=None, run_s=None,
            cpu_s: float = 0.0, returncode=None, output_tail: str = "",
            error: str | None = None, reason: str | None = None) -> dict:
    record = {"task_id": key[0], "sample_index": key[1], "language": language,
              "verdict": verdict, "passed": verdict == "passed",
              "compile_s": None if compile_s is None else round(compile_s, 4),
              "run_s": None if run_s is None else round(run_s, 4),
              "cpu_s": round(cpu_s, 4), "returncode": returncode, "output_tail": output_tail}
    if reason:
        record["reason"] = reason
    if error:
        record["error"] = error
    return record


GO_WARMUP_SOURCE = """package main

import (
    "bytes"
    "crypto/md5"
    "fmt"
    "math"
    "math/rand"
    "regexp"
    "sort"
    "strconv"
    "strings"
    "testing"
    "time"
    "github.com/stretchr/testify/assert"
)

func TestWarmup(t *testing.T) {
    assert := assert.New(t)
    _ = bytes.NewBufferString(fmt.Sprint(md5.Sum([]byte("x")), math.Pi, rand.Intn(2)))
    _ = regexp.MustCompile(strconv.Itoa(sort.SearchInts([]int{1}, 1)) + strings.ToUpper("a"))
    _ = time.Now()
    assert.Equal(1, 1)
}
"""


class ProgramRunner:
    """Runs assembled programs in the sandbox, `workers` at a time (thread-safe `run`).

    Holds the leased sandbox slots, a scratch directory for this run, the warm Java compile
    servers and the Go build caches; `close()` (or leaving the `with` block) releases them all.
    Language toolchains are checked when a language is first used.
    """

    def __init__(self, config: ExecutionConfig | None = None, workers: int = 1):
        self.config = config or ExecutionConfig()
        self.toolchains = self.config.toolchains_path
        self.isolation = detect_isolation()
        require_isolation(self.isolation, self.config.allow_unsandboxed)
        check_reachable(self.toolchains, self.isolation)
        self._lock = threading.Lock()
        self._checked: set[str] = set()
        self._java_servers: dict[int, JavaCompileServer] = {}
        self._go_scratch: Path | None = None
        self._java_classes: Path | None = None
        self.scratch = _make_run_dir(self.toolchains / "scratch")
        try:
            self._slots = acquire_slots(workers, toolchains=self.toolchains,
                                        hidden=default_hidden(self.toolchains, self.config.hidden))
        except BaseException:
            shutil.rmtree(self.scratch, ignore_errors=True)
            raise
        self._free: queue.Queue[SandboxSlot] = queue.Queue()
        for slot in self._slots:
            self._free.put(slot)

    def __enter__(self) -> "ProgramRunner":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        for server in self._java_servers.values():
            server.close()
        self._java_servers.clear()
        for slot in self._slots:
            slot.release()
        self._slots = []
        shutil.rmtree(self.scratch, ignore_errors=True)
        if self._go_scratch is not None:
            shutil.rmtree(self._go_scratch, ignore_errors=True)

    # ---- per-language preparation -----------------------------------------------------------

    def prepare(self, language: str) -> None:
        """Check the toolchain and warm what the language needs (once per runner)."""
        language = normalize_language(language)
        with self._lock:
            if language in self._checked:
                return
            reason = missing_toolchain(language, self.toolchains)
            if reason:
                raise ToolchainMissing(f"{language}: {reason}")
            if language == "python":
                sandbox_python(self._slots[0], self.scratch)
            elif language == "java" and self.config.java_compiler == "server":
                self._java_classes = java_compile_server_classes(self.toolchains)
            elif language == "go":
                self._go_scratch = _make_run_dir(self.toolchains / "go-eval" / "scratch")
                self._warm_go_caches()
            self._checked.add(language)

    def _go_cache(self, slot: SandboxSlot) -> Path:
        name = str(slot.uid) if slot.uid is not None else f"user-{os.geteuid()}"
        return self.toolchains / "go-cache" / name

    def _warm_go_caches(self) -> None:
        """Give every slot a warm GOCACHE: build testify and the helper packages once, then copy.

        A cold cache makes the first build take several seconds (reference section 6); one
        build per machine instead of one per worker uid, and never inside a sample's timeout.
        """
        warm = [cache for cache in sorted((self.toolchains / "go-cache").glob("*"))
                if (cache / ".mft-warm").exists()]
        for slot in self._slots:
            cache = self._go_cache(slot)
            if (cache / ".mft-warm").exists():
                continue
            shutil.rmtree(cache, ignore_errors=True)
            if warm:
                shutil.copytree(warm[0], cache, symlinks=True)
                _chown_tree(cache, slot.uid, slot.gid)
            else:
                slot.owned_dir(cache)
                program = Program("go", "main_test.go", GO_WARMUP_SOURCE)
                assert self._go_scratch is not None
                with slot.sample_dir(self._go_scratch) as sample:
                    (sample.work / program.filename).write_text(program.source)
                    ok, _, wall, _, tail = self._compile(program, sample, slot)
                if not ok:
                    raise ToolchainMissing(f"go: warm-up build failed: {tail}")
                log.info("go: warmed the build cache %s in %.1f s", cache, wall)
                warm.append(cache)
            (cache / ".mft-warm").touch()

    # ---- steps --------------------------------------------------------------------------------

    def _java_server(self, slot: SandboxSlot) -> JavaCompileServer:
        with self._lock:
            server = self._java_servers.get(id(slot))
            if server is None:
                limits = Limits(address_space_bytes=ADDRESS_SPACE[("java", "compile")],
                                cpu_seconds=600, file_size_bytes=64 * MIB)
                assert self._java_classes is not None
                server = JavaCompileServer(slot, self._java_classes,
                                           self.scratch / f"java-server-{len(self._java_servers)}",
                                           limits, self.config.java_server_max_compilations)
                self._java_servers[id(slot)] = server
            return server

    def _compile(self, program: Program, sample: SampleDir, slot: SandboxSlot
                 ) -> tuple[bool, bool, float, float, str]:
        """(ok, timed_out, wall s, cpu s, output tail) of the compile step."""
        config, language = self.config, program.language
        if language == "java" and config.java_compiler == "server":
            outcome = self._java_server(slot).compile(sample, sample.work / program.filename,
                                                      sample.work / "out", config.compile_timeout_s)
            return (outcome.ok, outcome.timed_out, outcome.wall_s, outcome.cpu_s,
                    outcome.diagnostics[-config.output_tail_chars:])
        env: dict[str, str] = {}
        writable: list[Path] = []
        if language == "cpp":
            argv = ["g++", "-std=c++11", program.filename, "-o", "a.out"]
            if program.links_crypto:
                argv.append("-lcrypto")
        elif language == "java":
            argv = ["javac", *(f"-J{flag}" for flag in JVM_FLAGS), "-proc:none", "-encoding",
                    "UTF-8", "-d", "out", program.filename]
        else:  # go
            argv = ["go", "test", "-c", "-o", "main.test", program.filename]
            if not config.go_vet:
                argv.insert(3, "-vet=off")
            writable = [self._go_cache(slot)]  # read-only (and so safe) when the program runs
            env = {"GOCACHE": str(slot.in_sandbox(self._go_cache(slot))), "GOFLAGS": "-mod=vendor",
                   "GOPROXY": "off", "GOSUMDB": "off", "GO111MODULE": "on", "CGO_ENABLED": "0",
                   "GOTOOLCHAIN": "local", "GOTELEMETRY": "off"}
        step = slot.run(argv, sample=sample, step="compile", timeout_s=config.compile_timeout_s,
                        limits=config.limits(language, "compile"), env=env, writable=writable)
        return (step.passed_exit, step.timed_out, step.wall_s, step.cpu_s,
                step.output_tail(config.output_tail_chars))

    def _run_argv(self, program: Program, slot: SandboxSlot) -> tuple[list[str], dict[str, str]]:
        language = program.language
        if language == "python":
            return ([sandbox_python(slot, self.scratch), "-I", program.filename],
                    dict(SINGLE_THREAD_ENV))
        if language == "cpp":
            return ["./a.out"], {}
        if language == "java":
            return ["java", *JVM_FLAGS, "-cp", "out", "Main"], {}
        if language == "js":
            return ["node", program.filename], {
                "NODE_PATH": str(slot.in_sandbox(self.toolchains / "node_modules"))}
        return ["./main.test"], {"GOMAXPROCS": "2"}

    @property
    def program_uids(self) -> list[int]:
        """The uids programs run as (empty when not root)."""
        return [slot.uid for slot in self._slots if slot.uid is not None]

    def run(self, program: Program, key: tuple[str, int] = ("program", 0),
            run_timeout_s: float | None = None) -> dict:
        """Compile (if needed) and run one program in a fresh sandbox; its result record.

        `run_timeout_s` overrides the configured run timeout for this program.
        """
        self.prepare(program.language)
        slot = self._free.get()
        try:
            return self._run_in_slot(program, key, slot, run_timeout_s)
        finally:
            self._free.put(slot)

    def _run_in_slot(self, program: Program, key: tuple[str, int], slot: SandboxSlot,
                     run_timeout_s: float | None) -> dict:
        config, language = self.config, program.language
        run_timeout = run_timeout_s or config.run_timeout_for(language)
        parent = self._go_scratch if language == "go" else self.scratch
        assert parent is not None
        with slot.sample_dir(parent) as sample:
            path = sample.work / program.filename
            path.write_text(program.source, encoding="utf-8")
            os.chmod(path, 0o644)
            compile_s, cpu = None, 0.0
            if language in COMPILED_LANGUAGES:
                ok, timed_out, compile_s, cpu, tail = self._compile(program, sample, slot)
                if timed_out:
                    return _result(key, language, "timeout", compile_s=compile_s, cpu_s=cpu,
                                   output_tail=tail or "compile step timed out")
                if not ok:
                    return _result(key, language, "compile_error", compile_s=compile_s,
                                   cpu_s=cpu, output_tail=tail)
            argv, env = self._run_argv(program, slot)
            limits = config.limits(language, "run")
            if run_timeout_s:
                limits = dataclasses.replace(limits, cpu_seconds=cpu_limit_for(run_timeout))
            completion_marker = secrets.token_hex(16)
            step = slot.run(argv, sample=sample, step="run", timeout_s=run_timeout,
                            limits=limits, env=env, fd3_data=completion_marker.encode())
            cpu += step.cpu_s
            verdict, reason = run_verdict(language, step, completion_marker, limits.file_size_bytes)
            return _result(key, language, verdict, compile_s=compile_s, run_s=step.wall_s,
                           cpu_s=cpu, returncode=step.returncode, reason=reason,
                           output_tail=step.output_tail(config.output_tail_chars))


def _chown_tree(root: Path, uid: int | None, gid: int | None) -> None:
    if uid is None:
        return
    for directory, _, files in os.walk(root):
        os.chown(directory, uid, gid)
        for name in files:
            os.chown(os.path.join(directory, name), uid, gid, follow_symlinks=False)


# --------------------------------------------------------------------------------------------
# Many samples, resumable

@dataclass(frozen=True)
class Sample:
    task_id: str
    sample_index: int
    completion: str

    @property
    def key(self) -> tuple[str, int]:
        return (self.task_id, self.sample_index)


def normalize_samples(samples: Iterable[dict], source: str = "samples") -> list[Sample]:
    """Validate generation records ({"task_id", "generation"} or OpenAI's "completion").

    `sample_index` is taken from the record or numbered by order of appearance per task.
    """
    normalized: list[Sample] = []
    counters: dict[str, int] = {}
    seen: set[tuple[str, int]] = set()
    for position, record in enumerate(samples, start=1):
        where = f"{source} record {position}"
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if "task_id" not in record:
            raise ValueError(f"{where}: no 'task_id' field (fields: {sorted(record)})")
        completion = record.get("generation", record.get("completion"))
        if not isinstance(completion, str):
            raise ValueError(f"{where}: needs a string 'generation' (or OpenAI's 'completion'); "
                             f"fields: {sorted(record)}")
        try:
            task_id = normalize_task_id(str(record["task_id"]))
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        index = record.get("sample_index")
        if index is None:
            index = counters.get(task_id, 0)
        elif not isinstance(index, int) or index < 0:
            raise ValueError(f"{where}: sample_index must be a non-negative integer, got {index!r}")
        counters[task_id] = max(counters.get(task_id, 0), index + 1)
        if (task_id, index) in seen:
            raise ValueError(f"{where}: duplicate sample ({task_id}, sample_index {index})")
        seen.add((task_id, index))
        normalized.append(Sample(task_id, index, completion))
    return normalized


def read_results(results_path: str | Path) -> dict[tuple[str, int], dict]:
    """Finished results in a results file, by (task_id, sample_index).

    A torn last line (the writer was killed mid-line) is cut off the file.
    """
    path = Path(results_path)
    if not path.exists():
        return {}
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        log.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run",
                    path, len(data) - keep)
        with open(path, "r+b") as handle:
            handle.truncate(keep)
        data = data[:keep]
    results: dict[tuple[str, int], dict] = {}
    for line_number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            key = (record["task_id"], int(record["sample_index"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}:{line_number}: not a result record ({error}); "
                             f"delete the file to start over") from None
        results[key] = record
    return results


def _stale_run_dirs(parent: Path) -> None:
    """Remove run directories left by executors that no longer exist (crashes)."""
    if not parent.is_dir():
        return
    for entry in parent.glob("run-*"):
        try:
            pid = int(entry.name.split("-")[1])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(entry, ignore_errors=True)


def _make_run_dir(parent: Path) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    os.chmod(parent, 0o711)
    _stale_run_dirs(parent)
    run_dir = Path(tempfile.mkdtemp(prefix=f"run-{os.getpid()}-", dir=parent))
    os.chmod(run_dir, 0o711)
    return run_dir


def execute_samples(samples: Iterable[dict], results_path: str | Path, *,
                    problems: list[Problem] | None = None,
                    humaneval_dir: str | Path | None = None,
                    config: ExecutionConfig | None = None, truncate: bool = True,
                    on_result: Callable[[dict], None] | None = None, cluster=None) -> list[dict]:
    """Execute generations and append one result line per sample to `results_path`.

    `samples`: dicts with task_id and generation (or completion), optional sample_index.
    Samples already recorded in `results_path` are skipped, so a crashed run is resumed by
    calling this again with the same arguments. Returns the results of all given samples
    (recorded earlier or now), in the order given. `cluster` (the config's ClusterConfig): the
    samples run in the sandboxes of every node of that Ray cluster (`_on_cluster`).
    """
    config = config or ExecutionConfig()
    results_path = Path(results_path)
    wanted = normalize_samples(samples)
    languages = sorted({language_of_task(s.task_id) for s in wanted}, key=LANGUAGES.index)
    if problems is None:
        problems = select_problems(languages=languages, humaneval_dir=humaneval_dir) if languages else []
    by_id = {problem.task_id: problem for problem in problems}
    unknown = sorted({s.task_id for s in wanted if s.task_id not in by_id})
    if unknown:
        raise ValueError(f"{len(unknown)} sample task id(s) have no problem: {unknown[:10]}")

    results_path.parent.mkdir(parents=True, exist_ok=True)
    with open(results_path, "a", encoding="utf-8") as results_file:
        try:  # two runs appending to one file would duplicate samples
            fcntl.flock(results_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ResultsFileBusy(f"{results_path} is being written by another run; wait for "
                                  f"it or use another results file") from None
        done = read_results(results_path)
        pending = [s for s in wanted if s.key not in done]
        if done:
            log.info("%s: %d of %d samples already done; running %d", results_path,
                     len(wanted) - len(pending), len(wanted), len(pending))
        for language in languages:
            todo = [s for s in pending if by_id[s.task_id].language == language]
            if todo:
                _execute_language(language, todo, by_id, config, truncate, results_file,
                                  done, on_result, cluster)
        results_file.flush()
        os.fsync(results_file.fileno())
    return [done[s.key] for s in wanted]


def _completed_or_cancel(futures):
    """as_completed, but on any error (or Ctrl-C) the samples not yet started are cancelled."""
    try:
        yield from as_completed(futures)
    except BaseException:
        for future in futures:
            future.cancel()
        raise


def execute_one(runner: "ProgramRunner", problem: Problem, sample: Sample, truncate: bool) -> dict:
    """One sample's verdict record, in a runner prepared for its language."""
    try:
        program = assemble_program(problem, sample.completion, truncate)
        return runner.run(program, sample.key)
    except (ToolchainMissing, SandboxError):
        raise  # the machine is not set up: stop, do not record thousands of failures
    except Exception as error:  # never a pass; recorded so the run can go on
        log.exception("executor error on %s #%d", *sample.key)
        return _result(sample.key, problem.language, "failed",
                       error=f"executor error: {type(error).__name__}: {error}")


def _on_this_machine(language: str, todo: list[Sample], by_id: dict[str, Problem],
                     config: ExecutionConfig, truncate: bool) -> Iterable[dict]:
    """The samples' records as they finish, from `workers_for(language)` sandboxes here."""
    workers = min(config.workers_for(language), len(todo))
    with ProgramRunner(config, workers=workers) as runner:
        runner.prepare(language)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"eval-{language}") as pool:
            futures = [pool.submit(execute_one, runner, by_id[sample.task_id], sample, truncate) for sample in todo]
            for future in _completed_or_cancel(futures):
                yield future.result()


def _execute_language(language: str, todo: list[Sample], by_id: dict[str, Problem],
                      config: ExecutionConfig, truncate: bool, results_file, done: dict,
                      on_result, cluster=None) -> None:
    """Run one language's pending samples in parallel, here or on the cluster; results are
    written by this thread."""
    passed = finished = 0
    started = time.perf_counter()
    if cluster is not None:
        from mft_core.eval.on_ray import on_cluster

        records = on_cluster(cluster, language, todo, by_id, config, truncate)
    else:
        records = _on_this_machine(language, todo, by_id, config, truncate)
    for record in records:
        results_file.write(json.dumps(record) + "\n")
        results_file.flush()  # a crash loses at most the samples still running
        done[(record["task_id"], record["sample_index"])] = record
        finished += 1
        passed += record["passed"]
        if on_result:
            on_result(record)
        if finished % 50 == 0 or finished == len(todo):
            log.info("%s: %d/%d executed, %d passed (%.0f s)", language, finished,
                     len(todo), passed, time.perf_counter() - started)
