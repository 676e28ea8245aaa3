#!/usr/bin/env bash
# Stop what prefect-up.sh started: the worker (it needs two SIGINTs in prefect 3.8.8), then the
# server (SIGTERM); and point the profile back at the embedded backend.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
export PREFECT_HOME="$(realpath -m "${PREFECT_HOME:-.prefect}")"
STATE="$PREFECT_HOME/local"

stop() {  # stop <name> <pidfile> <signals...>
  local name=$1 pidfile=$2; shift 2
  [[ -f "$pidfile" ]] || { echo "$name: not running"; return 0; }
  local pid; pid=$(cat "$pidfile")
  if ! kill -0 "$pid" 2>/dev/null; then rm -f "$pidfile"; echo "$name: not running"; return 0; fi
  for sig in "$@"; do kill "-$sig" "$pid" 2>/dev/null; sleep 1; done
  for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid"; fi
  rm -f "$pidfile"; echo "$name: stopped"
}

stop worker "$STATE/worker.pid" INT INT
stop server "$STATE/server.pid" TERM
"$VENV/bin/prefect" config unset PREFECT_API_URL >/dev/null 2>&1 || true
