# Sourced by .ci/run: a throw-away PostgreSQL server on 127.0.0.1 for the MLflow-on-a-database test
# (tests/test_mlflow_postgres.py). Installs Debian's package when missing (as root), initialises a
# cluster in a temporary folder (as the `postgres` user when run as root), starts it, exports
# SDN_TEST_POSTGRES_DSN and stops it (and removes the folder) on exit. Without PostgreSQL the test
# is skipped with the reason when run by hand; .ci/run fails instead.
start_test_postgres() {
    if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null && [ "$(id -u)" = 0 ]; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; } >/dev/null 2>&1 \
            || echo "ci: apt-get install postgresql failed; the PostgreSQL test will be skipped"
    fi
    local bin
    bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$bin" ]; then
        echo "ci: no PostgreSQL server found; the PostgreSQL test will be skipped"
        return 0
    fi
    PG_TMP=$(mktemp -d)
    PG_BIN=$bin
    trap stop_test_postgres EXIT
    local port
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    if [ "$(id -u)" = 0 ]; then chown postgres "$PG_TMP"; fi
    _as_pg "$PG_BIN/initdb" -D "$PG_TMP/db" -U sdn --auth=trust -E UTF8 >"$PG_TMP/initdb.log" 2>&1 \
        || { cat "$PG_TMP/initdb.log"; return 1; }
    _as_pg "$PG_BIN/pg_ctl" -D "$PG_TMP/db" -l "$PG_TMP/server.log" -w \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $PG_TMP" start >/dev/null \
        || { cat "$PG_TMP/server.log"; return 1; }
    export SDN_TEST_POSTGRES_DSN="postgresql://sdn@127.0.0.1:$port/postgres"
    echo "ci: $("$PG_BIN/postgres" --version) on 127.0.0.1:$port"
}

_as_pg() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

stop_test_postgres() {
    [ -n "${PG_TMP:-}" ] || return 0
    _as_pg "$PG_BIN/pg_ctl" -D "$PG_TMP/db" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$PG_TMP"
}
