"""A process sandbox for running one untrusted benchmark program (compile or run step).

What every step gets (see shared/reference/humaneval-x.md section 7 for the measurements):
- a fresh empty work directory (`SampleDir.work`: the program's cwd, HOME and TMPDIR, owned by
  the sandbox uid), always removed afterwards; stdout/stderr go to files in a root-only log
  folder of the slot;
- a new session and process group, stdin from /dev/null, stdout/stderr into files (never pipes:
  a detached child holding a pipe open would block the reader past the timeout);
- resource limits: address space, CPU seconds, file size (which also caps the output files),
  processes, open files, no core dumps;
- a wall-clock timeout enforced by the parent, after which the whole process group (and, with
  namespaces, the whole PID namespace) is SIGKILLed; without namespaces every leftover
  process of the sandbox uid (or carrying the step's marker) is swept after each step;
- a parent-death signal at the root of the chain, so nothing outlives a crashed executor.

The launcher is a small C program compiled on first use with the system's C compiler
(`SANDBOX_HELPER_SOURCE`; gcc is installed by scripts/install-toolchains.sh). It does in one
exec what a chain of util-linux tools would do in seven (~2 ms instead of ~12 ms a step).

What a step sees (namespaces): the toolchain folder, wherever it lives on the host (under /tmp,
in a home directory only its owner can enter, a deep path), at one fixed path,
`TOOLCHAINS_IN_SANDBOX` (/mnt/mft/toolchains), read-only; the step's own work directory (it
lives inside the toolchain folder's scratch area) re-bound writable at its place in that view.
The launcher opens every bind source *before* it mounts the private tmpfs over /tmp and the
view's tmpfs over /mnt, and binds from those open descriptors, so no source can be hidden by
the sandbox's own mounts, and the sandbox uid reaches them whatever the permissions of the
folders above them on the host. `SandboxSlot.in_sandbox` maps a host path to the path a program
sees.

Isolation levels, detected once per process (override with MFT_SANDBOX_ISOLATION):
- `namespaces` (root and unshare(2) works): new network, PID and mount namespaces (the
  equivalent of `unshare -n -p -f -m --mount-proc --kill-child`: no network, own PID
  namespace and /proc), private tmpfs over the world-writable directories (/tmp, /var/tmp,
  /dev/shm, /run/lock), the view of the toolchain folder described above, then an
  unprivileged uid with no_new_privs.
- `uid` (root, no working unshare): the unprivileged uid and the sweeps, but network access
  and writes to world-writable directories stay possible, the toolchain folder is used where
  it is (it must be reachable by other uids: `check_reachable`), and killed orphans are reaped by
  the machine's init (until then they count against RLIMIT_NPROC: after a fork burst the
  next sample may fail, never falsely pass).
- `process_group` (not root): process group kill plus a sweep of processes that carry this
  step's environment marker; RLIMIT_NPROC is not set (it would count all of the user's
  processes).

Unprivileged uids: each parallel worker leases a *slot*, i.e. its own uid (MFT_SANDBOX_UID_BASE,
default 64000, plus the slot index) held with an flock in /run/lock, so two executors on one
machine never share a uid and a sweep only ever kills that worker's own leftovers. A uid that
has an account (getpwuid) or running processes when first seen is skipped. Every slot also has
a second "service" uid (slot uid + 64) for long-lived helpers such as the Java compile server;
both share the slot's gid so the helper can write into the slot's work directories.
"""

from __future__ import annotations

