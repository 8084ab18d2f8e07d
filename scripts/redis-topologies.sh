#!/usr/bin/env bash
# Starts (or stops) the Redis topologies the production backend is tested on,
# all on loopback, nothing on disk but their configs:
#
#   cluster   6 nodes, 3 masters + 3 replicas    ports 17100-17105
#   sentinel  a primary, a replica, 3 sentinels  ports 17110-17111, 17120-17122
#   tls       one node, TLS only, client certificates required   port 17130
#
#   scripts/redis-topologies.sh start [cluster|sentinel|tls ...]   # prints the TEST_REDIS_* exports
#   scripts/redis-topologies.sh restart PORT   # a killed node comes back
#   scripts/redis-topologies.sh stop
#
# BLOCKREMOTE_TOPOLOGIES_DIR (default /tmp/blockremote-redis-topologies) and
# BLOCKREMOTE_TOPOLOGIES_PORT (default 17100, the ports above are offsets
# from it) let a fault-injection test start private copies it may break.
#
# `start` writes the exports to $DIR/env as well, for `source`. The tests read
# TEST_REDIS_CLUSTER_URL, TEST_REDIS_SENTINEL_URL, TEST_REDIS_TLS_URL and
# TEST_REDIS_TLS_DIR (CA, client certificate and key); with CI=true a test
# that needs one of them and finds it unset fails.
set -euo pipefail

DIR="${BLOCKREMOTE_TOPOLOGIES_DIR:-/tmp/blockremote-redis-topologies}"
BASE="${BLOCKREMOTE_TOPOLOGIES_PORT:-17100}"
CLUSTER_PORTS=()
for i in 0 1 2 3 4 5; do CLUSTER_PORTS+=($((BASE + i))); done
PRIMARY=$((BASE + 10))
REPLICA=$((BASE + 11))
SENTINELS=($((BASE + 20)) $((BASE + 21)) $((BASE + 22)))
TLS_PORT=$((BASE + 30))
MASTER_NAME=blockremote

wait_port() { # port
  for _ in $(seq 1 100); do
    redis-cli -p "$1" ping >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "redis on port $1 did not start" >&2
  return 1
}

node() { # port [extra args...]
  local port=$1; shift
  mkdir -p "$DIR/$port"
  redis-server --port "$port" --bind 127.0.0.1 --dir "$DIR/$port" --save "" --appendonly no \
    --daemonize yes --pidfile "$DIR/$port/pid" --logfile "$DIR/$port/log" "$@"
}

start_cluster() {
  for p in "${CLUSTER_PORTS[@]}"; do
    node "$p" --cluster-enabled yes --cluster-config-file "$DIR/$p/nodes.conf" \
      --cluster-node-timeout 2000
  done
  for p in "${CLUSTER_PORTS[@]}"; do wait_port "$p"; done
  local hosts=()
  for p in "${CLUSTER_PORTS[@]}"; do hosts+=("127.0.0.1:$p"); done
  redis-cli --cluster create "${hosts[@]}" --cluster-replicas 1 --cluster-yes >"$DIR/cluster-create.log"
  # Ready once the slots are served and every replica has synced with its
  # master: a replica that never synced cannot be promoted, so a master
  # killed before that takes its slots down for good.
  for _ in $(seq 1 300); do
    if redis-cli -p "${CLUSTER_PORTS[0]}" cluster info | grep -q 'cluster_state:ok'; then
      local synced=0
      for p in "${CLUSTER_PORTS[@]}"; do
        redis-cli -p "$p" info replication | grep -q 'master_link_status:up' && synced=$((synced + 1))
      done
      [ "$synced" -ge 3 ] && return 0
    fi
    sleep 0.1
  done
  echo "the cluster did not become ok with its replicas in sync" >&2
  return 1
}

