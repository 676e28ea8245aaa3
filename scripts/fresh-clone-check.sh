#!/usr/bin/env bash
# A new user's first hour, replayed: clone main into a folder with nothing beside it and run the
# README's two set-up commands there, each in a new shell with nothing of ours exported. Not part
# of `make test` (it runs `make test` itself, and `make demo`: about 30-45 minutes on 2 cores).
#
#   scripts/fresh-clone-check.sh DIR [both|demo|test] [--runs-from CHECKOUT] [--rev REV] [--keep-home]
#
#   DIR          a folder that does not exist yet (or is empty): the clone goes to DIR/mft-pipeline,
#                so nothing is beside it (no sibling folders, no data, no caches of this checkout)
#   both|demo|test  which README commands to run (default: both, test first)
#   --runs-from CHECKOUT  copy CHECKOUT/runs into the clone first, without its evaluate outputs: a
#                moved checkout reuses every stage whose inputs are the same (stage keys hash
#                content, never paths), and evaluate (the sandbox) runs in the new place
#   --rev REV    clone this commit instead of main's head (e.g. the one a --runs-from checkout ran)
#   --keep-home  run with your HOME (its pip, Hugging Face and test caches); by default HOME is a
#                new empty folder DIR/home, as on a fresh machine (the machine's environment,
#                its CA certificates and proxies included, is kept: only our variables are dropped)
#
# Prints a table of what ran: command, exit status, minutes, and the line that sums it up.
# The full output of each command is in DIR/<command>.log.
set -uo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
usage() { sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 2; }

[[ $# -ge 1 ]] || usage
TARGET="$1"; shift
WHAT="both"; RUNS_FROM=""; KEEP_HOME=0; REV=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        both|demo|test) WHAT="$1" ;;
        --runs-from) RUNS_FROM="${2:?--runs-from needs a checkout}"; shift ;;
        --rev) REV="${2:?--rev needs a commit}"; shift ;;
        --keep-home) KEEP_HOME=1 ;;
        *) usage ;;
    esac
    shift
done

if [[ -e "$TARGET" && -n "$(ls -A "$TARGET" 2>/dev/null)" ]]; then
    echo "fresh-clone-check: $TARGET is not empty; give a new folder" >&2; exit 2
fi
mkdir -p "$TARGET"
TARGET="$(cd "$TARGET" && pwd)"
CLONE="$TARGET/mft-pipeline"

# main as committed (not this working tree): --no-local copies objects like a network clone does
git clone --quiet --no-local --branch main "$REPO_ROOT" "$CLONE" || exit 1
if [[ -n "$REV" ]]; then git -C "$CLONE" checkout --quiet "$REV" || exit 1; fi
echo "cloned main ($(git -C "$CLONE" log -1 --format='%h %s' | cut -c1-80)) into $CLONE"
echo "beside it: $(ls -A "$TARGET" | tr '\n' ' ')"

if [[ -n "$RUNS_FROM" ]]; then
    echo "copying $RUNS_FROM/runs (the cached stages but evaluate) into the clone"
    cp -a "$RUNS_FROM/runs" "$CLONE/runs"
    # Evaluate is the stage that runs generated code in the sandbox: it must run in the new place.
    rm -rf "$CLONE/runs/evaluate" "$CLONE/runs/evaluate-base"
fi

HOME_FOR_RUN="$HOME"
if (( ! KEEP_HOME )); then
    HOME_FOR_RUN="$TARGET/home"
    mkdir -p "$HOME_FOR_RUN"
    chmod 700 "$HOME_FOR_RUN"
fi

declare -a ROWS
run_readme_command() {  # run_readme_command "make demo"
    local command="$1" log="$TARGET/${1// /-}.log" started status minutes summary
    echo "== $command (in $CLONE; log: $log)"
    started=$(date +%s)
    # A new shell of this machine: its environment (PATH, the registries' CA certificates, proxies)
    # without anything of ours: no MFT_*, HF_*, PREFECT_*, virtualenv or PYTHONPATH.
    local -a clean=()
    local name
    while IFS= read -r name; do
        case "$name" in MFT_*|HF_*|HUGGINGFACE_*|PREFECT_*|VIRTUAL_ENV|PYTHONPATH|PYTHONHOME|OLDPWD) ;; *) clean+=("$name=${!name}") ;; esac
    done < <(compgen -e)
    env -i "${clean[@]}" HOME="$HOME_FOR_RUN" TERM=dumb \
        bash -c "cd '$CLONE' && $command" >"$log" 2>&1
    status=$?
    minutes=$(( ($(date +%s) - started + 30) / 60 ))
    summary="$(grep -E '^(=+ .*(passed|failed|error).* =+|average .*|mft: error.*)$' "$log" | tail -1)"
    [[ -n "$summary" ]] || summary="$(tail -1 "$log")"
    ROWS+=("$command|$status|$minutes|$summary")
    echo "   exit $status after ~$minutes min: $summary"
}

[[ "$WHAT" == "demo" ]] || run_readme_command "make test"
[[ "$WHAT" == "test" ]] || run_readme_command "make demo"

echo
echo "fresh clone in $CLONE ($(uname -n), $(date -u +%Y-%m-%dT%H:%MZ), HOME=$HOME_FOR_RUN)"
printf '%-10s %-5s %-8s %s\n' command exit minutes summary
failed=0
for row in "${ROWS[@]}"; do
    IFS='|' read -r command status minutes summary <<<"$row"
    printf '%-10s %-5s %-8s %s\n' "$command" "$status" "$minutes" "$summary"
    [[ "$status" == 0 ]] || failed=1
done
exit "$failed"
