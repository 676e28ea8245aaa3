"""Hostile programs in every language: each must end as not passed within its timeout plus a
small margin, leave no process behind, write nothing outside its temporary directory and (with
namespaces) reach no network."""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from pathlib import Path

import pytest

from eval_testing import processes_with_token, require_toolchain, wait_until_gone
from mft_core.eval.assemble import PROGRAM_FILENAMES, Program
from mft_core.eval.sandbox import WORLD_WRITABLE_DIRS, Isolation, processes_of_uid

REPO = Path(__file__).resolve().parents[3]  # the checkout


RUN_TIMEOUT = 1.0
MARGIN = 2.0  # seconds on top of compile time + run timeout (a loaded 2-core machine)
HUGE = 4 << 30  # twice the largest address-space limit


class Listener:
    """A TCP server on 127.0.0.1 that counts the connections it accepts."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while not self._stop:
            try:
                connection, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            self.accepted += 1
            connection.close()

    def close(self):
        self._stop = True
        self._thread.join()
        self.sock.close()


def outside_targets(token: str, runner) -> list[str]:
    name = f"mft-hostile-{token}"
    return [f"/tmp/{name}", f"/var/tmp/{name}", f"/dev/shm/{name}", str(Path.home() / name),
            str(REPO / name), str(runner.toolchains / name), f"../{name}", f"../../{name}"]


def python_source(case: str, token: str, port: int, targets: list[str]) -> str:
    return {
        "infinite_loop": "while True:\n    pass\n",
        "long_sleep": "import time\ntime.sleep(30)\n",
        "fork_burst": ("import os, time\nfor _ in range(100000):\n    try:\n        os.fork()\n"
                       "    except OSError:\n        pass\ntime.sleep(30)\n"),
        "huge_allocation": f"x = bytearray({HUGE})\nx[-1] = 1\nprint('ALLOCATED')\n",
        "output_flood": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
        "write_outside": (f"for path in {targets!r}:\n    try:\n        open(path, 'w').write('x')\n"
                          "    except OSError:\n        pass\nraise SystemExit(1)\n"),
        "network": ("import socket\ntry:\n"
                    f"    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                    "    print('CONNECTED')\nexcept OSError as error:\n    print(error)\n"
                    "raise SystemExit(1)\n"),
        "detached_child": ("import subprocess\n"
                           f"subprocess.Popen(['sh', '-c', 'sleep 30; : {token}'], start_new_session=True)\n"
                           "raise SystemExit(1)\n"),
    }[case]


def cpp_source(case: str, token: str, port: int, targets: list[str]) -> str:
    body = {
        "infinite_loop": "volatile unsigned long n = 0; while (true) { n++; }",
        "long_sleep": "sleep(30);",
        "fork_burst": "for (int i = 0; i < 100000; i++) fork(); sleep(30);",
        "huge_allocation": (f"std::vector<char> v({HUGE}ULL, 1); printf(\"ALLOCATED\\n\"); "
                            "return v[0] == 1 ? 1 : 2;"),
        "output_flood": "std::string s(65536, 'x'); while (true) fwrite(s.data(), 1, s.size(), stdout);",
        "write_outside": "".join(f'{{ FILE* f = fopen("{t}", "w"); if (f) {{ fputs("x", f); fclose(f); }} }} '
                                 for t in targets) + "return 1;",
        "network": (f"int s = socket(AF_INET, SOCK_STREAM, 0); sockaddr_in a{{}}; a.sin_family = AF_INET; "
                    f"a.sin_port = htons({port}); a.sin_addr.s_addr = htonl(0x7f000001); "
                    "if (connect(s, (sockaddr*)&a, sizeof a) == 0) printf(\"CONNECTED\\n\"); return 1;"),
        "detached_child": (f'if (fork() == 0) {{ setsid(); execl("/bin/sh", "sh", "-c", "sleep 30; : {token}", '
                           "(char*)0); } return 1;"),
    }[case]
    return ("#include <cstdio>\n#include <string>\n#include <vector>\n#include <unistd.h>\n"
            "#include <sys/socket.h>\n#include <netinet/in.h>\n#include <arpa/inet.h>\n"
            f"int main() {{ {body} }}\n")


def java_source(case: str, token: str, port: int, targets: list[str]) -> str:
    targets_java = ", ".join(f'"{t}"' for t in targets)
    body = {
        "infinite_loop": "long n = 0; while (true) { n++; }",
        "long_sleep": "Thread.sleep(30000);",
        "fork_burst": ("for (int i = 0; i < 2000; i++) { try { new ProcessBuilder(\"sleep\", \"30\").start(); } "
                       "catch (Exception e) { } } Thread.sleep(30000);"),
        "huge_allocation": f"long[] a = new long[{HUGE // 8}]; System.out.println(\"ALLOCATED\" + a.length);",
        "output_flood": "String s = \"x\".repeat(65536); while (true) System.out.print(s);",
        "write_outside": (f"for (String t : new String[] {{{targets_java}}}) {{ try {{ "
                          "java.nio.file.Files.writeString(java.nio.file.Path.of(t), \"x\"); } "
                          "catch (Exception e) { } } System.exit(1);"),
        "network": (f"try {{ new java.net.Socket(\"127.0.0.1\", {port}); System.out.println(\"CONNECTED\"); }} "
                    "catch (Exception e) { System.out.println(e); } System.exit(1);"),
        "detached_child": (f"new ProcessBuilder(\"sh\", \"-c\", \"sleep 30; : {token}\").start(); "
                           "System.exit(1);"),
    }[case]
    return f"public class Main {{\n    public static void main(String[] args) throws Exception {{ {body} }}\n}}\n"


def js_source(case: str, token: str, port: int, targets: list[str]) -> str:
    return {
        "infinite_loop": "while (true) {}\n",
        "long_sleep": "setTimeout(() => {}, 30000)\n",
        "fork_burst": ("const cp = require('child_process')\nfor (let i = 0; i < 2000; i++) {\n"
                       "  try { cp.spawn('sleep', ['30'], {stdio: 'ignore'}).on('error', () => {}) } catch (e) {}\n}\n"),
        "huge_allocation": ("const kept = []\nfor (let i = 0; i < 16; i++) kept.push(Buffer.allocUnsafe(256 * 2 ** 20))\n"
                            "console.log('ALLOCATED')\n"),
        "output_flood": "const s = 'x'.repeat(65536)\nwhile (true) process.stdout.write(s)\n",
        "write_outside": (f"for (const t of {targets!r}) {{ try {{ require('fs').writeFileSync(t, 'x') }} catch (e) {{}} }}\n"
                          "process.exit(1)\n"),
        "network": (f"require('net').connect({port}, '127.0.0.1')\n"
                    "  .on('connect', () => { console.log('CONNECTED'); process.exit(1) })\n"
                    "  .on('error', (e) => { console.log(String(e)); process.exit(1) })\n"),
        "detached_child": (f"require('child_process').spawn('sh', ['-c', 'sleep 30; : {token}'], "
                           "{detached: true, stdio: 'ignore'}).unref()\nprocess.exit(1)\n"),
    }[case]


def go_source(case: str, token: str, port: int, targets: list[str]) -> str:
    targets_go = ", ".join(f'"{t}"' for t in targets)
    body = {
        "infinite_loop": "n := 0\n    for {\n        n++\n    }",
        "long_sleep": "time.Sleep(30 * time.Second)",
        "fork_burst": ("for i := 0; i < 2000; i++ {\n        exec.Command(\"sleep\", \"30\").Start()\n    }\n"
                       "    time.Sleep(30 * time.Second)"),
        "huge_allocation": (f"b := make([]byte, {HUGE})\n    for i := range b {{\n        b[i] = 1\n    }}\n"
                            "    fmt.Println(\"ALLOCATED\", len(b))"),
        "output_flood": "s := strings.Repeat(\"x\", 65536)\n    for {\n        os.Stdout.WriteString(s)\n    }",
        "write_outside": (f"for _, p := range []string{{{targets_go}}} {{\n        os.WriteFile(p, []byte(\"x\"), 0644)\n"
                          "    }\n    t.Fatal(\"done\")"),
        "network": (f"if c, err := net.Dial(\"tcp\", \"127.0.0.1:{port}\"); err == nil {{\n"
                    "        fmt.Println(\"CONNECTED\")\n        c.Close()\n    }\n    t.Fatal(\"done\")"),
        "detached_child": (f"cmd := exec.Command(\"sh\", \"-c\", \"sleep 30; : {token}\")\n"
                           "    cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}\n    cmd.Start()\n"
                           "    t.Fatal(\"done\")"),
    }[case]
    return ("package main\n\nimport (\n    \"fmt\"\n    \"net\"\n    \"os\"\n    \"os/exec\"\n"
            "    \"strings\"\n    \"syscall\"\n    \"testing\"\n    \"time\"\n)\n\n"
            "var _ = fmt.Sprint\nvar _ = net.Dial\nvar _ = os.Exit\nvar _ = exec.Command\n"
            "var _ = strings.Repeat\nvar _ = syscall.Getpid\nvar _ = time.Sleep\n\n"
            f"func TestHostile(t *testing.T) {{\n    {body}\n}}\n")


SOURCES = {"python": python_source, "cpp": cpp_source, "java": java_source, "js": js_source,
           "go": go_source}
CASES = ("infinite_loop", "long_sleep", "fork_burst", "huge_allocation", "output_flood",
         "write_outside", "network", "detached_child")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("language", list(SOURCES))
def test_hostile_program_is_contained(runner, language, case):
    require_toolchain(language)
    runner.prepare(language)  # once per runner (a cold Go cache builds for seconds): not the program's time
    token = secrets.token_hex(6)
    listener = Listener()
    targets = outside_targets(token, runner)
    try:
        source = SOURCES[language](case, token, listener.port, targets)
        program = Program(language, PROGRAM_FILENAMES[language], source)
        started = time.monotonic()
        record = runner.run(program, (f"hostile-{case}", 0), run_timeout_s=RUN_TIMEOUT)
        elapsed = time.monotonic() - started
    finally:
        listener.close()

    assert record["verdict"] != "passed", record
    assert record["verdict"] != "compile_error", record["output_tail"]  # the attack really ran
    assert "ALLOCATED" not in record["output_tail"]
    assert elapsed <= (record["compile_s"] or 0) + RUN_TIMEOUT + MARGIN, record
    if case in ("infinite_loop", "long_sleep") and runner.isolation.namespaced:
        # (without namespaces, zombies of an earlier fork burst can still count against
        # RLIMIT_NPROC until the machine's init reaps them, so the runtime may fail first)
        assert record["verdict"] == "timeout"
    if case == "detached_child":  # the runner did not wait for the child to finish
        assert record["run_s"] < RUN_TIMEOUT, record

    assert wait_until_gone(lambda: processes_with_token(token)) == []
    for uid in runner.program_uids:
        assert wait_until_gone(lambda: processes_of_uid(uid)) == [], f"uid {uid} left processes"
    leftovers = {t for t in targets if not t.startswith("..") and os.path.exists(t)}
    leftovers |= {str(p) for p in runner.toolchains.rglob(f"*{token}*")}
    for path in leftovers:
        Path(path).unlink()
    # Documented limits of the fallbacks: without namespaces /tmp & co. stay writable, and
    # without an unprivileged uid (process_group) so is everything the user may write.
    if runner.isolation is Isolation.UID:
        leftovers = {p for p in leftovers if not p.startswith(WORLD_WRITABLE_DIRS)}
    if runner.isolation is not Isolation.PROCESS_GROUP:
        assert sorted(leftovers) == [], "files written outside the sample directory"
    if runner.isolation.namespaced:
        assert listener.accepted == 0, "the program reached the network"
        assert "CONNECTED" not in record["output_tail"]


def test_the_runner_isolates_as_this_machine_allows(runner):
    """Root: namespaces with a separate uid; an ordinary user: user namespaces. The run below as an
    ordinary user sets MFT_TESTS_EXPECT_ISOLATION, so a silent fallback would fail here."""
    expected = os.environ.get("MFT_TESTS_EXPECT_ISOLATION")
    if expected:
        assert runner.isolation.value == expected
    assert runner.isolation.namespaced


ORDINARY_UID = 64990  # no account, outside the sandbox's slot uids (MFT_SANDBOX_UID_BASE + 0..127)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="already an ordinary user: the tests above ran as one")
def test_hostile_programs_are_contained_for_an_ordinary_user(runner):
    """The hostile tests above, again, as an unprivileged uid (the usual case on a GPU cluster):
    the sandbox then runs in user namespaces, where the program has the caller's own uid, so
    $HOME, the checkout and the runs root must be hidden by the mount namespace instead."""
    import pwd
    import shutil
    import subprocess
    import sys
    import tempfile

    with pytest.raises(KeyError):
        pwd.getpwuid(ORDINARY_UID)  # must not be somebody's account
    python = "/usr/bin/python3"  # the venv's interpreter may sit under /root, out of that uid's reach
    if not os.access(python, os.X_OK):
        pytest.fail(f"{python} is missing (scripts/install-toolchains.sh installs it)")
    base = Path(tempfile.mkdtemp(prefix="mft-ordinary-user-"))
    try:
        home, toolchains = base / "home", base / "toolchains"
        home.mkdir()
        (home / ".secret").write_text("not for generated code")
        for name in ("node_modules", "go-eval/go.mod", "go-eval/vendor"):
            source, target = runner.toolchains / name, toolchains / name
            target.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, target)
        for path in [base, *base.rglob("*")]:
            os.chown(path, ORDINARY_UID, ORDINARY_UID, follow_symlinks=False)
        base.chmod(0o755)
        site_packages = next(p for p in sys.path if p.endswith("site-packages") and ".venv" in p)
        env = {"HOME": str(home), "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
               "MFT_TOOLCHAINS_DIR": str(toolchains), "PYTHONPATH": f"{REPO}:{site_packages}",
               "PYTHONDONTWRITEBYTECODE": "1", "MFT_TESTS_EXPECT_ISOLATION": "user_namespaces",
               "MFT_TESTS_REQUIRE_INSTALLED": os.environ.get("MFT_TESTS_REQUIRE_INSTALLED", "")}
        done = subprocess.run(
            ["setpriv", f"--reuid={ORDINARY_UID}", f"--regid={ORDINARY_UID}", "--clear-groups",
             python, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--rootdir={REPO}",
             "-k", "not ordinary_user", str(Path(__file__))],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-2000:]
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
        expected = len(SOURCES) * len(CASES) + 1
        assert f"{expected} passed" in summary and "skipped" not in summary, summary
        assert (home / ".secret").read_text() == "not for generated code"
        assert [p.name for p in home.iterdir()] == [".secret"], "a program wrote into $HOME"
    finally:
        shutil.rmtree(base, ignore_errors=True)
