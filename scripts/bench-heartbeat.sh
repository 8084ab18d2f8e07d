#!/usr/bin/env bash
# Heartbeat ingestion benchmark: accepted heartbeats/s and latency.
# Usage: scripts/bench-heartbeat.sh [embedded|production|both|failover|cluster|topologies] [SECONDS]
# `cluster`: PostgreSQL + a 3-master Redis Cluster (scripts/redis-topologies.sh,
# started here if TEST_REDIS_CLUSTER_URL is unset), one serve + one worker;
# `topologies`: `production` then `cluster`, in one run.
# `failover`: PostgreSQL + Redis under the same load, with the worker stopped
# for the middle third of the run — the circuit breaker should score inline
# while no worker is alive and go back to the queue once one reports.
# SERVER_BIN=path runs another build of `blockremote` (e.g. an older commit's)
# under the same load tool, for before/after comparisons.
# (1) the embedded default: one `serve` (SQLite, in-process queue and
# workers); (2) PostgreSQL + Redis: one `serve` and one `worker`. Needs the
# local PostgreSQL/Redis of the CI machine for (2). Results: docs/BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
WHICH=${1:-both}
SECONDS_RUN=${2:-20}
cargo build --release --bin blockremote --bin heartbeat-load >/dev/null
BIN=target/release
SERVER=${SERVER_BIN:-$BIN/blockremote}
KEY=bench-admin-key-0123456789abcdef0123456789
SECRET=whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=
export BLOCKREMOTE_ADMIN_TOKEN=$KEY BLOCKREMOTE_WEBHOOK_SECRETS=$SECRET RUST_LOG=warn
# The key-encryption key PostgreSQL deployments need (a fresh one per run).
export BLOCKREMOTE_KEK=${BLOCKREMOTE_KEK:-$(openssl rand -base64 32)}
WORK=$(mktemp -d)
DB=br_hb_bench_$(date +%s)
cleanup() {
  kill $(jobs -p) 2>/dev/null || true
  [ -f "$WORK/worker2.pid" ] && kill "$(cat "$WORK/worker2.pid")" 2>/dev/null || true
  wait 2>/dev/null || true; rm -rf "$WORK"
  if [ "$WHICH" != embedded ]; then
    psql -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" || true
    psql -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS ${DB}_c WITH (FORCE)" || true
    redis-cli --scan --pattern "bench:$DB:*" | xargs -r redis-cli del >/dev/null || true
  fi
}
trap cleanup EXIT
wait_ready() { for _ in $(seq 1 100); do curl -sf "$1/health/ready" >/dev/null && return 0; sleep 0.1; done; echo "not ready: $1" >&2; return 1; }
# CPU seconds (user + system) a process has used so far.
cpu() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$1/stat"; }
# Runs the load tool and prints the CPU the given processes spent during it,
# and the queue backlog sampled every second: a backlog that keeps growing
# means the workers score slower than ingestion accepts (not sustainable).
load() {
  local url=$1; shift
  local before=() pid i=0
  for pid in "$@"; do before+=("$(cpu "$pid")"); done
  ( while sleep 1; do
      curl -s -m 1 "$url/metrics" | awk '/^signals_queue_backlog /{printf "%s ", $2}'
    done > "$WORK/backlog" ) &
  local sampler=$!
  $BIN/heartbeat-load --url "$url" --devices 2000 --connections 64 --seconds "$SECONDS_RUN" | tee "$WORK/load.out"
  kill $sampler 2>/dev/null; wait $sampler 2>/dev/null || true
  echo "queue backlog each second during the run: $(cat "$WORK/backlog")"
  for pid in "$@"; do
    echo "cpu of pid $pid during the run (setup included): $(echo "$(cpu "$pid") - ${before[$i]}" | bc) s"
    i=$((i + 1))
  done
}
metric() { curl -s "$1/metrics" | grep -E "^(signals_(heartbeats_accepted|heartbeats_scored|degraded|queue_backlog|queue_lag|workers_)|otel_spans_)" || true; }

if [ "$WHICH" = embedded ] || [ "$WHICH" = both ]; then
  echo "== embedded default, $SECONDS_RUN s"
  BLOCKREMOTE_DATA_DIR=$WORK/embedded BLOCKREMOTE_LISTEN=127.0.0.1:18200 $SERVER serve >"$WORK/embedded.log" 2>&1 &
  PID=$!
  wait_ready http://127.0.0.1:18200
  load http://127.0.0.1:18200 $PID
  sleep 2; metric http://127.0.0.1:18200
  kill -TERM $PID; wait $PID || true
