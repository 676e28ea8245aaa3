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
#
# Nothing here needs the HumanEval-X data: everything comes from Debian's and npm's registries.
#
# What it provides:
#   apt: g++ and gcc (gcc also builds the sandbox launcher), libboost-dev (CPP/22, CPP/137),
#        libssl-dev (CPP/162), openjdk-17-jdk-headless (Java >= 16), nodejs + npm, golang-go,
#        golang-github-stretchr-testify-dev (Go tests' testify, with go-spew, go-difflib,
#        yaml.v3), python3 + python3-numpy (the interpreter the sandbox uid runs Python samples
#        with: system-wide, so any uid can run it), libtcmalloc-minimal4 (the trainer: -40% peak
#        RSS against glibc malloc, mft_core/train/launch.py)
#   npm: js-md5 (JavaScript/162) into $MFT_TOOLCHAINS_DIR/node_modules
#   Go:  the module root $MFT_TOOLCHAINS_DIR/go-eval/: our own go.mod and vendor/ (modules.txt +
#        the packages copied from Debian's /usr/share/gocode). HumanEval-X's own go.sum pins
#        testify 1.8.0 while Debian ships 1.8.1, so the module files are written here for the
#        versions Debian has; builds run with -mod=vendor and never touch a module proxy.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/apt-install.sh"

CHECK_ONLY=0
if [[ "${1:-}" == "--check" ]]; then CHECK_ONLY=1; fi

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLCHAINS_DIR="${MFT_TOOLCHAINS_DIR:-$REPO_ROOT/.toolchains}"
JS_MD5_VERSION="0.7.3"   # the version CodeGeeX's Docker image pins; 0.9.2 also passes

GOCODE=/usr/share/gocode/src   # where Debian's golang-*-dev packages put their sources

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
need_apt golang-github-stretchr-testify-dev test -f "$GOCODE/github.com/stretchr/testify/assert/assertions.go"
need_apt python3 test -x /usr/bin/python3
need_apt python3-numpy /usr/bin/python3 -c "import numpy"

status=0
if (( ${#missing_apt[@]} > 0 )); then
    mapfile -t missing_apt < <(printf '%s\n' "${missing_apt[@]}" | sort -u)
    if (( CHECK_ONLY )); then
        log "missing apt packages: ${missing_apt[*]}"
        status=1
    else
        apt_install install-toolchains "${missing_apt[@]}"
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

# Go module root: go.mod + vendor/ built from Debian's testify (offline; no module proxy is ever
# touched). The versions go into the module files, so a Debian upgrade rebuilds the tree.
GO_EVAL_DIR="$TOOLCHAINS_DIR/go-eval"
# module path | Debian package | packages HumanEval-X's tests import (testify/assert and its deps)
GO_MODULES=(
    "github.com/stretchr/testify|golang-github-stretchr-testify-dev|github.com/stretchr/testify/assert"
    "github.com/davecgh/go-spew|golang-github-davecgh-go-spew-dev|github.com/davecgh/go-spew/spew"
    "github.com/pmezard/go-difflib|golang-github-pmezard-go-difflib-dev|github.com/pmezard/go-difflib/difflib"
    "gopkg.in/yaml.v3|golang-gopkg-yaml.v3-dev|gopkg.in/yaml.v3"
)
go_module_version() {  # Debian 1:1.8.1-1 -> v1.8.1
    local version
    version="$(dpkg-query -W -f='${Version}' "$1" 2>/dev/null)" || return 1
    version="${version#*:}"
    echo "v${version%-*}"
}
go_modules_txt() {
    local entry module package imports version
    for entry in "${GO_MODULES[@]}"; do
        IFS='|' read -r module package imports <<<"$entry"
        version="$(go_module_version "$package")" || return 1
        printf '# %s %s\n## explicit\n%s\n' "$module" "$version" "$imports"
    done
}
if (( CHECK_ONLY )) && ! command -v dpkg-query >/dev/null; then
    log "Go module root: cannot check without dpkg-query"; status=1
elif ! wanted_modules="$(go_modules_txt)"; then
    if (( CHECK_ONLY )); then log "Go module root: testify packages missing"; status=1
    else log "Debian's testify packages are missing after apt-get"; exit 1; fi
elif [[ -f "$GO_EVAL_DIR/vendor/modules.txt" && -f "$GO_EVAL_DIR/go.mod" ]] \
        && [[ "$(cat "$GO_EVAL_DIR/vendor/modules.txt")" == "$wanted_modules" ]]; then
    log "Go module root: present ($GO_EVAL_DIR)"
elif (( CHECK_ONLY )); then
    log "Go module root: missing or out of date ($GO_EVAL_DIR)"; status=1
else
    log "writing the Go module root $GO_EVAL_DIR from Debian's packages"
    staging="$(mktemp -d "$TOOLCHAINS_DIR/.go-eval.XXXXXX")"
    {
        printf 'module humanEval\n\ngo 1.18\n\nrequire (\n'
        for entry in "${GO_MODULES[@]}"; do
            IFS='|' read -r module package imports <<<"$entry"
            printf '\t%s %s\n' "$module" "$(go_module_version "$package")"
        done
        printf ')\n'
    } >"$staging/go.mod"
    echo "$wanted_modules" >"$staging/vendor.modules.txt"
    mkdir -p "$staging/vendor"
    mv "$staging/vendor.modules.txt" "$staging/vendor/modules.txt"
    for entry in "${GO_MODULES[@]}"; do
        IFS='|' read -r module package imports <<<"$entry"
        mkdir -p "$staging/vendor/$imports"
        # the package's sources and licence, not its tests
        find "$GOCODE/$imports" -maxdepth 1 -type f \( -name '*.go' ! -name '*_test.go' -o -name 'LICENSE*' \) \
            -exec cp {} "$staging/vendor/$imports/" \;
        cp "$GOCODE/$module"/LICENSE* "$staging/vendor/$module/" 2>/dev/null || true
    done
    chmod -R a+rX,go-w "$staging"
    rm -rf "$GO_EVAL_DIR/go.mod" "$GO_EVAL_DIR/go.sum" "$GO_EVAL_DIR/vendor"
    mkdir -p "$GO_EVAL_DIR"
    mv "$staging/go.mod" "$staging/vendor" "$GO_EVAL_DIR/"
    rmdir "$staging"
    rm -rf "$TOOLCHAINS_DIR/go-cache"  # built against the old vendor tree
fi
# The sandbox runs samples as unprivileged uids: they must be able to read the toolchain folder
# (whatever the umask was when it was created).
# Only the installed trees: go-eval/scratch holds the private directories of running samples.
chmod a+rx "$TOOLCHAINS_DIR"
if [[ -d "$GO_EVAL_DIR" ]]; then
    chmod a+rx "$GO_EVAL_DIR"
    chmod -R a+rX,go-w "$GO_EVAL_DIR/go.mod" "$GO_EVAL_DIR/vendor"
fi
if [[ -d "$TOOLCHAINS_DIR/node_modules" ]]; then
    chmod -R a+rX,go-w "$TOOLCHAINS_DIR/node_modules"
fi

if (( status == 0 )); then log "all toolchains present"; fi
exit "$status"