import enum
import fcntl
import functools
import hashlib
import logging
import os
import pwd
import secrets
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MAX_SLOTS = 64
SERVICE_UID_OFFSET = 64
DEFAULT_UID_BASE = 64000
TAIL_BYTES = 4096
SETUP_FAILED_EXIT = 125
SETUP_FAILED_MARKER = "mft-sandbox: setup failed"
WORLD_WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up (never a verdict about the program)."""


class Isolation(str, enum.Enum):
    NAMESPACES = "namespaces"  # root: namespaces, the view, a separate unprivileged uid
    USER_NAMESPACES = "user_namespaces"  # an ordinary user: the same inside a user namespace
    UID = "uid"  # root without working namespaces: a separate uid only (needs the opt-in)
    PROCESS_GROUP = "process_group"  # nothing but a process group (needs the opt-in)

    @property
    def namespaced(self) -> bool:
        return self in (Isolation.NAMESPACES, Isolation.USER_NAMESPACES)

    @property
    def isolates(self) -> bool:
        """Network, /tmp and the checkout kept from the program: generated code may run without
        the `evaluate.allow_unsandboxed` opt-in."""
        return self.namespaced


# Folders never hidden from a program, nor any folder above them: the system and where its tools
# live (hiding /usr/local would hide /usr/local/bin). Below /proc, /dev, /sys nothing is hidden,
# and below the world-writable folders nothing needs to be (each step gets its own empty tmpfs).
SYSTEM_DIRS = tuple(Path(d) for d in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/usr", "/etc", "/opt",
                                      "/mnt", "/proc", "/dev", "/sys", "/run", "/var", "/srv", "/boot"))
SANDBOX_TOOLS = ("sh", "python3", "gcc", "g++", "java", "javac", "node", "go")


@dataclass(frozen=True)
class Limits:
    """Per-step resource limits. `cpu_seconds` should sit slightly above the wall timeout."""

    address_space_bytes: int | None = 1 << 30
    cpu_seconds: int = 11
    file_size_bytes: int = 16 << 20
    processes: int = 256
    open_files: int = 256


@dataclass
class StepResult:
    """How one sandboxed command ended. `returncode` is None when it was killed on timeout."""

    returncode: int | None
    timed_out: bool
    wall_s: float
    cpu_s: float
    stdout_bytes: int
    stderr_bytes: int
    stdout_tail: str
    stderr_tail: str

    @property
    def passed_exit(self) -> bool:
        return not self.timed_out and self.returncode == 0

    def output_tail(self, max_chars: int = 2000) -> str:
        parts = [text for text in (self.stderr_tail, self.stdout_tail) if text]
        joined = "\n".join(parts)
        return joined[-max_chars:]


@dataclass(frozen=True)
class SampleDir:
    root: Path  # the slot's directory (root-owned, kept while the slot lives)
    work: Path  # this sample's cwd, HOME and TMPDIR (owned by the sandbox uid)
    log: Path   # stdout/stderr files of the steps (root only)


# --------------------------------------------------------------------------------------------
# Isolation detection

# --------------------------------------------------------------------------------------------
# The launcher: one exec does the namespaces, mounts, limits and identity change.

SANDBOX_HELPER_SOURCE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <unistd.h>

static void write_file(const char *path, const char *text);

/* mft-sandbox-run [--namespaces [--user-namespace]] [--tmpfs DIR]... [--hide DIR]... [--view DIR]
 *                 [--bind-ro SRC DST]... [--bind SRC DST]... [--chdir DIR] [--uid N --gid N] [--fd3 N]
 *                 [--as B] [--cpu S] [--fsize B] [--nproc N] [--nofile N]
 *                 [--no-parent-death] -- COMMAND...
 * Dies with the thread that started it (PDEATHSIG) unless --no-parent-death (long-lived
 * services started from a short-lived thread; they end on stdin EOF). With --namespaces: new
 * network, PID and mount namespaces (with --user-namespace inside a new user namespace that maps
 * only the caller's own uid and gid, as an unprivileged user may); pid 1 (this program) opens
 * every bind source, mounts a tmpfs on the view root, binds the sources (in the order given, from
 * the descriptors opened first, so nothing it mounts can hide a source), then the private tmpfs
 * dirs and an empty read-only tmpfs over every --hide dir, mounts a fresh /proc,
 * runs COMMAND as its child and exits with its status (128+signal when killed), which makes the
 * kernel kill whatever else is left in the namespace. */

#define SETUP_FAILED 125
#define MAX_PATHS 32

static void die(const char *what, const char *arg) {
    fprintf(stderr, "mft-sandbox: setup failed: %s %s: %s\n", what, arg ? arg : "", strerror(errno));
    _exit(SETUP_FAILED);
}

static long number(const char *text) {
    char *end;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (errno || *end || value < 0) { errno = EINVAL; die("bad number", text); }
    return value;
}

static int wait_for(pid_t child) {  /* as pid 1 this also reaps orphans */
    int status;
    for (;;) {
        pid_t got = waitpid(-1, &status, 0);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) return SETUP_FAILED;
        if (got == child) return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }
}

static void write_file(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0 || write(fd, text, strlen(text)) != (ssize_t)strlen(text)) die("write", path);
    close(fd);
}

static void make_dirs(const char *path) {  /* mkdir -p for mount points on the view's tmpfs */
    char buffer[4096];
    struct stat info;
    if (stat(path, &info) == 0) return;  /* e.g. a work dir seen through a read-only bind */
    if (strlen(path) >= sizeof buffer) { errno = ENAMETOOLONG; die("mount point", path); }
    strcpy(buffer, path);
    for (char *p = buffer + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir(buffer, 0755) != 0 && errno != EEXIST) die("mkdir", buffer);
        *p = '/';
    }
    if (mkdir(buffer, 0755) != 0 && errno != EEXIST) die("mkdir", buffer);
}

static void bind(int fd, const char *target, int writable) {
    char source[64];
    snprintf(source, sizeof source, "/proc/self/fd/%d", fd);
    make_dirs(target);
    if (mount(source, target, NULL, MS_BIND | MS_REC, NULL) != 0) die("bind onto", target);
    if (writable) return;
    struct statvfs info;  /* a read-only remount must keep the flags the source mount has */
    unsigned long flags = MS_REMOUNT | MS_BIND | MS_RDONLY;
    if (fstatvfs(fd, &info) == 0) {
        if (info.f_flag & ST_NOSUID) flags |= MS_NOSUID;
        if (info.f_flag & ST_NODEV) flags |= MS_NODEV;
        if (info.f_flag & ST_NOEXEC) flags |= MS_NOEXEC;
    }
    if (mount(NULL, target, NULL, flags, NULL) != 0) die("read-only remount of", target);
}

int main(int argc, char **argv) {
    const char *tmpfs[MAX_PATHS], *hide[MAX_PATHS], *bind_source[MAX_PATHS], *bind_target[MAX_PATHS];
    int bind_writable[MAX_PATHS], bind_fd[MAX_PATHS];
    int n_tmpfs = 0, n_hide = 0, n_binds = 0, namespaces = 0, user_namespace = 0, parent_death = 1, i;
    const char *view = NULL, *workdir = NULL;
    int fd3 = -1;  /* becomes descriptor 3 of COMMAND: the completion marker's pipe (execute.py) */
    long uid = -1, gid = -1;
    int resources[8]; long values[8]; int n_limits = 0;
    for (i = 1; i < argc && strcmp(argv[i], "--") != 0; i++) {
        const char *opt = argv[i];
        if (!strcmp(opt, "--namespaces")) { namespaces = 1; continue; }
        if (!strcmp(opt, "--user-namespace")) { user_namespace = 1; continue; }
        if (!strcmp(opt, "--no-parent-death")) { parent_death = 0; continue; }
        if (i + 1 >= argc) { errno = EINVAL; die("missing value for", opt); }
        const char *val = argv[++i];
        if (!strcmp(opt, "--bind") || !strcmp(opt, "--bind-ro")) {
            if (i + 1 >= argc || n_binds >= MAX_PATHS) { errno = EINVAL; die("bad", opt); }
            bind_writable[n_binds] = !strcmp(opt, "--bind");
            bind_source[n_binds] = val;
            bind_target[n_binds++] = argv[++i];
        }
        else if (!strcmp(opt, "--tmpfs") && n_tmpfs < MAX_PATHS) tmpfs[n_tmpfs++] = val;
        else if (!strcmp(opt, "--hide") && n_hide < MAX_PATHS) hide[n_hide++] = val;
        else if (!strcmp(opt, "--view")) view = val;
        else if (!strcmp(opt, "--chdir")) workdir = val;
        else if (!strcmp(opt, "--fd3")) fd3 = (int)number(val);
        else if (!strcmp(opt, "--uid")) uid = number(val);
        else if (!strcmp(opt, "--gid")) gid = number(val);
        else if (!strcmp(opt, "--as")) { resources[n_limits] = RLIMIT_AS; values[n_limits++] = number(val); }
        else if (!strcmp(opt, "--cpu")) { resources[n_limits] = RLIMIT_CPU; values[n_limits++] = number(val); }
        else if (!strcmp(opt, "--fsize")) { resources[n_limits] = RLIMIT_FSIZE; values[n_limits++] = number(val); }
        else if (!strcmp(opt, "--nproc")) { resources[n_limits] = RLIMIT_NPROC; values[n_limits++] = number(val); }
        else if (!strcmp(opt, "--nofile")) { resources[n_limits] = RLIMIT_NOFILE; values[n_limits++] = number(val); }
        else { errno = EINVAL; die("unknown option", opt); }
        if (n_limits >= 7) { errno = EINVAL; die("too many limits", opt); }
    }
    if (i + 1 >= argc) { errno = EINVAL; die("no command after --", NULL); }
    char **command = argv + i + 1;
    if ((n_binds || view || n_hide || user_namespace) && !namespaces) {
        errno = EINVAL; die("--bind, --hide, --view and --user-namespace need", "--namespaces");
    }
    if (user_namespace && (uid >= 0 || gid >= 0)) { errno = EINVAL; die("--user-namespace maps only", "the caller"); }

    pid_t parent = getppid();
    if (parent_death && (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != parent))
        _exit(SETUP_FAILED);
    if (namespaces) {
        uid_t outer_uid = getuid();
        gid_t outer_gid = getgid();
        if (unshare((user_namespace ? CLONE_NEWUSER : 0) | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWNS) != 0)
            die("unshare", NULL);
        if (user_namespace) {  /* the same ids inside: a non-root uid, so exec drops the capabilities */
            char map[64];
            write_file("/proc/self/setgroups", "deny");
            snprintf(map, sizeof map, "%u %u 1\n", (unsigned)outer_uid, (unsigned)outer_uid);
            write_file("/proc/self/uid_map", map);
            snprintf(map, sizeof map, "%u %u 1\n", (unsigned)outer_gid, (unsigned)outer_gid);
            write_file("/proc/self/gid_map", map);
        }
        pid_t init = fork();
        if (init < 0) die("fork", NULL);
        if (init > 0) _exit(wait_for(init));
        prctl(PR_SET_PDEATHSIG, SIGKILL);  /* pid 1 of the new namespaces from here on */
        if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0) die("private /", NULL);
        for (int k = 0; k < n_binds; k++)  /* before any mount below can cover a source */
            if ((bind_fd[k] = open(bind_source[k], O_PATH | O_DIRECTORY | O_CLOEXEC)) < 0)
                die("open bind source", bind_source[k]);
        /* The view first: a source's descriptor resolves to whatever is mounted on the source
         * itself, so it must be bound before a hidden folder's tmpfs goes over it. */
        if (view) {
            if (mkdir(view, 0755) != 0 && errno != EEXIST) die("mkdir", view);
            if (mount("mft-sandbox-view", view, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755") != 0)
                die("tmpfs on", view);
        }
        for (int k = 0; k < n_binds; k++) {
            bind(bind_fd[k], bind_target[k], bind_writable[k]);
            close(bind_fd[k]);
        }
        for (int k = 0; k < n_tmpfs; k++)
            if (mount("mft-sandbox", tmpfs[k], "tmpfs", MS_NOSUID | MS_NODEV, "size=16m,mode=1777") != 0)
                die("tmpfs on", tmpfs[k]);
        for (int k = 0; k < n_hide; k++)  /* the checkout, $HOME, the runs root: an empty folder */
            if (mount("mft-sandbox-hidden", hide[k], "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                      "size=4k,mode=0755") != 0)
                die("hiding", hide[k]);
        if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) != 0) die("proc", NULL);
        pid_t child = fork();
        if (child < 0) die("fork", NULL);
        if (child > 0) _exit(wait_for(child));
    }
    struct rlimit no_core = {0, 0};
    if (setrlimit(RLIMIT_CORE, &no_core) != 0) die("setrlimit core", NULL);
    for (int k = 0; k < n_limits; k++) {
        struct rlimit limit = {(rlim_t)values[k], (rlim_t)values[k]};
        if (setrlimit(resources[k], &limit) != 0) die("setrlimit", NULL);
    }
    if (gid >= 0 && (setgroups(0, NULL) != 0 || setresgid(gid, gid, gid) != 0)) die("setgid", NULL);
    if (uid >= 0 && setresuid(uid, uid, uid) != 0) die("setuid", NULL);
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) die("no_new_privs", NULL);
    if (workdir && chdir(workdir) != 0) die("chdir", workdir);  /* as the program's own uid */
    if (fd3 >= 0 && fd3 != 3) {
        if (dup2(fd3, 3) != 3) die("dup2 onto descriptor 3", NULL);
        close(fd3);
    }
    if (parent_death || namespaces)
        prctl(PR_SET_PDEATHSIG, SIGKILL);  /* a credential change cleared it */
    execvp(command[0], command);
    fprintf(stderr, "mft-sandbox: cannot execute %s: %s\n", command[0], strerror(errno));
    _exit(127);
}
"""


