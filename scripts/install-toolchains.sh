#!/usr/bin/env bash
# Installs what the HumanEval-X executor (mft_core/eval/) needs to run all five languages, and
# tcmalloc, the trainer's host memory allocator (train.allocator: auto).
#
# Idempotent and quick when everything is present: every item is checked first, and
# `apt-get update` only runs when an apt package is actually missing.
#
#   scripts/install-toolchains.sh            # install what is missing
#   scripts/install-toolchains.sh --check    # only report; exit 1 when something is missing
#
# Environment:
#   MFT_TOOLCHAINS_DIR   project-local toolchain folder (default: <repo>/.toolchains, gitignored)
#   MFT_HUMANEVAL_X_DIR  HumanEval-X data folder (default: <repo>/../shared/humaneval-x); only
#                        its go/evaluation/{go.mod,go.sum,vendor.tar.gz} are used here
#
# What it provides (see shared/reference/humaneval-x.md section 2):
#   apt: g++ and gcc, libboost-dev (CPP/22, CPP/137), libssl-dev (CPP/162), openjdk-17-jdk-headless
#        (Java >= 16), nodejs + npm, golang-go, util-linux (unshare, setpriv), python3 +
#        python3-numpy (the interpreter the sandbox uid runs Python samples with: it must be
#        reachable by an unprivileged uid, which a pyenv under /root is not),
#        libtcmalloc-minimal4 (the trainer: -40% peak RSS against glibc malloc, mft_core/train/launch.py)
#   npm: js-md5 (JavaScript/162) into $MFT_TOOLCHAINS_DIR/node_modules
#   Go:  the module root $MFT_TOOLCHAINS_DIR/go-eval/ = go.mod + go.sum + unpacked vendor/
set -euo pipefail

CHECK_ONLY=0
if [[ "${1:-}" == "--check" ]]; then CHECK_ONLY=1; fi

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLCHAINS_DIR="${MFT_TOOLCHAINS_DIR:-$REPO_ROOT/.toolchains}"
HUMANEVAL_X_DIR="${MFT_HUMANEVAL_X_DIR:-$REPO_ROOT/../shared/humaneval-x}"
JS_MD5_VERSION="0.7.3"   # the version CodeGeeX's Docker image pins; 0.9.2 also passes

log() { echo "[install-toolchains] $*"; }

missing_apt=()
need_apt() {  # need_apt PACKAGE TEST-COMMAND...
    local package="$1"; shift
    if "$@" >/dev/null 2>&1; then return 0; fi
    missing_apt+=("$package")
}

java_at_least_16() {
    command -v javac && command -v java || return 1
    local major
    major="$(javac -version 2>&1 | sed -E 's/^javac ([0-9]+).*/\1/')"
    [[ "$major" =~ ^[0-9]+$ ]] && (( major >= 16 ))
}

need_apt g++ command -v g++
need_apt gcc command -v gcc   # builds the sandbox launcher (mft_core/eval/sandbox.py)
need_apt libboost-dev test -f /usr/include/boost/any.hpp
need_apt libtcmalloc-minimal4 sh -c 'ldconfig -p | grep -q libtcmalloc_minimal.so.4'
need_apt libssl-dev test -f /usr/include/openssl/md5.h
need_apt openjdk-17-jdk-headless java_at_least_16
need_apt nodejs command -v node
need_apt npm command -v npm
need_apt golang-go command -v go
need_apt util-linux command -v unshare
need_apt util-linux command -v setpriv
need_apt python3 test -x /usr/bin/python3
need_apt python3-numpy /usr/bin/python3 -c "import numpy"

status=0
if (( ${#missing_apt[@]} > 0 )); then
    # de-duplicate (util-linux may be listed twice)
    mapfile -t missing_apt < <(printf '%s\n' "${missing_apt[@]}" | sort -u)
    if (( CHECK_ONLY )); then
        log "missing apt packages: ${missing_apt[*]}"
        status=1
    else
        SUDO=""
        if [[ "$(id -u)" != 0 ]]; then
            command -v sudo >/dev/null || { log "need root (or sudo) to apt-get install ${missing_apt[*]}"; exit 1; }
            SUDO="sudo"
        fi
        log "apt-get install ${missing_apt[*]}"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing_apt[@]}"
    fi
else
    log "apt packages: all present"
fi

mkdir -p "$TOOLCHAINS_DIR"

# js-md5, project-local; the executor puts $TOOLCHAINS_DIR/node_modules on NODE_PATH.
if [[ -f "$TOOLCHAINS_DIR/node_modules/js-md5/package.json" ]]; then
    log "js-md5: present"
elif (( CHECK_ONLY )); then
    log "js-md5: missing in $TOOLCHAINS_DIR/node_modules"; status=1
else
    log "npm install js-md5@$JS_MD5_VERSION into $TOOLCHAINS_DIR"
    npm install --prefix "$TOOLCHAINS_DIR" --no-save --no-audit --no-fund --loglevel=error \
        "js-md5@$JS_MD5_VERSION"
fi

# Go module root with the vendored testify v1.8.0 (offline; no module proxy is ever touched).
GO_EVAL_DIR="$TOOLCHAINS_DIR/go-eval"
GO_DATA_DIR="$HUMANEVAL_X_DIR/go/evaluation"
if [[ -f "$GO_EVAL_DIR/vendor/modules.txt" && -f "$GO_EVAL_DIR/go.mod" && -f "$GO_EVAL_DIR/go.sum" ]]; then
    log "Go module root: present ($GO_EVAL_DIR)"
elif (( CHECK_ONLY )); then
    log "Go module root: missing ($GO_EVAL_DIR)"; status=1
else
    for f in go.mod go.sum vendor.tar.gz; do
        if [[ ! -f "$GO_DATA_DIR/$f" ]]; then
            log "missing $GO_DATA_DIR/$f: set MFT_HUMANEVAL_X_DIR to the HumanEval-X folder (CodeGeeX layout)"
            exit 1
        fi
    done
    log "unpacking the Go vendor tree into $GO_EVAL_DIR"
    staging="$(mktemp -d "$TOOLCHAINS_DIR/.go-eval.XXXXXX")"
    install -m 0644 "$GO_DATA_DIR/go.mod" "$GO_DATA_DIR/go.sum" "$staging/"
    tar -xzf "$GO_DATA_DIR/vendor.tar.gz" -C "$staging" --no-same-owner
    chmod -R a+rX,go-w "$staging"
    rm -rf "$GO_EVAL_DIR"
    mv "$staging" "$GO_EVAL_DIR"
fi
# The sandbox runs samples as unprivileged uids: they must be able to read the toolchain folder
# (whatever the umask was when it was created).
# Only the installed trees: go-eval/scratch holds the private directories of running samples.
chmod a+rx "$TOOLCHAINS_DIR"
if [[ -d "$GO_EVAL_DIR" ]]; then
    chmod a+rx "$GO_EVAL_DIR"
    chmod -R a+rX,go-w "$GO_EVAL_DIR/go.mod" "$GO_EVAL_DIR/go.sum" "$GO_EVAL_DIR/vendor"
fi
if [[ -d "$TOOLCHAINS_DIR/node_modules" ]]; then
    chmod -R a+rX,go-w "$TOOLCHAINS_DIR/node_modules"
fi

if (( status == 0 )); then log "all toolchains present"; fi
exit "$status"
