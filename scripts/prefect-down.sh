#!/usr/bin/env bash
# Stop what prefect-up.sh started: the worker (it needs two SIGINTs in prefect 3.8.8), the server
# (SIGTERM) and its PostgreSQL cluster if it has one (the data stays); and point the project's
# profile back at the embedded backend, so `mft run` runs without a server again.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
export PREFECT_HOME="$PWD/.prefect"
STATE="$PREFECT_HOME/local"

# Whether a process runs; a zombie counts as gone (where nothing reaps orphans, `kill -0` succeeds on one).
running() { [[ "$(ps -o stat= -p "$1" 2>/dev/null)" =~ ^[^Z] ]]; }

stop() {  # stop <name> <pidfile> <signals...>
  local name=$1 pidfile=$2; shift 2
  [[ -f "$pidfile" ]] || { echo "$name: not running"; return 0; }
  local pid; pid=$(cat "$pidfile")
  if ! running "$pid"; then rm -f "$pidfile"; echo "$name: not running"; return 0; fi
  for sig in "$@"; do kill "-$sig" "$pid" 2>/dev/null; sleep 1; done
  for _ in $(seq 1 30); do running "$pid" || break; sleep 0.5; done
  if running "$pid"; then kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid"; fi
  rm -f "$pidfile"; echo "$name: stopped"
}

stop worker "$STATE/worker.pid" INT INT
stop server "$STATE/server.pid" TERM
rm -f "$STATE/server.settings"
scripts/prefect-db.sh stop  # says so only when there was one running
"$VENV/bin/prefect" config unset PREFECT_API_URL >/dev/null 2>&1 || true
