#!/usr/bin/env bash
# Kill-switch benchmark: memory per idle socket, global fan-out, lock latency.
# Usage: scripts/bench-killswitch.sh [SOCKETS] [LOCKS]
# Runs (1) the embedded default, one instance; (2) two instances sharing
# PostgreSQL + Redis, sockets on B, commands through A. Needs the local
# PostgreSQL/Redis of the CI machine for (2). Results: docs/BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
SOCKETS=${1:-10000}
LOCKS=${2:-200}
ulimit -n "$(ulimit -Hn)"  # 10k sockets need ~10k descriptors in each process
cargo build --release --bin blockremote --bin killswitch-load >/dev/null
BIN=target/release
KEY=bench-admin-key-0123456789abcdef0123456789
export BLOCKREMOTE_ADMIN_TOKEN=$KEY BLOCKREMOTE_WS_HANDSHAKES_PER_MINUTE=10000000 RUST_LOG=warn
WORK=$(mktemp -d)
cleanup() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

wait_ready() { for _ in $(seq 1 100); do curl -sf "$1/health/ready" >/dev/null && return 0; sleep 0.1; done; echo "not ready: $1" >&2; return 1; }

echo "== embedded default, one instance, $SOCKETS sockets"
BLOCKREMOTE_DATA_DIR=$WORK/embedded BLOCKREMOTE_LISTEN=127.0.0.1:18100 $BIN/blockremote serve >"$WORK/embedded.log" 2>&1 &
PID=$!
wait_ready http://127.0.0.1:18100
$BIN/killswitch-load --url http://127.0.0.1:18100 --admin-key $KEY --sockets "$SOCKETS" --locks "$LOCKS" --server-pid $PID
kill -TERM $PID; wait $PID || true

echo "== PostgreSQL + Redis, two instances (sockets on B, commands via A), $SOCKETS sockets"
DB=br_bench_$(date +%s)
psql -q -h 127.0.0.1 -U postgres -c "CREATE DATABASE $DB"
trap 'cleanup; psql -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)"; redis-cli --scan --pattern "bench:*" | xargs -r redis-cli del >/dev/null' EXIT
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$DB REDIS_URL=redis://127.0.0.1:6379 BLOCKREMOTE_REDIS_PREFIX=bench:$DB:
BLOCKREMOTE_DATA_DIR=$WORK/a BLOCKREMOTE_LISTEN=127.0.0.1:18101 $BIN/blockremote serve >"$WORK/a.log" 2>&1 &
wait_ready http://127.0.0.1:18101
BLOCKREMOTE_DATA_DIR=$WORK/b BLOCKREMOTE_LISTEN=127.0.0.1:18102 $BIN/blockremote serve >"$WORK/b.log" 2>&1 &
PID_B=$!
wait_ready http://127.0.0.1:18102
$BIN/killswitch-load --url http://127.0.0.1:18101 --socket-url http://127.0.0.1:18102 --admin-key $KEY \
  --sockets "$SOCKETS" --locks "$LOCKS" --server-pid $PID_B
