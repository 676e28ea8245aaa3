"""train.allocator: the trainer process runs on tcmalloc when it is installed (make test installs
it through scripts/install-toolchains.sh), on glibc malloc when asked, and a missing library
asked for by name is a clear error."""

import os
import subprocess
import sys

import pytest

from mft_core.train import launch
from mft_core.train.launch import allocator_env, find_tcmalloc
from tests.installed import require_installed

MAPPED = "print(any('libtcmalloc' in line for line in open('/proc/self/maps')))"


def mapped_in_child(extra_env: dict[str, str]) -> bool:
    done = subprocess.run([sys.executable, "-c", MAPPED], env={**os.environ, **extra_env},
                          capture_output=True, text=True, check=True)
    return done.stdout.strip() == "True"


def test_auto_preloads_tcmalloc_into_the_trainer_process():
    require_installed(None if find_tcmalloc() else "libtcmalloc-minimal4 not installed (scripts/install-toolchains.sh)")
    env = allocator_env("auto", {})
    assert env["LD_PRELOAD"] == find_tcmalloc()
    assert mapped_in_child(env)
    assert not mapped_in_child({})  # the preload, not the interpreter, brings it in
    # An LD_PRELOAD the user already has is kept.
    assert allocator_env("tcmalloc", {"LD_PRELOAD": "/x/libother.so"})["LD_PRELOAD"] == f"{find_tcmalloc()} /x/libother.so"


def test_system_keeps_glibc_malloc():
    assert allocator_env("system", {}) == {}


def test_missing_tcmalloc_asked_by_name_is_an_error_and_auto_falls_back(monkeypatch):
    monkeypatch.setattr(launch, "TCMALLOC_PATHS", ("/nonexistent/libtcmalloc_minimal.so.4",))
    with pytest.raises(ValueError, match=r"train.allocator=tcmalloc.*apt-get install libtcmalloc-minimal4"):
        allocator_env("tcmalloc", {})
    assert allocator_env("auto", {}) == {}