fi

if [ "$WHICH" = production ] || [ "$WHICH" = both ] || [ "$WHICH" = failover ] || [ "$WHICH" = topologies ]; then
  if [ "$WHICH" = failover ]; then
    echo "== PostgreSQL + Redis, one serve + one worker stopped for the middle third, $SECONDS_RUN s"
  else
    echo "== PostgreSQL + Redis, one serve + one worker, $SECONDS_RUN s"
  fi
  psql -q -h 127.0.0.1 -U postgres -c "CREATE DATABASE $DB"
  export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$DB REDIS_URL=redis://127.0.0.1:6379 BLOCKREMOTE_REDIS_PREFIX=bench:$DB:
  $SERVER migrate >/dev/null
  BLOCKREMOTE_DATA_DIR=$WORK/p BLOCKREMOTE_LISTEN=127.0.0.1:18201 $SERVER serve >"$WORK/p.log" 2>&1 &
  PID=$!
  wait_ready http://127.0.0.1:18201
  BLOCKREMOTE_DATA_DIR=$WORK/w $SERVER worker >"$WORK/w.log" 2>&1 &
  WORKER=$!
  if [ "$WHICH" = failover ]; then
    third=$((SECONDS_RUN / 3))
    ( sleep "$third"; kill -TERM $WORKER; echo "-- worker stopped at ${third} s"
      sleep "$third"
      BLOCKREMOTE_DATA_DIR=$WORK/w2 $SERVER worker >"$WORK/w2.log" 2>&1 &
      echo $! > "$WORK/worker2.pid"; echo "-- worker started again at $((2 * third)) s" ) &
    # Each second: seconds since the start, degraded (0/1), backlog, heartbeats scored inline so far.
    ( t=0; while sleep 1; do t=$((t + 1))
        curl -s -m 1 http://127.0.0.1:18201/metrics | awk -v t=$t '
          /^signals_degraded /{d=$2} /^signals_queue_backlog /{b=$2} /^signals_degraded_heartbeats_total /{h=$2}
          END {printf "t=%ss degraded=%s backlog=%s inline=%s\n", t, d, b, h}'
      done ) &
    SAMPLER=$!
    load http://127.0.0.1:18201 $PID
    kill $SAMPLER 2>/dev/null || true
  else
    load http://127.0.0.1:18201 $PID $WORKER $(pgrep -x redis-server | head -1)
  fi
  sleep 3; metric http://127.0.0.1:18201
  curl -s http://127.0.0.1:18201/metrics | grep -E "^signals_breaker_trips_total" || true
fi

if [ "$WHICH" = cluster ] || [ "$WHICH" = topologies ]; then
  if [ -z "${TEST_REDIS_CLUSTER_URL:-}" ]; then
    scripts/redis-topologies.sh start cluster >/dev/null
    # shellcheck disable=SC1091
    source /tmp/blockremote-redis-topologies/env
  fi
  echo "== PostgreSQL + a 3-master Redis Cluster (3 replicas), one serve + one worker, $SECONDS_RUN s"
  psql -q -h 127.0.0.1 -U postgres -c "CREATE DATABASE ${DB}_c"
  export DATABASE_URL=postgres://postgres@127.0.0.1:5432/${DB}_c REDIS_URL=$TEST_REDIS_CLUSTER_URL BLOCKREMOTE_REDIS_PREFIX=bench:${DB}_c:
  $SERVER migrate >/dev/null
  BLOCKREMOTE_DATA_DIR=$WORK/c BLOCKREMOTE_LISTEN=127.0.0.1:18202 $SERVER serve >"$WORK/c.log" 2>&1 &
  PID=$!
  wait_ready http://127.0.0.1:18202
  BLOCKREMOTE_DATA_DIR=$WORK/cw $SERVER worker >"$WORK/cw.log" 2>&1 &
  WORKER=$!
  # Every node of the cluster (masters and replicas) is counted.
  base=${BLOCKREMOTE_TOPOLOGIES_PORT:-17100}
  NODES=$(for i in 0 1 2 3 4 5; do cat "${BLOCKREMOTE_TOPOLOGIES_DIR:-/tmp/blockremote-redis-topologies}/$((base + i))/pid"; done)
  # shellcheck disable=SC2086
  load http://127.0.0.1:18202 $PID $WORKER $NODES
  sleep 3; metric http://127.0.0.1:18202
fi
