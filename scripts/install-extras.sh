#!/usr/bin/env bash
# Installs the Debian packages of the Prefect set-up beyond the pipeline itself:
#   postgresql   the database of a shared Prefect server (MFT_PREFECT_DB=postgres make prefect-up)
#   chromium     the headless browser the tests load the Prefect UI with (tests/browser.py)
#
#   scripts/install-extras.sh postgresql chromium           # install what is missing
#   scripts/install-extras.sh --check postgresql chromium   # only report; exit 1 when something is missing
#
# Idempotent: `apt-get update` only runs when a package is actually missing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/apt-install.sh"

CHECK_ONLY=0
if [[ "${1:-}" == "--check" ]]; then CHECK_ONLY=1; shift; fi
log() { echo "[install-extras] $*"; }

missing=()
for name in "$@"; do
    case "$name" in
        # Debian's server binaries live in /usr/lib/postgresql/<major>/bin, off the PATH.
        postgresql) compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql) ;;
        chromium) command -v chromium >/dev/null || missing+=(chromium) ;;
        *) log "unknown package '$name' (known: postgresql, chromium)"; exit 2 ;;
    esac
done

if (( ${#missing[@]} == 0 )); then
    log "present: $*"
    exit 0
fi
if (( CHECK_ONLY )); then
    log "missing: ${missing[*]} (install: scripts/install-extras.sh ${missing[*]})"
    exit 1
fi
apt_install install-extras "${missing[@]}"
