#!/usr/bin/env bash
# Runs the release binary as the container image would run it, without a
# container engine: uid/gid 65532 with no supplementary groups, an empty
# environment but the image's ENV, `/` as the working directory, and only
# the data directory writable by that uid. Checks that `serve` becomes
# ready, that `blockremote healthcheck` (the image's HEALTHCHECK) passes and
# fails as it should, that SIGTERM drains to exit 0, and that the process
# wrote nothing outside the data directory.
# Usage: scripts/image-constraints.sh [path/to/blockremote] (needs root for setpriv).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$(realpath "${1:-target/release/blockremote}")
DATA=$(mktemp -d /tmp/br-image-data.XXXXXX)
MARK=$(mktemp /tmp/br-image-mark.XXXXXX)
chown 65532:65532 "$DATA"; chmod 0700 "$DATA"
PORT=$((20000 + RANDOM % 20000))
cleanup() { kill "$PID" 2>/dev/null || true; rm -rf "$DATA" "$MARK"; }
trap cleanup EXIT
# The image's user and environment; `exec` all the way down, so the
# background job's pid is the binary's own (signals reach it, as PID 1's would).
IMAGE_ENV=(env -i BLOCKREMOTE_DATA_DIR="$DATA" BLOCKREMOTE_LISTEN="127.0.0.1:$PORT"
  BLOCKREMOTE_WORKER_LISTEN=off TMPDIR=/nonexistent HOME=/nonexistent
  setpriv --reuid=65532 --regid=65532 --clear-groups --no-new-privs "$BIN")
as_image() { (cd / && exec "${IMAGE_ENV[@]}" "$@"); }
touch "$MARK"; sleep 1
(cd / && exec "${IMAGE_ENV[@]}" serve) > "$DATA.log" 2>&1 &
PID=$!
for _ in $(seq 1 100); do
  as_image healthcheck "http://127.0.0.1:$PORT/health/ready" 2>/dev/null && break
  sleep 0.1
done
as_image healthcheck "http://127.0.0.1:$PORT/health/ready"
echo "ready as uid 65532; healthcheck exits 0"
if as_image healthcheck "http://127.0.0.1:1/health/live" 2>/dev/null; then
  echo "FAIL: healthcheck passed against a closed port" >&2; exit 1
fi
echo "healthcheck exits 1 against a closed port"
kill -TERM "$PID"
status=0; wait "$PID" || status=$?
[ "$status" -eq 0 ] || { echo "FAIL: SIGTERM exit $status" >&2; cat "$DATA.log" >&2; exit 1; }
echo "SIGTERM: drained, exit 0"
written=$(find / -xdev -newer "$MARK" -uid 65532 2>/dev/null | grep -v "^$DATA" || true)
[ -z "$written" ] || { echo "FAIL: written outside the data dir: $written" >&2; exit 1; }
echo "wrote only under the data dir: $(ls "$DATA" | tr '\n' ' ')"
rm -f "$DATA.log"
