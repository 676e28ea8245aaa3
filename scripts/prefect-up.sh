#!/usr/bin/env bash
# Start the project's Prefect server, create the `process` work pool, deploy prefect.yaml, start a
# worker and set up the failure alert. All state is in .prefect/ of this checkout (prefect.toml).
# Idempotent: a running server and worker are kept; deployments and the alert are replaced.
#
# Afterwards every `prefect ...` command typed in this folder talks to this server: the API URL
# goes into the project's profile, .prefect/profiles.toml (prefect.toml's profiles_path), which
# make prefect-down clears again.
#
# Env:
#   MFT_PREFECT_PORT       port of the server and its UI (default 4200), on 127.0.0.1
#   MFT_PREFECT_DB         sqlite (default: .prefect/prefect.db) or postgres (a PostgreSQL cluster
#                          of the project's own, created on first use: scripts/prefect-db.sh)
#   MFT_ALERT_WEBHOOK_URL  webhook that gets a POST when a run fails or crashes (flows/alerts.py);
#                          unset: no alert
#   VENV                   the virtual environment (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
export MFT_PROJECT_DIR="$PWD"  # prefect.yaml's pull step: the worker runs flows from this checkout
VENV="${VENV:-.venv}"
PORT="${MFT_PREFECT_PORT:-4200}"
DB="${MFT_PREFECT_DB:-sqlite}"
API="http://127.0.0.1:$PORT/api"
export PREFECT_HOME="$PWD/.prefect"
STATE="$PREFECT_HOME/local"
mkdir -p "$STATE"
[[ "$DB" == sqlite || "$DB" == postgres ]] || { echo "MFT_PREFECT_DB must be sqlite or postgres, not '$DB'" >&2; exit 2; }

# A pid file whose process runs. A zombie counts as gone: where nothing reaps the orphans (some
# container inits), a stopped server stays a zombie, and `kill -0` still succeeds on it.
alive() { [[ -f "$1" ]] && [[ "$(ps -o stat= -p "$(cat "$1")" 2>/dev/null)" =~ ^[^Z] ]]; }

if alive "$STATE/server.pid"; then
  running="$(cat "$STATE/server.settings" 2>/dev/null || true)"
  if [[ "$running" != "port=$PORT db=$DB" ]]; then
    echo "a prefect server of this checkout already runs with ${running:-other settings}; run make prefect-down first" >&2
    exit 1
  fi
  echo "prefect server already running (pid $(cat "$STATE/server.pid"), $running)"
else
  # The UI reads the API address from the server's settings, not from --port: set it explicitly,
  # with the server's own address and the UI links its alerts carry.
  server_env=(PREFECT_SERVER_API_HOST=127.0.0.1 PREFECT_SERVER_API_PORT="$PORT"
              PREFECT_UI_API_URL="$API" PREFECT_UI_URL="http://127.0.0.1:$PORT")
  if [[ "$DB" == postgres ]]; then
    server_env+=(PREFECT_API_DATABASE_CONNECTION_URL="$(scripts/prefect-db.sh start)")
  fi
  # setsid: the server outlives this script; its log is kept (prefect's --background discards it).
  env "${server_env[@]}" setsid nohup "$VENV/bin/prefect" server start >"$STATE/server.log" 2>&1 </dev/null &
  echo $! >"$STATE/server.pid"
  echo "port=$PORT db=$DB" >"$STATE/server.settings"
  echo "prefect server starting on $API with $DB (log: $STATE/server.log)"
fi

"$VENV/bin/python" - "$API" <<'PY'
import sys, time, urllib.request
url = sys.argv[1] + "/health"
deadline = time.time() + 180
while time.time() < deadline:
    try:
        if urllib.request.urlopen(url, timeout=2).read().strip() == b"true":
            sys.exit(0)
    except OSError:
        pass
    time.sleep(0.5)
sys.exit(f"prefect server did not become healthy at {url} within 180 s; see the server log")
PY

"$VENV/bin/prefect" config set "PREFECT_API_URL=$API" >/dev/null
export PREFECT_API_URL="$API"
"$VENV/bin/prefect" work-pool create local-pool --type process --overwrite >/dev/null
"$VENV/bin/prefect" --no-prompt deploy --all
"$VENV/bin/python" -m flows.alerts

if alive "$STATE/worker.pid"; then
  echo "prefect worker already running (pid $(cat "$STATE/worker.pid"))"
else
  # --limit 1: one flow run at a time (training takes the whole machine).
  setsid nohup "$VENV/bin/prefect" worker start --pool local-pool --limit 1 \
    >"$STATE/worker.log" 2>&1 </dev/null &
  echo $! >"$STATE/worker.pid"
  echo "prefect worker started (log: $STATE/worker.log)"
fi
echo "UI: http://127.0.0.1:$PORT   run: .venv/bin/prefect deployment run mft-pipeline/default --watch"
