#!/usr/bin/env bash
# Process-level tests of `sdxl serve`'s durable asynchronous jobs on the tiny test model:
# the SQLite store (round trip, restart, cancellation, expiry), a two-server PostgreSQL fleet
# with one server SIGKILLed mid-job, and the store's faults (a stalled SQLite, a stopped
# PostgreSQL, a server whose clock runs fast under faketime). Starts a throwaway PostgreSQL
# cluster on 127.0.0.1 (installing Debian's postgresql and faketime if missing) and removes
# it on exit. Prints PASS/FAIL per check and a summary; exits non-zero if any check failed.
#   bash jobs_tests/run.sh [TEST…]   (default: all of them; the names are in test_jobs.py's
#                                     TESTS, without `test_`)
# Server logs (and PostgreSQL's) end up in target/jobs-tests/.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=$([ "$(id -u)" -eq 0 ] || echo sudo)
LOGS=target/jobs-tests
mkdir -p "$LOGS"

cargo build --locked -p sdxl-cli

# --- PostgreSQL binaries -----------------------------------------------------------------
find_pg() {
  # the directory that holds initdb, pg_ctl and createdb (on PATH, possibly as symlinks, or
  # Debian's newest /usr/lib/postgresql/*/bin)
  PG_BIN=""
  local dir
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V); do
    if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && [ -x "$dir/createdb" ]; then PG_BIN=$dir; fi
  done
  if command -v initdb >/dev/null; then
    dir=$(dirname "$(readlink -f "$(command -v initdb)")")
    if [ -x "$dir/pg_ctl" ] && [ -x "$dir/createdb" ]; then PG_BIN=$dir; fi
  fi
  [ -n "$PG_BIN" ]
}
if ! find_pg; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql
  find_pg || { echo "postgresql installed but no initdb/pg_ctl found" >&2; exit 1; }
fi
# faketime: a fleet server whose clock runs two days fast
if ! command -v faketime >/dev/null; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq faketime
fi

# PostgreSQL refuses to run as root: then it runs as the `postgres` system user.
if [ "$(id -u)" -eq 0 ]; then
  id -u postgres >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin postgres
  as_pg() { runuser -u postgres -- "$@"; }
else
  as_pg() { "$@"; }
fi

# --- a throwaway cluster and the tests' temp dirs, removed on exit -------------------------
WORK=$(mktemp -d /tmp/sdxl-jobs-tests.XXXXXX)
PGDIR=$WORK/pg
PG_STARTED=""
TESTS_PID=""
cleanup() {
  local status=$?
  set +e
  if [ -n "$TESTS_PID" ] && kill -0 "$TESTS_PID" 2>/dev/null; then
    kill -TERM "$TESTS_PID" # it stops its servers on the way out
    wait "$TESTS_PID"
  fi
  if [ -n "$PG_STARTED" ]; then
    (cd "$PGDIR" && as_pg "$PG_BIN/pg_ctl" -D "$PGDIR/data" -m immediate -w -t 30 stop >/dev/null 2>&1)
  fi
  cp "$PGDIR/postgres.log" "$LOGS/postgres.log" 2>/dev/null
  rm -rf "$WORK"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "$PGDIR" "$WORK/tests"
if [ "$(id -u)" -eq 0 ]; then
  chmod 755 "$WORK" # mktemp makes it 0700: postgres must reach its data dir inside
  chown postgres: "$PGDIR"
fi
PG_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
(cd "$PGDIR" && as_pg "$PG_BIN/initdb" -D "$PGDIR/data" -U postgres -A trust -E UTF8 --no-sync >"$PGDIR/initdb.log" 2>&1) ||
  { cat "$PGDIR/initdb.log" >&2; exit 1; }
PG_STARTED=1
# -h: TCP on loopback only; -k: the socket in the temp dir; -F: no fsync (throwaway data)
(cd "$PGDIR" && as_pg "$PG_BIN/pg_ctl" -D "$PGDIR/data" -l "$PGDIR/postgres.log" -w -t 60 \
  -o "-h 127.0.0.1 -p $PG_PORT -k $PGDIR -F" start >/dev/null) ||
  { cat "$PGDIR/postgres.log" >&2; exit 1; }
(cd "$PGDIR" && as_pg "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres sdxl_jobs)
export SDXL_TEST_PG_URL="postgres://postgres@127.0.0.1:$PG_PORT/sdxl_jobs"
# for the outage test, which stops the cluster and starts it again on the same port
PG_AS=$([ "$(id -u)" -eq 0 ] && echo "runuser -u postgres --")
export SDXL_TEST_PG_STOP="cd $PGDIR && $PG_AS $PG_BIN/pg_ctl -D $PGDIR/data -m fast -w -t 30 stop"
export SDXL_TEST_PG_START="cd $PGDIR && $PG_AS $PG_BIN/pg_ctl -D $PGDIR/data -l $PGDIR/postgres.log -w -t 60 \
  -o '-h 127.0.0.1 -p $PG_PORT -k $PGDIR -F' start"
echo "PostgreSQL $("$PG_BIN/pg_ctl" --version | awk '{print $3}') in $PGDIR, on 127.0.0.1:$PG_PORT"

export JOBS_TEST_TMP=$WORK/tests
# in the background so that a signal to this script interrupts `wait` and runs the clean-up
python3 jobs_tests/test_jobs.py "$@" &
TESTS_PID=$!
wait "$TESTS_PID"
