#!/usr/bin/env bash
# The newcomer's tour, as a user would do it: start `blockremote serve` on the
# embedded default (SQLite, in-process queue and workers; a fresh data dir and
# admin key), then `blockremote demo --url` against it — map a customer, sign
# a device in, open its kill-switch socket, stream heartbeats, lock it (the
# app is told at once, its heartbeats refused) and unlock it — and stop.
#
# Usage: scripts/quickstart.sh            (builds the release binary first)
#        BLOCKREMOTE_BIN=path scripts/quickstart.sh   (uses that binary)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${BLOCKREMOTE_BIN:-}" ]; then
  cargo build --release --quiet --bin blockremote
  BLOCKREMOTE_BIN=target/release/blockremote
fi
WORK=$(mktemp -d)
cleanup() {
  [ -n "${SERVER_PID:-}" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

# A free loopback port, from the kernel.
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL="http://127.0.0.1:$PORT"
export BLOCKREMOTE_ADMIN_TOKEN="quickstart-$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')"
export RUST_LOG=${RUST_LOG:-warn}

echo "==> blockremote serve on $URL (data in $WORK)"
BLOCKREMOTE_LISTEN="127.0.0.1:$PORT" BLOCKREMOTE_DATA_DIR="$WORK" \
  "$BLOCKREMOTE_BIN" serve >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 100); do
  curl -fsS "$URL/health/ready" >/dev/null 2>&1 && break
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "the server exited:" >&2; cat "$WORK/server.log" >&2; exit 1
  fi
  sleep 0.1
done
curl -fsS "$URL/health/ready" >/dev/null || { echo "the server is not ready" >&2; cat "$WORK/server.log" >&2; exit 1; }

echo "==> blockremote demo --url $URL"
"$BLOCKREMOTE_BIN" demo --url "$URL"
echo "==> done: the same calls, one by one, are in clients/http/ and docs/INTEGRATION.md"
