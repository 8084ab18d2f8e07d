#!/usr/bin/env bash
# Runs the httpyac request collection (clients/http/*.http) against a real, throw-away
# BlockRemote server, then checks that a TypeScript client generated from the server's OpenAPI
# document compiles under `tsc --strict` and works against that server.
#
#   clients/run-http.sh path/to/blockremote          (e.g. target/release/blockremote)
#
# Steps: npm ci (pinned by clients/package-lock.json) · start `BIN serve` on a free loopback port
# with a fresh data dir and per-run secrets · wait for /health/ready · httpyac over every .http
# file, every request, failing on any failed assertion · `BIN openapi` → every operation must be
# exercised by the collection · openapi-spec-validator (Python, an independent implementation) ·
# openapi-typescript → schema.d.ts · tsc --noEmit --strict · run the typed client · stop the
# server (SIGTERM, also on failure or Ctrl-C).
#
# Needs: node >= 18 with npm, curl, python3 with venv. Environment knobs: KEEP_TMP=1 keeps the temp dir (server log,
# httpyac JSON results) even on success; HTTPYAC_TIMEOUT_MS (default 20000) per request.
set -euo pipefail

START_NS=$(date +%s%N)
elapsed() { echo "$(( ($(date +%s%N) - START_NS) / 1000000 )) ms"; }
step() { printf '\n==> %s  [%s]\n' "$*" "$(elapsed)"; }
die() { printf '\nrun-http: FAILED: %s  [%s]\n' "$*" "$(elapsed)" >&2; exit 1; }

