"""The sandbox itself: isolation detection, what a step sees, limits, and the fallbacks."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from eval_testing import processes_with_token, wait_until_gone
from mft_core.eval.assemble import assemble_program
from mft_core.eval.execute import ExecutionConfig, ProgramRunner
from mft_core.eval.problems import load_problems
from mft_core.eval.sandbox import (TOOLCHAINS_IN_SANDBOX, Isolation, Limits, SandboxError,
                                   check_reachable, default_hidden, detect_isolation, hideable,
                                   leased_slots, processes_of_uid, require_isolation, toolchains_dir)

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (unprivileged uids, namespaces)")


@root_only
def test_namespaces_work_here_as_root():
    if os.environ.get("MFT_SANDBOX_ISOLATION"):
        pytest.skip("isolation forced by MFT_SANDBOX_ISOLATION")
    assert detect_isolation() is Isolation.NAMESPACES


@root_only
def test_a_namespace_step_is_unprivileged_offline_limited_and_has_a_private_tmp():
    if detect_isolation() is not Isolation.NAMESPACES:
        pytest.skip("namespaces unavailable here")
    script = ("id -u; grep NoNewPrivs /proc/self/status; ls -A /tmp | wc -l; ls /proc | grep -c '^[0-9]'; "
              "cat /proc/self/limits; (exec 3<>/dev/tcp/127.0.0.1/22) 2>&1 | tail -c 200 || true")
    limits = Limits(address_space_bytes=1 << 30, cpu_seconds=7, file_size_bytes=1 << 20, processes=99)
    with leased_slots(1) as (slot,), \
            slot.sample_dir(toolchains_dir() / "scratch") as sample:
        step = slot.run(["bash", "-c", script], sample=sample, step="probe", timeout_s=10, limits=limits)
    lines = step.stdout_tail.splitlines()
    assert step.returncode == 0, step.output_tail()
    assert lines[0] == str(slot.uid)
    assert lines[1].split() == ["NoNewPrivs:", "1"]
    assert lines[2] == "0"  # a fresh, empty /tmp
    assert int(lines[3]) < 10  # its own PID namespace and /proc
    text = step.stdout_tail
    assert "Max address space         1073741824" in text
    assert "Max cpu time              7" in text
    assert "Max file size             1048576" in text
    assert "Max processes             99" in text
    assert "Max core file size        0" in text
    assert "Network is unreachable" in step.output_tail()


@pytest.mark.parametrize("isolation", list(Isolation))
def test_every_isolation_level_kills_timeouts_and_detached_children(isolation):
    if isolation in (Isolation.NAMESPACES, Isolation.UID) and os.geteuid() != 0:
        pytest.skip("needs root")
    if isolation is Isolation.USER_NAMESPACES and os.geteuid() == 0:
        pytest.skip("for ordinary users: test_eval_hostile.py runs the hostile tests as one")
    if isolation.namespaced and detect_isolation() is not isolation:
        pytest.skip("namespaces unavailable here")
    token = secrets.token_hex(6)
    detach = f"setsid sh -c 'sleep 30; : {token}' >/dev/null 2>&1 & exit 3"
    with leased_slots(1, isolation) as (slot,), \
            slot.sample_dir(toolchains_dir() / "scratch") as sample:
        started = time.monotonic()
        step = slot.run(["sh", "-c", detach], sample=sample, step="detach", timeout_s=5, limits=Limits())
        assert step.returncode == 3 and time.monotonic() - started < 2
        assert wait_until_gone(lambda: processes_with_token(token)) == []
        if slot.uid is not None:
            assert wait_until_gone(lambda: processes_of_uid(slot.uid)) == []
        started = time.monotonic()
        step = slot.run(["sh", "-c", f"sleep 30; : {token}"], sample=sample, step="sleep",
                        timeout_s=0.5, limits=Limits())
        assert step.timed_out and step.returncode is None
        assert time.monotonic() - started < 1.5
        assert wait_until_gone(lambda: processes_with_token(token)) == []


def test_output_is_capped_to_a_tail():
    with leased_slots(1) as (slot,), slot.sample_dir(toolchains_dir() / "scratch") as sample:
        step = slot.run(["sh", "-c", "head -c 100000 /dev/zero | tr '\\0' x; echo END >&2"],
                        sample=sample, step="flood", timeout_s=10, limits=Limits())
    assert step.stdout_bytes == 100000 and len(step.stdout_tail) == 4096
    assert step.stderr_tail == "END\n"


def test_sample_directory_is_removed_even_on_error():
    with leased_slots(1) as (slot,):
        with pytest.raises(RuntimeError):
            with slot.sample_dir(toolchains_dir() / "scratch") as sample:
                (sample.work / "file").write_text("x")
                raise RuntimeError("boom")
        assert not sample.work.exists()
    assert not sample.root.exists()  # released with the slot


@root_only
@pytest.mark.parametrize("place", ["tmp", "private_home"])
def test_a_toolchain_folder_anywhere_is_seen_read_only_at_the_fixed_path(place):
    """A checkout under /tmp (the sandbox's private /tmp covers it) or in a home directory only its
    owner can enter (mode 700): with namespaces a step still sees the toolchain folder, at
    TOOLCHAINS_IN_SANDBOX, read-only, and its own work directory writable."""
    if detect_isolation() is not Isolation.NAMESPACES:
        pytest.skip("namespaces unavailable here")
    if place == "tmp":
        base = Path(tempfile.mkdtemp(prefix="mft-checkout-", dir="/tmp"))
    else:
        base = Path(tempfile.mkdtemp(prefix=".mft-private-home-", dir=Path.home()))
        base.chmod(0o700)  # like /root: no one else may even traverse it
    toolchains = base / "deep" / "checkout" / ".toolchains"
    (toolchains / "node_modules").mkdir(parents=True)
    (toolchains / "node_modules" / "lib.txt").write_text("tool\n")
    for directory in (toolchains, toolchains / "node_modules"):
        directory.chmod(0o755)
    script = (f"cat {TOOLCHAINS_IN_SANDBOX}/node_modules/lib.txt; pwd; echo out > result.txt; "
              f"touch {TOOLCHAINS_IN_SANDBOX}/node_modules/poison 2>&1 | grep -c 'Read-only'")
    try:
        with leased_slots(1, toolchains=toolchains) as (slot,), \
                slot.sample_dir(toolchains / "scratch") as sample:
            step = slot.run(["sh", "-c", script], sample=sample, step="view", timeout_s=10,
                            limits=Limits())
            written = (sample.work / "result.txt").read_text()
        assert step.returncode == 0, step.output_tail()
        lines = step.stdout_tail.splitlines()
        assert lines[0] == "tool"
        assert lines[1] == str(slot.in_sandbox(sample.work))
        assert lines[1].startswith(str(TOOLCHAINS_IN_SANDBOX) + "/scratch/")
        assert written == "out\n"
        assert lines[2] == "1" and not (toolchains / "node_modules" / "poison").exists()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_unusable_toolchain_locations_are_clear_errors(tmp_path):
    check_reachable(Path("/tmp/mft-toolchains"), Isolation.NAMESPACES)  # bound: no error
    if os.geteuid() == 0:
        private = tmp_path / "private"
        (private / "inner").mkdir(parents=True)
        private.chmod(0o700)
        check_reachable(private / "inner", Isolation.NAMESPACES)
        with pytest.raises(SandboxError, match="not world-executable"):
            check_reachable(private / "inner", Isolation.UID)


def test_a_namespaced_step_sees_neither_the_checkout_nor_home_nor_the_runs_root(tmp_path):
    if not detect_isolation().namespaced:
        pytest.skip("namespaces unavailable here")
    runs_root = Path(tempfile.mkdtemp(prefix=".mft-runs-", dir=Path.home()))
    (runs_root / "model.safetensors").write_text("weights")
    checkout = Path(__file__).resolve().parents[3]
    script = f"ls -A {checkout} | wc -l; ls -A {Path.home()} | wc -l; ls -A {runs_root} 2>/dev/null | wc -l"
    try:
        with leased_slots(1, hidden=default_hidden(toolchains_dir(), [runs_root])) as (slot,), \
                slot.sample_dir(toolchains_dir() / "scratch") as sample:
            step = slot.run(["sh", "-c", script], sample=sample, step="look", timeout_s=10, limits=Limits())
    finally:
        shutil.rmtree(runs_root)
    assert step.returncode == 0, step.output_tail()
    assert step.stdout_tail.split() == ["0", "0", "0"]  # empty folders (runs root: gone with $HOME)


def test_only_folders_that_can_be_covered_are_hidden(tmp_path):
    base = Path(tempfile.mkdtemp(prefix=".mft-hide-", dir=Path.home()))
    try:
        (base / "a" / "b").mkdir(parents=True)
        chosen = hideable([base / "a" / "b", base / "a", Path("/"), Path("/usr"), Path("/usr/local"),
                           Path("/var/lib/dpkg"), tmp_path, base / "missing"])
        # the inner one is covered by its parent; the system, folders above its tools (/usr/local/bin)
        # and anything below /tmp (already an empty tmpfs) are never covered; below /var may be.
        # A $HOME below /tmp (scripts/fresh-clone-check.sh's) is itself already covered.
        home_in_tmp = Path("/tmp") in base.resolve().parents
        expected = [Path("/var/lib/dpkg")] + ([] if home_in_tmp else [(base / "a").resolve()])
        assert sorted(chosen) == sorted(expected)
    finally:
        shutil.rmtree(base)


def test_no_namespaces_means_no_generated_code_without_the_opt_in(monkeypatch, caplog):
    weak = Isolation.UID if os.geteuid() == 0 else Isolation.PROCESS_GROUP
    with pytest.raises(SandboxError, match=r"refusing to execute generated code without a sandbox.*"
                                           r"evaluate.allow_unsandboxed: true"):
        require_isolation(weak, allow_unsandboxed=False)
    require_isolation(weak, allow_unsandboxed=True)
    assert "can reach the network" in caplog.text
    require_isolation(Isolation.NAMESPACES, allow_unsandboxed=False)
    require_isolation(Isolation.USER_NAMESPACES, allow_unsandboxed=False)
    monkeypatch.setenv("MFT_SANDBOX_ISOLATION", weak.value)
    detect_isolation.cache_clear()
    try:
        with pytest.raises(SandboxError, match="refusing"):
            ProgramRunner(ExecutionConfig(), workers=1)
        problem = load_problems("python")[0]
        with ProgramRunner(ExecutionConfig(allow_unsandboxed=True), workers=1) as runner:
            record = runner.run(assemble_program(problem, problem.canonical_solution))
        assert record["verdict"] == "passed"
    finally:
        monkeypatch.delenv("MFT_SANDBOX_ISOLATION")
        detect_isolation.cache_clear()
