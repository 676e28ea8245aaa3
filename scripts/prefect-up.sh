#!/usr/bin/env bash
# Start a local Prefect server (state in $PREFECT_HOME, default .prefect/), create the `process`
# work pool, deploy prefect.yaml, and start a worker. Idempotent: a running server/worker is kept.
# Env: MFT_PREFECT_PORT (default 4200), PREFECT_HOME, VENV (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
export MFT_PROJECT_DIR="$PWD"
VENV="${VENV:-.venv}"
PORT="${MFT_PREFECT_PORT:-4200}"
export PREFECT_HOME="$(realpath -m "${PREFECT_HOME:-.prefect}")"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
STATE="$PREFECT_HOME/local"
API="http://127.0.0.1:$PORT/api"
mkdir -p "$STATE"

alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

if alive "$STATE/server.pid"; then
  echo "prefect server already running (pid $(cat "$STATE/server.pid"))"
else
  # setsid: the server outlives this script; its log is kept (prefect's --background discards it).
  setsid nohup "$VENV/bin/prefect" server start --host 127.0.0.1 --port "$PORT" \
    >"$STATE/server.log" 2>&1 </dev/null &
  echo $! >"$STATE/server.pid"
  echo "prefect server starting on $API (log: $STATE/server.log)"
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

# Point every prefect command run from the project root at this server (written into
# $PREFECT_HOME/profiles.toml; prefect-down.sh removes it again).
"$VENV/bin/prefect" config set "PREFECT_API_URL=$API" >/dev/null
export PREFECT_API_URL="$API"
"$VENV/bin/prefect" work-pool create local-pool --type process --overwrite >/dev/null
"$VENV/bin/prefect" --no-prompt deploy --all

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