if [[ $# -ne 1 ]]; then
  echo "usage: $0 path/to/blockremote" >&2
  exit 2
fi
BIN=$1
[[ -x $BIN ]] || die "$BIN is not an executable file"
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")
command -v node >/dev/null || die "node is not installed"
command -v npm >/dev/null || die "npm is not installed"
command -v curl >/dev/null || die "curl is not installed"

CLIENTS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$CLIENTS"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/blockremote-http.XXXXXX")
SERVER_PID=
STATUS=failed
FULL_LOG=1 # until the server is up: a start-up failure shows the log's tail

cleanup() {
  local rc=$?
  set +e
  if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null
    for _ in $(seq 1 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$SERVER_PID" 2>/dev/null; then
      echo "run-http: the server did not stop within 10 s of SIGTERM; killing it" >&2
      kill -KILL "$SERVER_PID" 2>/dev/null
    fi
    wait "$SERVER_PID" 2>/dev/null
    echo "run-http: server stopped (exit status $?)"
  fi
  rm -rf "$CLIENTS/openapi-ts/.out"
  if [[ $rc -ne 0 || $STATUS != ok ]]; then
    if [[ -s $WORK/server.log && $FULL_LOG == 1 ]]; then
      echo "--- last 40 lines of the server log ($WORK/server.log) ---" >&2
      tail -n 40 "$WORK/server.log" >&2
    elif [[ -s $WORK/server.log ]]; then
      echo "--- server WARN/ERROR lines (full log: $WORK/server.log) ---" >&2
      grep -E '"level":"(WARN|ERROR)"' "$WORK/server.log" | tail -n 20 >&2 || true
    fi
    echo "run-http: kept $WORK for inspection" >&2
    printf 'run-http: FAILED after %s\n' "$(elapsed)" >&2
    [[ $rc -ne 0 ]] || rc=1
  else
    [[ ${KEEP_TMP:-0} == 1 ]] && echo "run-http: kept $WORK" || rm -rf "$WORK"
    printf '\nrun-http: OK in %s\n' "$(elapsed)"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step "npm ci (clients/package-lock.json)"
npm ci --no-audit --no-fund --loglevel=error >"$WORK/npm.log" 2>&1 || { cat "$WORK/npm.log" >&2; die "npm ci"; }
echo "httpyac $(./node_modules/.bin/httpyac --version), openapi-typescript $(node -p 'require("./node_modules/openapi-typescript/package.json").version'), openapi-fetch $(node -p 'require("./node_modules/openapi-fetch/package.json").version'), typescript $(./node_modules/.bin/tsc --version | cut -d' ' -f2)"

step "start $BIN serve"
PORT=$(node -e 'const s=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})')
BASE_URL=http://127.0.0.1:$PORT
rnd() { node -e "process.stdout.write(require('crypto').randomBytes($1).toString('$2'))"; }
ADMIN_KEY=adm_$(rnd 24 hex)
WEBHOOK_SECRET=whsk_$(rnd 24 hex)
WEBHOOK_WHSEC=whsec_$(rnd 32 base64)
ATTESTATION_SECRET=att_$(rnd 24 hex)
# The two fixed secrets of clients/http/SIGNATURES.md (signatures.http confirms its examples).
EXAMPLE_SECRETS=example-x-signature-secret-2026-01,whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw
mkdir -m 700 "$WORK/data"
(
  export BLOCKREMOTE_LISTEN=127.0.0.1:$PORT
  export BLOCKREMOTE_DATA_DIR=$WORK/data
  export BLOCKREMOTE_ADMIN_TOKEN=$ADMIN_KEY
  export BLOCKREMOTE_WEBHOOK_SECRETS=$WEBHOOK_SECRET,$WEBHOOK_WHSEC,$EXAMPLE_SECRETS
  export BLOCKREMOTE_ATTESTATION_TEST_SECRET=$ATTESTATION_SECRET
  unset DATABASE_URL REDIS_URL BLOCKREMOTE_CONFIG BLOCKREMOTE_METRICS_TOKEN
  exec "$BIN" serve
) >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
echo "pid $SERVER_PID, $BASE_URL, data dir $WORK/data"

step "wait for GET /health/ready"
for i in $(seq 1 300); do
  kill -0 "$SERVER_PID" 2>/dev/null || die "the server exited during start-up"
  if curl -fsS -o /dev/null "$BASE_URL/health/ready" 2>/dev/null; then break; fi
  [[ $i -lt 300 ]] || die "not ready within 30 s"
  sleep 0.1
done
echo "ready: $(curl -fsS "$BASE_URL/health/ready")"
FULL_LOG=0

step "httpyac: every request of http/*.http"
set +e
./node_modules/.bin/httpyac send http/*.http --all --timeout "${HTTPYAC_TIMEOUT_MS:-20000}" --json \
  --var baseUrl="$BASE_URL" adminKey="$ADMIN_KEY" webhookSecret="$WEBHOOK_SECRET" \
  webhookWhsec="$WEBHOOK_WHSEC" attestationSecret="$ATTESTATION_SECRET" \
  >"$WORK/httpyac.json" 2>"$WORK/httpyac.stderr"
HTTPYAC_RC=$?
set -e
if ! node -e 'JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"))' "$WORK/httpyac.json" 2>/dev/null; then
  cat "$WORK/httpyac.stderr" >&2
  die "httpyac produced no results (exit status $HTTPYAC_RC)"
fi
node http/report.mjs "$WORK/httpyac.json" || die "the request collection has failing assertions"
[[ $HTTPYAC_RC -eq 0 ]] || { cat "$WORK/httpyac.stderr" >&2; die "httpyac exited with status $HTTPYAC_RC"; }

step "OpenAPI: $BIN openapi"
"$BIN" openapi >openapi-ts/openapi.json
curl -fsS "$BASE_URL/openapi.json" >"$WORK/served-openapi.json"
node -e '
  const fs = require("fs");
  const canon = (v) => Array.isArray(v) ? v.map(canon) : v && typeof v === "object"
    ? Object.fromEntries(Object.keys(v).sort().map((k) => [k, canon(v[k])])) : v;
  const [a, b] = process.argv.slice(1).map((f) => JSON.stringify(canon(JSON.parse(fs.readFileSync(f, "utf8")))));
  if (a !== b) { console.error("GET /openapi.json differs from `blockremote openapi`"); process.exit(1); }
  console.log("GET /openapi.json equals `blockremote openapi`");
' openapi-ts/openapi.json "$WORK/served-openapi.json" || die "served and printed OpenAPI documents differ"
node http/coverage.mjs openapi-ts/openapi.json || die "the collection does not exercise every operation"

# An independent validator (Python), pinned, in a cached virtualenv.
step "OpenAPI: validate with openapi-spec-validator 0.9.0"
osv="${XDG_CACHE_HOME:-$HOME/.cache}/blockremote/openapi-spec-validator-0.9.0"
if [ ! -x "$osv/bin/openapi-spec-validator" ]; then
  { python3 -m venv "$osv" && "$osv/bin/pip" install -q openapi-spec-validator==0.9.0; } \
    || die "installing openapi-spec-validator (needs python3 with venv and the PyPI registry)"
fi
"$osv/bin/openapi-spec-validator" openapi-ts/openapi.json || die "the OpenAPI document is not valid OpenAPI"

step "openapi-typescript → openapi-ts/schema.d.ts"
./node_modules/.bin/openapi-typescript openapi-ts/openapi.json -o openapi-ts/schema.d.ts --array-length \
  || die "openapi-typescript"
echo "$(wc -l <openapi-ts/schema.d.ts) lines"

step "tsc --noEmit --strict (openapi-ts/client.ts, openapi-ts/negative.ts)"
./node_modules/.bin/tsc -p openapi-ts/tsconfig.json --noEmit --strict || die "the typed client does not compile"
echo "compiles"

step "run the typed client against the server"
./node_modules/.bin/tsc -p openapi-ts/tsconfig.json --outDir openapi-ts/.out --noCheck || die "tsc emit"
BLOCKREMOTE_TS_CLIENT_RUN=1 BLOCKREMOTE_URL=$BASE_URL BLOCKREMOTE_ADMIN_TOKEN=$ADMIN_KEY \
  node openapi-ts/.out/client.js || die "the typed client failed against the server"

step "stop the server"
STATUS=ok
