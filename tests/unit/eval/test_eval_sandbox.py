"""The sandbox itself: isolation detection, what a step sees, limits, and the fallbacks."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import pytest

from eval_testing import processes_with_token, wait_until_gone
from mft_core.eval.sandbox import (Isolation, Limits, SandboxError, check_reachable,
                                   detect_isolation, leased_slots, processes_of_uid,
                                   sandbox_helper, toolchains_dir)

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (unprivileged uids, namespaces)")


@root_only
def test_namespaces_work_here_as_root():
    if os.environ.get("MFT_SANDBOX_ISOLATION"):
        pytest.skip("isolation forced by MFT_SANDBOX_ISOLATION")
    assert detect_isolation() is Isolation.NAMESPACES


LAUNCHERS = ["helper", "util-linux"]


def require_launcher(launcher: str) -> None:
    if launcher == "helper" and sandbox_helper() is None:
        pytest.skip("the compiled launcher is unavailable (no C compiler)")


@root_only
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_namespace_step_is_unprivileged_offline_limited_and_has_a_private_tmp(launcher):
    require_launcher(launcher)
    if detect_isolation() is not Isolation.NAMESPACES:
        pytest.skip("namespaces unavailable here")
    script = ("id -u; grep NoNewPrivs /proc/self/status; ls -A /tmp | wc -l; ls /proc | grep -c '^[0-9]'; "
              "cat /proc/self/limits; (exec 3<>/dev/tcp/127.0.0.1/22) 2>&1 | tail -c 200 || true")
    limits = Limits(address_space_bytes=1 << 30, cpu_seconds=7, file_size_bytes=1 << 20, processes=99)
    with leased_slots(1, launcher=launcher) as (slot,), \
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


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("isolation", [Isolation.NAMESPACES, Isolation.UID, Isolation.PROCESS_GROUP])
def test_every_isolation_level_kills_timeouts_and_detached_children(isolation, launcher):
    require_launcher(launcher)
    if isolation is not Isolation.PROCESS_GROUP and os.geteuid() != 0:
        pytest.skip("needs root")
    if isolation is Isolation.NAMESPACES and detect_isolation() is not Isolation.NAMESPACES:
        pytest.skip("namespaces unavailable here")
    token = secrets.token_hex(6)
    detach = f"setsid sh -c 'sleep 30; : {token}' >/dev/null 2>&1 & exit 3"
    with leased_slots(1, isolation, launcher) as (slot,), \
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


def test_unusable_toolchain_locations_are_clear_errors(tmp_path):
    with pytest.raises(SandboxError, match="private tmpfs"):
        check_reachable(Path("/tmp/mft-toolchains"), Isolation.NAMESPACES)
    if os.geteuid() == 0:
        private = tmp_path / "private"
        (private / "inner").mkdir(parents=True)
        private.chmod(0o700)
        with pytest.raises(SandboxError, match="not world-executable"):
            check_reachable(private / "inner", Isolation.UID)
