# Sourced by scripts/test.sh: a private PostgreSQL cluster on loopback for the hub store
# tests. Installs Debian's postgresql when its server binaries are missing (as root),
# makes a cluster in .pg/ (gitignored; elsewhere when the postgres user cannot reach
# the checkout), starts it on a free loopback port with password authentication,
# creates the test database and exports PHDS_TEST_PG_URL. Idempotent and fast when the
# cluster already runs. `phds_pg_stop` stops it (test.sh calls it from an EXIT trap).
set -euo pipefail

phds_pg_bin() {
    local dir
    for dir in /usr/lib/postgresql/*/bin; do
        [ -x "$dir/postgres" ] && [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && echo "$dir"
    done | sort -V | tail -n 1
}

PHDS_PG_BIN="$(phds_pg_bin)"
if [ -z "$PHDS_PG_BIN" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "scripts/postgres.sh: PostgreSQL server binaries not found; install Debian's postgresql (apt-get install postgresql)" >&2
        return 1 2>/dev/null || exit 1
    fi
    echo "== installing Debian's postgresql"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    # The package may create and start its own "main" cluster; ours is separate.
    apt-get install -y -qq --no-install-recommends postgresql >/dev/null
    PHDS_PG_BIN="$(phds_pg_bin)"
fi

# As root the cluster belongs to the postgres user (initdb and postgres refuse root).
if [ "$(id -u)" = 0 ]; then
    phds_pg_as() { (cd / && runuser -u postgres -- "$@"); }
    PHDS_PG_OWNER=postgres
else
    phds_pg_as() { "$@"; }
    PHDS_PG_OWNER="$(id -un)"
fi

PHDS_PG_DIR="${PHDS_PG_DIR:-$PWD/.pg}"
mkdir -p "$PHDS_PG_DIR"
chown "$PHDS_PG_OWNER" "$PHDS_PG_DIR"
if ! phds_pg_as test -w "$PHDS_PG_DIR"; then
    # e.g. a clone under /root, which the postgres user cannot enter.
    PHDS_PG_DIR="/tmp/phds-pg-$(printf '%s' "$PWD" | sha256sum | cut -c1-12)"
    mkdir -p "$PHDS_PG_DIR"
    chown "$PHDS_PG_OWNER" "$PHDS_PG_DIR"
fi
chmod 700 "$PHDS_PG_DIR"
PHDS_PG_DATA="$PHDS_PG_DIR/data"

if [ ! -s "$PHDS_PG_DATA/PG_VERSION" ]; then
    # A fresh random password: the cluster listens on loopback, which other local users share.
    phds_pg_as sh -c "umask 077; head -c 24 /dev/urandom | base64 | tr -d '/+=' >'$PHDS_PG_DIR/password'"
    phds_pg_as "$PHDS_PG_BIN/initdb" -D "$PHDS_PG_DATA" -U phds --auth=scram-sha-256 \
        --pwfile="$PHDS_PG_DIR/password" -E UTF8 --locale=C.UTF-8 >"$PHDS_PG_DIR/initdb.log" 2>&1 \
        || { cat "$PHDS_PG_DIR/initdb.log" >&2; return 1 2>/dev/null || exit 1; }
fi
PHDS_PG_PASSWORD="$(cat "$PHDS_PG_DIR/password")"

if ! phds_pg_as "$PHDS_PG_BIN/pg_ctl" status -D "$PHDS_PG_DATA" >/dev/null 2>&1; then
    PHDS_PG_PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    # Test cluster only: durability settings off for speed; TCP on loopback, no socket file.
    phds_pg_as "$PHDS_PG_BIN/pg_ctl" start -D "$PHDS_PG_DATA" -w -t 60 -l "$PHDS_PG_DIR/server.log" \
        -o "-c listen_addresses=127.0.0.1 -p $PHDS_PG_PORT -c unix_socket_directories='' -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
        >/dev/null || { tail -n 20 "$PHDS_PG_DIR/server.log" >&2; return 1 2>/dev/null || exit 1; }
fi
PHDS_PG_PORT="$(sed -n 4p "$PHDS_PG_DATA/postmaster.pid")"
export PGPASSWORD="$PHDS_PG_PASSWORD"
if ! psql -h 127.0.0.1 -p "$PHDS_PG_PORT" -U phds -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = 'phds_test'" | grep -q 1; then
    psql -h 127.0.0.1 -p "$PHDS_PG_PORT" -U phds -d postgres -qc "CREATE DATABASE phds_test" >/dev/null
fi
unset PGPASSWORD
export PHDS_TEST_PG_URL="postgresql+psycopg://phds:$PHDS_PG_PASSWORD@127.0.0.1:$PHDS_PG_PORT/phds_test"

phds_pg_stop() {
    phds_pg_as "$PHDS_PG_BIN/pg_ctl" stop -D "$PHDS_PG_DATA" -m fast >/dev/null 2>&1 || true
}

echo "== postgresql $("$PHDS_PG_BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PHDS_PG_PORT ($PHDS_PG_DIR)"