def toolchains_dir() -> Path:
    """Project-local toolchain folder: $MFT_TOOLCHAINS_DIR or <repo>/.toolchains."""
    return Path(os.environ.get("MFT_TOOLCHAINS_DIR")
                or Path(__file__).resolve().parents[2] / ".toolchains")


# The fixed view of a namespaced step (see the module docstring): a tmpfs on VIEW_MOUNT holds the
# mount point of the toolchain folder. /mnt is the FHS's place for temporary mounts; whatever the
# host has there is hidden from the program (the launcher opened its sources before).
VIEW_MOUNT = Path("/mnt")
TOOLCHAINS_IN_SANDBOX = VIEW_MOUNT / "mft" / "toolchains"


@dataclass(frozen=True)
class Bind:
    """A host directory made visible inside a namespaced step at `target`."""

    source: Path
    target: Path
    writable: bool = False


@functools.lru_cache(maxsize=1)
def sandbox_helper() -> Path:
    """The compiled launcher, built on first use with the system's C compiler."""
    digest = hashlib.sha256(SANDBOX_HELPER_SOURCE.encode()).hexdigest()[:12]
    target = toolchains_dir() / "sandbox-helper" / digest / "mft-sandbox-run"
    if target.is_file():
        return target
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise SandboxError("sandbox: no C compiler to build the sandbox launcher: install gcc "
                           "(scripts/install-toolchains.sh does)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file():
            return target
        source = target.parent / "mft-sandbox-run.c"
        source.write_text(SANDBOX_HELPER_SOURCE)
        staging = target.with_suffix(".tmp")
        for static in (["-static"], []):  # static saves the dynamic loader (~0.3 ms a step)
            done = subprocess.run([compiler, "-O2", "-Wall", *static, "-o", str(staging),
                                   str(source)], capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                break
        if done.returncode != 0:
            raise SandboxError(f"sandbox: cannot build the launcher {source}: "
                               f"{done.stderr.strip()[-500:]}")
        os.chmod(staging, 0o755)
        os.replace(staging, target)
    for directory in (target.parent, target.parent.parent):
        os.chmod(directory, 0o755)
    return target


def _helper_argv(isolation: Isolation, uid: int | None, gid: int | None, limits: Limits | None,
                 binds: Sequence[Bind] = (), workdir: Path | None = None,
                 parent_death: bool = True, hidden: Sequence[Path] = ()) -> list[str]:
    argv = [str(sandbox_helper())] + ([] if parent_death else ["--no-parent-death"])
    if isolation.namespaced:
        argv.append("--namespaces")
        if isolation is Isolation.USER_NAMESPACES:
            argv.append("--user-namespace")
        argv += [arg for d in WORLD_WRITABLE_DIRS if os.path.isdir(d) for arg in ("--tmpfs", d)]
        argv += [arg for path in hideable(hidden) for arg in ("--hide", str(path))]
        if binds:
            argv += ["--view", str(VIEW_MOUNT)]
        for bind in binds:
            argv += ["--bind" if bind.writable else "--bind-ro", str(bind.source), str(bind.target)]
        if workdir is not None:
            argv += ["--chdir", str(workdir)]
    if uid is not None:
        argv += ["--uid", str(uid), "--gid", str(gid)]
    if limits is not None:
        argv += ["--cpu", str(limits.cpu_seconds), "--fsize", str(limits.file_size_bytes),
                 "--nofile", str(limits.open_files)]
        if limits.address_space_bytes is not None:
            argv += ["--as", str(limits.address_space_bytes)]
        if uid is not None:
            argv += ["--nproc", str(limits.processes)]
        elif isolation is Isolation.USER_NAMESPACES:
            # The program runs as this user, whose processes all count against RLIMIT_NPROC.
            argv += ["--nproc", str(limits.processes + len(processes_of_uid(os.getuid())))]
    return argv + ["--"]


def hideable(paths: Sequence[Path]) -> list[Path]:
    """The folders an empty tmpfs can go over: existing ones that hold none of the system or its
    tools, are not inside /proc, /dev, /sys or a world-writable folder (empty there already), and
    are not inside another of them (its mount would cover it)."""
    keep = [*SYSTEM_DIRS, *(Path(d) for d in SYSTEM_PATH.split(":"))]
    keep += [Path(os.path.realpath(found)).parent for tool in SANDBOX_TOOLS
             if (found := shutil.which(tool, path=SYSTEM_PATH))]
    inside_only = [Path(d) for d in ("/proc", "/dev", "/sys", *WORLD_WRITABLE_DIRS)]
    chosen: list[Path] = []
    for path in sorted({Path(p).resolve() for p in paths}, key=lambda p: len(p.parts)):
        if not path.is_dir() or path == Path("/"):
            continue
        if any(path == k or path in k.parents for k in keep) or any(d in path.parents for d in inside_only):
            continue
        if any(c == path or c in path.parents for c in chosen):
            continue
        chosen.append(path)
    return chosen


def default_hidden(toolchains: Path, extra: Sequence[Path] = ()) -> list[Path]:
    """What a program has no business seeing: $HOME, the checkout this code runs from, the
    executor's working directory, the toolchain folder's own host path (the view has it read-only)
    and `extra` (the runs root)."""
    project = Path(__file__).resolve().parents[2]
    return [Path.home(), project, Path.cwd(), Path(toolchains), *extra]


def _probe_namespaces(isolation: Isolation) -> str | None:
    """None when the namespace launcher works here (with a bound view, a hidden folder and, as
    root, another uid), else the reason."""
    # A source under /tmp, unreadable for others: the view must still show it, and the
    # host's /tmp must not (the marker) — exactly what a checkout under /tmp or /root needs.
    probe_dir = Path(tempfile.mkdtemp(prefix="mft-sandbox-probe-"))
    probe_marker = Path("/tmp") / f".mft-probe-{secrets.token_hex(4)}"
    (probe_dir / "seen").write_text("")
    (probe_dir / "seen").chmod(0o644)
    os.chmod(probe_dir, 0o755)
    inside = TOOLCHAINS_IN_SANDBOX
    hidden = Path.home()
    check = ["/bin/sh", "-c", f"test ! -e {probe_marker} && test -f {inside}/seen"
                              f" && test -z \"$(ls -A {hidden})\""]
    uid = 65534 if isolation is Isolation.NAMESPACES else None
    try:
        argv = _helper_argv(isolation, uid, uid, None, [Bind(probe_dir, inside)], inside,
                            hidden=[hidden]) + check
        probe_marker.touch()
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=20,
                              env={"PATH": SYSTEM_PATH})
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"namespace probe failed: {error}"
    finally:
        probe_marker.unlink(missing_ok=True)
        shutil.rmtree(probe_dir, ignore_errors=True)
    if done.returncode != 0:
        return (f"namespace probe exited {done.returncode}: "
                f"{done.stderr.decode(errors='replace').strip()[-300:]}")
    return None


@functools.lru_cache(maxsize=1)
def detect_isolation() -> Isolation:
    """The strongest isolation that works on this machine (cached; logged once)."""
    forced = os.environ.get("MFT_SANDBOX_ISOLATION")
    root = os.geteuid() == 0
    if forced:
        try:
            isolation = Isolation(forced)
        except ValueError:
            raise SandboxError(f"MFT_SANDBOX_ISOLATION={forced!r} is not one of "
                               f"{[i.value for i in Isolation]}") from None
        if isolation in (Isolation.NAMESPACES, Isolation.UID) and not root:
            raise SandboxError(f"MFT_SANDBOX_ISOLATION={forced} needs root; use user_namespaces")
        if isolation is Isolation.USER_NAMESPACES and root:
            raise SandboxError("MFT_SANDBOX_ISOLATION=user_namespaces is for ordinary users: root keeps "
                               "its capabilities inside the namespace; use namespaces")
        log.info("sandbox isolation forced to %s by MFT_SANDBOX_ISOLATION", isolation.value)
        return isolation
    best = Isolation.NAMESPACES if root else Isolation.USER_NAMESPACES
    reason = _probe_namespaces(best)
    if reason is None:
        log.info("sandbox: isolation=%s (net/pid/mount namespaces, private /tmp, $HOME and the checkout "
                 "hidden, toolchains read-only at %s%s)", best.value, TOOLCHAINS_IN_SANDBOX,
                 ", an unprivileged uid" if root else ", inside a user namespace")
        return best
    fallback = Isolation.UID if root else Isolation.PROCESS_GROUP
    log.warning("sandbox: %s unavailable (%s); the best left is isolation=%s, which runs generated code "
                "only with evaluate.allow_unsandboxed: true", best.value, reason, fallback.value)
    _unavailable_reason[fallback] = reason
    return fallback


_unavailable_reason: dict[Isolation, str] = {}


def require_isolation(isolation: Isolation, allow_unsandboxed: bool) -> None:
    """Refuse to run generated code without namespaces unless the config opts in, saying what is
    missing and how to get it."""
    if isolation.isolates or allow_unsandboxed:
        if not isolation.isolates:
            log.warning("sandbox: running generated code with isolation=%s (evaluate.allow_unsandboxed): it "
                        "can reach the network and write wherever this user can", isolation.value)
        return
    why = _unavailable_reason.get(isolation, f"isolation is {isolation.value}")
    if os.geteuid() == 0:
        enable = "run where unshare(2) is allowed (a container needs CAP_SYS_ADMIN or --privileged)"
    else:
        enable = ("enable unprivileged user namespaces: `sysctl kernel.unprivileged_userns_clone=1` (Debian), "
                  "`sysctl user.max_user_namespaces=15000`, on Ubuntu 24.04+ "
                  "`sysctl kernel.apparmor_restrict_unprivileged_userns=0`, or run as root")
    raise SandboxError(
        f"refusing to execute generated code without a sandbox: namespaces do not work here ({why}). To fix: "
        f"{enable}. To run it anyway with only {isolation.value} isolation (the code can reach the network and "
        f"write wherever this user can), set evaluate.allow_unsandboxed: true")


# --------------------------------------------------------------------------------------------
# Process sweeps (no psutil: /proc only)

def _proc_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _real_uid_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"Uid:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def processes_of_uid(uid: int, include_zombies: bool = False) -> list[int]:
    """Pids whose real uid is `uid`. Zombies (dead, waiting to be reaped) only when asked."""
    return [pid for pid in _proc_pids() if _real_uid_of(pid) == uid
            and (include_zombies or not _is_zombie(pid))]


def processes_with_marker(marker: str) -> list[int]:
    """Pids whose environment contains MFT_SANDBOX_MARKER=<marker> (same-user processes)."""
    needle = f"MFT_SANDBOX_MARKER={marker}".encode()
    found = []
    for pid in _proc_pids():
        try:
            with open(f"/proc/{pid}/environ", "rb") as environ:
                if needle in environ.read().split(b"\0"):
                    found.append(pid)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return found


def _is_zombie(pid: int) -> bool:
    """True for a dead process awaiting its reaper, and for one that is gone already."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def _sweep(find_pids, what: str, rounds: int = 50) -> None:
    """SIGKILL whatever `find_pids()` returns until nothing alive is left (fork bursts respawn)."""
    for _ in range(rounds):
        alive = [pid for pid in find_pids() if not _is_zombie(pid)]
        if not alive:
            return
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.005)
    log.warning("sandbox: processes of %s still alive after %d kill rounds", what, rounds)


def kill_processes_of_uid(uid: int) -> None:
    if uid == 0:
        raise SandboxError("refusing to sweep uid 0")
    _sweep(lambda: processes_of_uid(uid), f"uid {uid}")


# --------------------------------------------------------------------------------------------
# Slots: one unprivileged uid per parallel worker, leased with an flock

def _lock_dir() -> Path:
    base = Path("/run/lock") if os.access("/run/lock", os.W_OK) else Path(tempfile.gettempdir())
    directory = base / "mft-eval-sandbox"
    directory.mkdir(mode=0o700, exist_ok=True)
    return directory


def uid_base() -> int:
    raw = os.environ.get("MFT_SANDBOX_UID_BASE", str(DEFAULT_UID_BASE))
    try:
        base = int(raw)
    except ValueError:
        raise SandboxError(f"MFT_SANDBOX_UID_BASE={raw!r} is not an integer") from None
    if not 1000 <= base <= 2**31 - 2 * MAX_SLOTS:
        raise SandboxError(f"MFT_SANDBOX_UID_BASE={base} must be in [1000, 2^31 - {2 * MAX_SLOTS}]")
    return base


def _uid_is_foreign(uid: int) -> bool:
    """True when the uid belongs to someone else: an account exists or processes run as it."""
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        pass
    return bool(processes_of_uid(uid, include_zombies=True))


class SandboxSlot:
    """One parallel worker's identity: a uid (None when not root), a gid, a service uid.

    `toolchains` is the folder that every namespaced step sees read-only at
    TOOLCHAINS_IN_SANDBOX; the directories a step writes (its work directory, a build cache, a
    service's slot directory) live inside it and are re-bound writable.
    """

    def __init__(self, isolation: Isolation, index: int | None, toolchains: Path,
                 lock_file=None, hidden: Sequence[Path] = ()):
        self.isolation = isolation
        self.toolchains = Path(toolchains).resolve()
        self.hidden = list(hidden)  # empty tmpfs over these (namespaces): see default_hidden
        self.index = index
        self._slot_dirs: dict[Path, Path] = {}
        self._samples = 0
        self._lock_file = lock_file
        if index is None:
            self.uid = self.gid = self.service_uid = None
        else:
            self.uid = uid_base() + index
            self.gid = self.uid
            self.service_uid = self.uid + SERVICE_UID_OFFSET

    def release(self) -> None:
        if self.uid is not None:
            kill_processes_of_uid(self.uid)
            kill_processes_of_uid(self.service_uid)
        for directory in self._slot_dirs.values():
            shutil.rmtree(directory, ignore_errors=True)
        self._slot_dirs.clear()
        if self._lock_file is not None:
            self._lock_file.close()  # releases the flock
            self._lock_file = None

    # ---- directories ------------------------------------------------------------------------

    @contextmanager
    def sample_dir(self, parent: Path) -> Iterator[SampleDir]:
        """A fresh, empty work directory under `parent`, always removed afterwards.

        The slot keeps one directory per parent (with its root-only log folder) and creates
        and removes only `work-N` per sample: on a busy disk every mkdir/rmdir costs about a
        millisecond, which matters next to a 30 ms JavaScript run.
        """
        root = self._slot_dirs.get(parent)
        if root is None or not root.is_dir():
            parent.mkdir(parents=True, exist_ok=True)
            root = Path(tempfile.mkdtemp(prefix="slot-", dir=parent))
            os.chmod(root, 0o711)
            (root / "log").mkdir(mode=0o700)
            self._slot_dirs[parent] = root
        self._samples += 1
        work = root / f"work-{self._samples}"
        work.mkdir()
        if self.uid is not None:
            os.chown(work, self.uid, self.gid)
            os.chmod(work, 0o770)
        try:
            yield SampleDir(root=root, work=work, log=root / "log")
        finally:
            shutil.rmtree(work, ignore_errors=True)
            if work.exists():  # a leftover process kept writing: sweep and retry once
                if self.uid is not None:
                    kill_processes_of_uid(self.uid)
                shutil.rmtree(work, ignore_errors=True)

    def owned_dir(self, path: Path, mode: int = 0o700) -> Path:
        """A persistent directory owned by this slot's uid (e.g. its Go build cache)."""
        path.mkdir(parents=True, exist_ok=True)
        if self.uid is not None:
            os.chown(path, self.uid, self.gid)
        os.chmod(path, mode)
        return path

    # ---- commands ---------------------------------------------------------------------------

    def in_sandbox(self, path: Path) -> Path:
        """Where a program sees `path` (a path inside the toolchain folder): under
        TOOLCHAINS_IN_SANDBOX with namespaces, the host path itself otherwise."""
        if not self.isolation.namespaced:
            return Path(path)
        try:
            inner = Path(path).resolve().relative_to(self.toolchains)
        except ValueError:
            raise SandboxError(f"{path} is outside the toolchain folder {self.toolchains}, "
                               "so a sandboxed program cannot see it") from None
        return TOOLCHAINS_IN_SANDBOX / inner

    def _argv(self, argv: Sequence[str], limits: Limits, cwd: Path, writable: Sequence[Path],
              as_service: bool) -> list[str]:
        # PR_SET_PDEATHSIG fires when the *thread* that started the process exits, so a
        # service (started by whichever worker thread needed it first) must not use it: it
        # ends when its stdin reaches EOF instead, which also happens when we die.
        uid = self.service_uid if as_service else self.uid
        binds = [Bind(self.toolchains, TOOLCHAINS_IN_SANDBOX)]
        binds += [Bind(path, self.in_sandbox(path), writable=True) for path in writable]
        return _helper_argv(self.isolation, uid, self.gid, limits, binds, self.in_sandbox(cwd),
                            parent_death=not as_service, hidden=self.hidden) + list(argv)

    def _env(self, home: Path, extra: dict[str, str] | None, marker: str) -> dict[str, str]:
        env = {"PATH": SYSTEM_PATH, "HOME": str(home), "TMPDIR": str(home), "LANG": "C.UTF-8",
               "LC_ALL": "C.UTF-8", "MFT_SANDBOX_MARKER": marker}
        env.update(extra or {})
        return env

    def _kill_leftovers(self, pgid: int, marker: str, as_service: bool) -> None:
        """SIGKILL the process group, then every remaining process of this step's identity."""
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.isolation.namespaced:
            return  # the PID namespace died with its init: nothing of this step can be left
        if self.uid is not None:
            kill_processes_of_uid(self.service_uid if as_service else self.uid)
        else:
            _sweep(lambda: processes_with_marker(marker), f"marker {marker}")

    def run(self, argv: Sequence[str], *, sample: SampleDir, step: str, timeout_s: float,
            limits: Limits, env: dict[str, str] | None = None,
            writable: Sequence[Path] = (), fd3_data: bytes | None = None) -> StepResult:
        """Run one command in `sample.work` under the sandbox and wait at most `timeout_s`.

        The work directory is writable; so are the `writable` directories (inside the toolchain
        folder); with namespaces the rest of the toolchain folder is read-only. `fd3_data`: what
        the command reads from its descriptor 3 (a pipe, closed after it: the completion
        marker, which so never appears in the program's source, argv or environment).
        """
        marker = secrets.token_hex(8)
        stdout_path, stderr_path = sample.log / f"{step}.stdout", sample.log / f"{step}.stderr"
        argv = self._argv(argv, limits, sample.work, [sample.work, *writable], as_service=False)
        pass_fds: tuple[int, ...] = ()
        if fd3_data is not None:
            read_end, write_end = os.pipe()
            os.write(write_end, fd3_data)  # a few bytes: the pipe's buffer holds them
            os.close(write_end)
            if self.uid is not None:  # Java reopens it as /proc/self/fd/3, which checks the owner
                os.fchown(read_end, self.uid, self.gid)
            argv[1:1] = ["--fd3", str(read_end)]
            pass_fds = (read_end,)
        try:
            with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
                start = time.perf_counter()
                proc = subprocess.Popen(argv, cwd=sample.work,
                                        env=self._env(self.in_sandbox(sample.work), env, marker),
                                        stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                        start_new_session=True, close_fds=True, pass_fds=pass_fds)
        finally:
            for fd in pass_fds:
                os.close(fd)
        try:
            timed_out = not _wait_exit(proc.pid, timeout_s)
            # The leader is now a zombie or still running, so its pid (the group id) cannot be
            # recycled yet: kill the group and sweep leftovers first, reap afterwards.
            self._kill_leftovers(proc.pid, marker, as_service=False)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - start
            proc.returncode = os.waitstatus_to_exitcode(status)
        finally:
            if proc.returncode is None:  # interrupted: kill it, but never leave a zombie
                self._kill_leftovers(proc.pid, marker, as_service=False)
                _reap(proc)
        stderr_tail = _tail(stderr_path)
        if proc.returncode == SETUP_FAILED_EXIT and SETUP_FAILED_MARKER in stderr_tail:
            # Not raised: a program could print this itself. The run is simply not a pass;
            # systematic set-up problems are caught by the probes before any sample runs.
            log.warning("sandbox: step %s: %s", step, stderr_tail.strip()[-300:])
        return StepResult(
            returncode=None if timed_out else proc.returncode, timed_out=timed_out, wall_s=wall,
            cpu_s=usage.ru_utime + usage.ru_stime,
            stdout_bytes=stdout_path.stat().st_size, stderr_bytes=stderr_path.stat().st_size,
            stdout_tail=_tail(stdout_path), stderr_tail=stderr_tail)

    def start_service(self, argv: Sequence[str], *, cwd: Path, limits: Limits,
                      env: dict[str, str] | None = None, stderr_path: Path,
                      writable: Sequence[Path] = ()) -> subprocess.Popen:
        """Start a long-lived helper under the service uid with stdin/stdout pipes; `cwd` and
        `writable` are directories inside the toolchain folder (see `run`).

        The caller owns the returned process: it must call `stop_service` on it.
        """
        marker = secrets.token_hex(8)
        env_all = self._env(self.in_sandbox(cwd), env, marker)
        with open(stderr_path, "wb") as err:
            proc = subprocess.Popen(self._argv(argv, limits, cwd, writable, as_service=True),
                                    cwd=cwd,
                                    env=env_all, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=err, start_new_session=True, close_fds=True)
        proc.mft_marker = marker  # type: ignore[attr-defined]
        return proc

    def stop_service(self, proc: subprocess.Popen) -> None:
        for stream in (proc.stdin, proc.stdout):
            try:
                if stream:
                    stream.close()
            except OSError:
                pass
        if proc.returncode is None:
            self._kill_leftovers(proc.pid, getattr(proc, "mft_marker", ""), as_service=True)
        _reap(proc)


def _reap(proc: subprocess.Popen) -> None:
    if proc.returncode is not None:  # already reaped: its pid may belong to someone else now
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        log.error("sandbox: pid %d did not die after SIGKILL", proc.pid)


def _wait_exit(pid: int, timeout_s: float) -> bool:
    """Block until `pid` exits (True) or the timeout passes (False), without reaping it."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    if pidfd is not None:
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            return bool(poller.poll(max(0.0, timeout_s) * 1000))
        finally:
            os.close(pidfd)
    deadline = time.monotonic() + timeout_s  # old kernels: poll waitid without reaping
    while time.monotonic() < deadline:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        time.sleep(0.002)
    return False


def _tail(path: Path, max_bytes: int = TAIL_BYTES) -> str:
    with open(path, "rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        handle.seek(max(0, size - max_bytes))
        return handle.read().decode("utf-8", errors="replace")


# --------------------------------------------------------------------------------------------
# Leasing

def acquire_slots(count: int, isolation: Isolation | None = None,
                  toolchains: Path | None = None, hidden: Sequence[Path] | None = None) -> list[SandboxSlot]:
    """Lease `count` slots (uids) for parallel workers; release each with `slot.release()`.

    `isolation` defaults to the detected one; a weaker level may be asked for (tests of the
    fallbacks), a stronger one than the machine supports fails at the first run.
    `toolchains`: the folder steps see (default: `toolchains_dir()`). `hidden`: the folders
    covered by an empty tmpfs in namespaced steps (default: `default_hidden`).
    """
    isolation = isolation or detect_isolation()
    toolchains = Path(toolchains or toolchains_dir())
    hidden = default_hidden(toolchains) if hidden is None else list(hidden)
    sandbox_helper()  # built (or its absence reported) before any slot is leased
    if isolation in (Isolation.NAMESPACES, Isolation.UID) and os.geteuid() != 0:
        raise SandboxError(f"isolation={isolation.value} needs root")
    if isolation in (Isolation.USER_NAMESPACES, Isolation.PROCESS_GROUP):  # no uids to lease
        return [SandboxSlot(isolation, None, toolchains, hidden=hidden) for _ in range(count)]
    if count > MAX_SLOTS:
        raise SandboxError(f"asked for {count} sandbox workers; at most {MAX_SLOTS}")
    lock_dir = _lock_dir()
    slots: list[SandboxSlot] = []
    try:
        for index in range(MAX_SLOTS):
            if len(slots) == count:
                break
            lock_file = open(lock_dir / f"slot-{index}.lock", "a+")
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock_file.close()
                continue
            slot = SandboxSlot(isolation, index, toolchains, lock_file, hidden=hidden)
            marker_path = lock_dir / f"slot-{index}.ours"
            if not marker_path.exists() and (_uid_is_foreign(slot.uid)
                                             or _uid_is_foreign(slot.service_uid)):
                log.warning("sandbox: uid %d or %d is in use by something else; skipping it",
                            slot.uid, slot.service_uid)
                lock_file.close()
                continue
            marker_path.touch()  # from now on its leftovers are ours to kill
            kill_processes_of_uid(slot.uid)  # leftovers of a crashed earlier run
            kill_processes_of_uid(slot.service_uid)
            slots.append(slot)
    except BaseException:
        for slot in slots:
            slot.release()
        raise
    if len(slots) < count:
        for slot in slots:
            slot.release()
        raise SandboxError(f"could not lease {count} sandbox uids from base {uid_base()} "
                           f"(all {MAX_SLOTS} busy or foreign); set MFT_SANDBOX_UID_BASE")
    return slots


@contextmanager
def leased_slots(count: int, isolation: Isolation | None = None, toolchains: Path | None = None,
                 hidden: Sequence[Path] | None = None) -> Iterator[list[SandboxSlot]]:
    slots = acquire_slots(count, isolation, toolchains, hidden)
    try:
        yield slots
    finally:
        for slot in slots:
            slot.release()


def check_reachable(path: Path, isolation: Isolation | None = None) -> None:
    """Raise a clear error when sandboxed programs could not use a folder at `path`.

    Only the `uid` level uses host paths as they are (no mount namespace to bind them into a
    view), so only there must every folder above `path` be traversable by other uids.
    """
    isolation = isolation or detect_isolation()
    if isolation is not Isolation.UID:
        return
    path = Path(path).resolve()
    for directory in [*reversed(path.parents), path]:
        if directory.exists() and not os.stat(directory).st_mode & 0o001:
            raise SandboxError(
                f"the sandbox uids cannot reach {path}: {directory} is not world-executable, and "
                f"this machine has no working mount namespaces to bind it into the sandbox "
                f"(isolation=uid). Put the toolchain folder elsewhere "
                f"(MFT_TOOLCHAINS_DIR=/var/lib/mft-toolchains, then rerun "
                f"scripts/install-toolchains.sh) or `chmod o+x {directory}`")
