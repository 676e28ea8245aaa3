#!/usr/bin/env bash
# The PostgreSQL database of the project's Prefect server (`MFT_PREFECT_DB=postgres make prefect-up`):
# a cluster of its own, created on first use with Debian's postgresql (scripts/install-extras.sh).
#
#   scripts/prefect-db.sh start   create it once, start it, print the server's connection URL
#   scripts/prefect-db.sh stop    stop it; the data stays (make prefect-down does this)
#   scripts/prefect-db.sh drop    stop it and delete it with all its data
#
# Where: .prefect/postgres/ for an ordinary user. As root, /var/lib/postgresql/mft-<id of this
# checkout>/, run by the `postgres` user (PostgreSQL refuses to run as root, and the postgres user
# cannot be assumed to reach a checkout in a private home). It listens on 127.0.0.1 only, on a port
# found free when the cluster is created; one role and database, both `prefect` (the cluster's
# owner), with a random password kept in <that folder>/password (mode 600).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "$(id -u)" == 0 ]]; then
    BASE="/var/lib/postgresql/mft-$(printf '%s' "$PWD" | sha256sum | cut -c1-12)"
    as_owner() { runuser -u postgres -- "$@"; }
else
    BASE="$PWD/.prefect/postgres"
    as_owner() { "$@"; }
fi
DATA="$BASE/data"

bin_dir() {  # Debian keeps the server programs off the PATH, per major version
    local dirs
    dirs="$(compgen -G '/usr/lib/postgresql/*/bin' | sort -V | tail -1)"
    [[ -n "$dirs" ]] || { echo "prefect-db: PostgreSQL is not installed; run scripts/install-extras.sh postgresql" >&2; exit 1; }
    echo "$dirs"
}
running() { [[ -f "$DATA/PG_VERSION" ]] && as_owner "$(bin_dir)/pg_ctl" -D "$DATA" status >/dev/null 2>&1; }
port() { sed -n 's/^port = \([0-9]*\)$/\1/p' "$DATA/postgresql.conf" | tail -1; }

create() {
    scripts/install-extras.sh postgresql >&2
    local bin password port
    bin="$(bin_dir)"
    mkdir -p "$BASE"
    [[ "$(id -u)" == 0 ]] && chown postgres:postgres "$BASE"
    chmod 700 "$BASE"
    password="$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
    (umask 077; printf '%s' "$password" >"$BASE/password")
    [[ "$(id -u)" == 0 ]] && chown postgres:postgres "$BASE/password"
    as_owner "$bin/initdb" -D "$DATA" -U prefect --pwfile="$BASE/password" --auth=scram-sha-256 \
        --encoding=UTF8 --locale=C >"$BASE/initdb.log" 2>&1 \
        || { cat "$BASE/initdb.log" >&2; exit 1; }
    port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    # Loopback TCP only: no Unix socket (its path would have to fit 107 bytes, and a deep checkout does not).
    printf "\n# mft-pipeline (scripts/prefect-db.sh)\nlisten_addresses = '127.0.0.1'\nport = %s\nunix_socket_directories = ''\n" \
        "$port" | as_owner tee -a "$DATA/postgresql.conf" >/dev/null
    start_server
    PGPASSWORD="$password" "$bin/createdb" -h 127.0.0.1 -p "$port" -U prefect prefect
    echo "prefect-db: created the cluster $BASE (port $port)" >&2
}

start_server() {
    running || as_owner "$(bin_dir)/pg_ctl" -D "$DATA" -l "$BASE/postgres.log" -w -t 120 start >/dev/null \
        || { tail -20 "$BASE/postgres.log" >&2; exit 1; }
}

case "${1:-}" in
    start)
        if [[ -f "$DATA/PG_VERSION" ]]; then start_server; else create; fi
        echo "postgresql+asyncpg://prefect:$(cat "$BASE/password")@127.0.0.1:$(port)/prefect"
        ;;
    stop)
        if running; then
            as_owner "$(bin_dir)/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null
            echo "postgres: stopped"
        fi
        ;;
    drop)
        if running; then as_owner "$(bin_dir)/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null; fi
        rm -rf "$BASE"
        echo "postgres: dropped $BASE"
        ;;
    *)
        echo "usage: scripts/prefect-db.sh start|stop|drop" >&2
        exit 2
        ;;
esac