start_sentinel() {
  node "$PRIMARY"
  node "$REPLICA" --replicaof 127.0.0.1 "$PRIMARY"
  wait_port "$PRIMARY"
  wait_port "$REPLICA"
  for p in "${SENTINELS[@]}"; do
    mkdir -p "$DIR/$p"
    cat >"$DIR/$p/sentinel.conf" <<EOF
port $p
bind 127.0.0.1
daemonize yes
pidfile $DIR/$p/pid
logfile $DIR/$p/log
dir $DIR/$p
sentinel monitor $MASTER_NAME 127.0.0.1 $PRIMARY 2
sentinel down-after-milliseconds $MASTER_NAME 1000
sentinel failover-timeout $MASTER_NAME 5000
sentinel parallel-syncs $MASTER_NAME 1
EOF
    redis-server "$DIR/$p/sentinel.conf" --sentinel
  done
  for p in "${SENTINELS[@]}"; do wait_port "$p"; done
  # Ready once every sentinel knows the replica and the other two: before
  # that a failover has no replica to promote and no quorum.
  for _ in $(seq 1 300); do
    local ready=0
    for p in "${SENTINELS[@]}"; do
      info=$(redis-cli -p "$p" sentinel master "$MASTER_NAME" 2>/dev/null | tr '\n' ' ')
      [[ "$info" == *"num-slaves 1 "* && "$info" == *"num-other-sentinels 2 "* ]] && ready=$((ready + 1))
    done
    [ "$ready" -eq ${#SENTINELS[@]} ] && return 0
    sleep 0.1
  done
  echo "the sentinels did not find the replica and each other" >&2
  return 1
}

start_tls() {
  local t="$DIR/tls"
  mkdir -p "$t"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=blockremote test CA" -keyout "$t/ca.key" -out "$t/ca.crt" 2>/dev/null
  for who in server client; do
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
      -subj "/CN=$who" -keyout "$t/$who.key" -out "$t/$who.csr" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$t/$who.ext"
    openssl x509 -req -in "$t/$who.csr" -CA "$t/ca.crt" -CAkey "$t/ca.key" -CAcreateserial \
      -days 2 -extfile "$t/$who.ext" -out "$t/$who.crt" 2>/dev/null
  done
  node "$TLS_PORT" --port 0 --tls-port "$TLS_PORT" --tls-cert-file "$t/server.crt" \
    --tls-key-file "$t/server.key" --tls-ca-cert-file "$t/ca.crt" --tls-auth-clients yes
  for _ in $(seq 1 100); do
    redis-cli --tls --cacert "$t/ca.crt" --cert "$t/client.crt" --key "$t/client.key" \
      -p "$TLS_PORT" ping >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "the TLS node did not start" >&2
  return 1
}

stop_all() {
  [ -d "$DIR" ] || return 0
  for pidfile in "$DIR"/*/pid; do
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  sleep 0.5
  rm -rf "$DIR"
}

case "${1:-}" in
  start)
    shift
    which=("$@")
    [ ${#which[@]} -gt 0 ] || which=(cluster sentinel tls)
    stop_all
    mkdir -p "$DIR"
    for topology in "${which[@]}"; do
      case "$topology" in
        cluster) start_cluster ;;
        sentinel) start_sentinel ;;
        tls) start_tls ;;
        *) echo "unknown topology $topology" >&2; exit 2 ;;
      esac
    done
    cluster_hosts="127.0.0.1:${CLUSTER_PORTS[0]},127.0.0.1:${CLUSTER_PORTS[1]},127.0.0.1:${CLUSTER_PORTS[2]}"
    sentinel_hosts="127.0.0.1:${SENTINELS[0]},127.0.0.1:${SENTINELS[1]},127.0.0.1:${SENTINELS[2]}"
    cat >"$DIR/env" <<EOF
export TEST_REDIS_CLUSTER_URL=redis+cluster://$cluster_hosts
export TEST_REDIS_SENTINEL_URL=redis+sentinel://$sentinel_hosts/$MASTER_NAME
export TEST_REDIS_TLS_URL=rediss://127.0.0.1:$TLS_PORT
export TEST_REDIS_TLS_DIR=$DIR/tls
EOF
    cat "$DIR/env"
    ;;
  restart)
    # Brings a killed node back: a cluster node with its own config (it
    # rejoins, as a replica if its slots moved while it was down); the
    # sentinels' primary or replica empty, as Redis without persistence
    # restarts (the sentinels make it a replica of the current primary).
    port=${2:?usage: $0 restart PORT}
    if [ "$port" = "$PRIMARY" ] || [ "$port" = "$REPLICA" ]; then
      node "$port"
    else
      node "$port" --cluster-enabled yes --cluster-config-file "$DIR/$port/nodes.conf" \
        --cluster-node-timeout 2000
    fi
    wait_port "$port"
    ;;
  stop)
    stop_all
    ;;
  *)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
