#!/usr/bin/env bash
# A throwaway PostgreSQL for tests and benchmarks: initdb into a fresh
# temporary directory, listen on loopback at a free port (no Unix socket
# outside that directory), and print the shell lines that export its URL.
#
#   eval "$(scripts/pg_throwaway.sh start)"   # sets SAGAMQ_TEST_PG, SAGAMQ_PG_DIR, SAGAMQ_PG_PID
#   scripts/pg_throwaway.sh stop "$SAGAMQ_PG_DIR"
#
# Needs the PostgreSQL server binaries (initdb, pg_ctl, postgres); on Debian or
# Ubuntu: apt-get install -y postgresql. initdb refuses to run as root, so as
# root the cluster is owned by the `postgres` user (or `nobody` when that user
# does not exist) and started through runuser. Nothing touches the network
# beyond 127.0.0.1.
set -euo pipefail

find_bin() {
    local name=$1
    if command -v "$name" >/dev/null 2>&1; then
        command -v "$name"
        return
    fi
    local d
    for d in /usr/lib/postgresql/*/bin /usr/pgsql-*/bin /opt/homebrew/bin /usr/local/pgsql/bin; do
        if [ -x "$d/$name" ]; then
            echo "$d/$name"
            return
        fi
    done
    echo "pg_throwaway: $name not found; install PostgreSQL's server (apt-get install -y postgresql)" >&2
    exit 1
}

free_port() {
    python3 - <<'EOF' 2>/dev/null || echo $((20000 + RANDOM % 20000))
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()
EOF
}

as_owner() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u "$PG_USER" -- "$@"
    else
        "$@"
    fi
}

start() {
    local initdb pg_ctl
    initdb=$(find_bin initdb)
    pg_ctl=$(find_bin pg_ctl)
    PG_USER=$(id -un)
    if [ "$(id -u)" = 0 ]; then
        if getent passwd postgres >/dev/null; then PG_USER=postgres; else PG_USER=nobody; fi
    fi
    local dir
    dir=$(mktemp -d "${TMPDIR:-/tmp}/sagamq-pg.XXXXXX")
    chmod 755 "$dir"
    mkdir "$dir/data" "$dir/sock"
    if [ "$(id -u)" = 0 ]; then chown "$PG_USER" "$dir/data" "$dir/sock"; fi
    as_owner "$initdb" -D "$dir/data" -U sagamq --auth=trust -E UTF8 --locale=C.UTF-8 --no-instructions >"$dir/initdb.log" 2>&1 ||
        as_owner "$initdb" -D "$dir/data" -U sagamq --auth=trust -E UTF8 --no-instructions >"$dir/initdb.log" 2>&1 || {
        cat "$dir/initdb.log" >&2
        exit 1
    }
    local port
    port=$(free_port)
    # fsync stays on: the tests judge durability. Enough connections for
    # three instances' pools plus the tests' own.
    as_owner "$pg_ctl" -D "$dir/data" -l "$dir/data/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$dir/sock -c max_connections=200" \
        start >"$dir/pg_ctl.log" 2>&1 || {
        cat "$dir/pg_ctl.log" "$dir/data/server.log" >&2 || true
        exit 1
    }
    local pid
    pid=$(head -1 "$dir/data/postmaster.pid")
    echo "export SAGAMQ_TEST_PG='postgres://sagamq@127.0.0.1:$port/postgres'"
    echo "export SAGAMQ_PG_DIR='$dir'"
    echo "export SAGAMQ_PG_PID='$pid'"
}

stop() {
    local dir=${1:?usage: pg_throwaway.sh stop DIR}
    local pid=""
    [ -f "$dir/data/postmaster.pid" ] && pid=$(head -1 "$dir/data/postmaster.pid")
    if [ -n "$pid" ]; then
        # SIGINT is PostgreSQL's fast shutdown; by pid, then wait for it.
        kill -INT "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    case "$dir" in
    "${TMPDIR:-/tmp}"/sagamq-pg.*) rm -rf "$dir" ;;
    *) echo "pg_throwaway: not removing $dir (not a throwaway directory)" >&2 ;;
    esac
}

case "${1:-}" in
start) start ;;
stop) stop "${2:-}" ;;
*)
    echo "usage: $0 start | stop DIR" >&2
    exit 2
    ;;
esac
