#!/usr/bin/env bash
# Compiles the Kotlin heartbeat core (clients/android/core) with its JVM self-check and runs it.
#
#   clients/check-kotlin.sh                 offline checks; plus the live part when
#                                           BLOCKREMOTE_URL, BLOCKREMOTE_TOKEN and
#                                           BLOCKREMOTE_DEVICE_ID (and optionally BLOCKREMOTE_SEQ)
#                                           are set
#   clients/check-kotlin.sh --server BIN    also starts BIN (a blockremote server binary) on a free
#                                           loopback port with a throw-away data dir, mints a
#                                           device session with the admin API, runs the live
#                                           part against it, and stops it
#
# Needs java 17+ and, the first time, npm: kotlinc comes from the npm registry's kotlin-compiler
# package (a full kotlinc distribution, ~90 MB) and is kept in KOTLINC_HOME
# (default ~/.cache/blockremote/kotlinc/<version>). The compiled jar is cached by a hash of the
# sources, so a second run with unchanged sources only runs it.
set -euo pipefail

KOTLIN_VERSION=2.4.20
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
core="$here/android/core"
kotlinc_home="${KOTLINC_HOME:-$HOME/.cache/blockremote/kotlinc/$KOTLIN_VERSION}"
build_cache="${XDG_CACHE_HOME:-$HOME/.cache}/blockremote/check-kotlin"
main_class=dev.blockremote.collector.SelfCheckKt

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'check-kotlin: error: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,17s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

server=""
while [ $# -gt 0 ]; do
    case "$1" in
        --server) [ $# -ge 2 ] || die "--server needs the path of a server binary"; server="$2"; shift 2 ;;
        --server=*) server="${1#--server=}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

started=$SECONDS
command -v java >/dev/null 2>&1 || die "java not found on PATH (java 17 or later is needed)"
if [ -n "$server" ]; then
    [ -f "$server" ] && [ -x "$server" ] || die "--server $server: not an executable file"
    command -v curl >/dev/null 2>&1 || die "curl is needed with --server"
fi

# --- kotlinc ----------------------------------------------------------------------------------
kotlinc="$kotlinc_home/bin/kotlinc"
if [ ! -x "$kotlinc" ]; then
    command -v npm >/dev/null 2>&1 ||
        die "kotlinc is not in $kotlinc_home and npm is not installed to fetch it (set KOTLINC_HOME to a kotlinc distribution)"
    say "fetching kotlinc $KOTLIN_VERSION (npm package kotlin-compiler, ~90 MB) into $kotlinc_home"
    mkdir -p "$(dirname "$kotlinc_home")"
    fetch="$(mktemp -d "$(dirname "$kotlinc_home")/.fetch.XXXXXX")"
    trap 'rm -rf "$fetch"' EXIT
    (cd "$fetch" && npm pack "kotlin-compiler@$KOTLIN_VERSION" --silent >/dev/null) ||
        die "npm pack kotlin-compiler@$KOTLIN_VERSION failed (is the npm registry reachable?)"
    tar -xzf "$fetch"/kotlin-compiler-*.tgz -C "$fetch"
    [ -x "$fetch/package/bin/kotlinc" ] || die "the kotlin-compiler package has no bin/kotlinc"
    rm -rf "$kotlinc_home"
    mv "$fetch/package" "$kotlinc_home"
    rm -rf "$fetch"
    trap - EXIT
fi

# --- compile (cached by the sources' hash) ------------------------------------------------------
mapfile -t sources < <(find "$core/src/main/kotlin" "$core/src/test/kotlin" -name '*.kt' | LC_ALL=C sort)
[ "${#sources[@]}" -gt 0 ] || die "no Kotlin sources under $core/src"
hash="$( { echo "$KOTLIN_VERSION"; cat "${sources[@]}"; } | sha256sum | cut -c1-16)"
jar="$build_cache/selfcheck-$hash.jar"
if [ -f "$jar" ] && [ -s "$jar" ]; then
    say "sources unchanged: using $jar"
else
    mkdir -p "$build_cache"
    say "compiling ${#sources[@]} files with kotlinc $KOTLIN_VERSION"
    compile_started=$SECONDS
    # kotlinc writes a jar only when the -d path ends in .jar (else a class directory).
    partial="$build_cache/partial-$$.jar"
    # C1 only: kotlinc is a short-lived JVM, and this about halves the compile time.
    JAVA_OPTS="${JAVA_OPTS:--XX:TieredStopAtLevel=1}" \
        "$kotlinc" -jvm-target 17 -Werror -include-runtime -d "$partial" "${sources[@]}" ||
        { rm -rf "$partial"; die "compilation failed"; }
    mv "$partial" "$jar"
    # Keep only the jar of the current sources.
    find "$build_cache" -maxdepth 1 -name 'selfcheck-*.jar' ! -name "${jar##*/}" -delete
    say "compiled in $((SECONDS - compile_started)) s"
fi

# --- optional: a server of our own --------------------------------------------------------------
server_pid=""
workdir=""
cleanup() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        for _ in $(seq 1 60); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.25; done
        kill -0 "$server_pid" 2>/dev/null && kill -KILL "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    [ -n "$workdir" ] && rm -rf "$workdir"
    return 0
}

free_port() {
    if command -v python3 >/dev/null 2>&1; then
        python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
        return
    fi
    local p
    for _ in $(seq 1 50); do
        p=$((20000 + RANDOM % 40000))
        if ! (: </dev/tcp/127.0.0.1/"$p") 2>/dev/null; then echo "$p"; return; fi
    done
    die "found no free loopback port"
}

random_hex() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }

if [ -n "$server" ]; then
    workdir="$(mktemp -d "${TMPDIR:-/tmp}/check-kotlin.XXXXXX")"
    trap cleanup EXIT
    port="$(free_port)"
    base="http://127.0.0.1:$port"
    admin="$(random_hex 24)"
    say "starting $server serve on $base (data dir $workdir/data)"
    BLOCKREMOTE_LISTEN="127.0.0.1:$port" BLOCKREMOTE_DATA_DIR="$workdir/data" BLOCKREMOTE_ADMIN_TOKEN="$admin" \
        "$server" serve >"$workdir/server.log" 2>&1 &
    server_pid=$!
    ready=""
    for _ in $(seq 1 120); do
        kill -0 "$server_pid" 2>/dev/null || break
        if curl -fsS -o /dev/null "$base/health/ready" 2>/dev/null; then ready=1; break; fi
        sleep 0.25
    done
    if [ -z "$ready" ]; then
        tail -n 30 "$workdir/server.log" >&2 || true
        die "the server did not become ready on $base within 30 s (its log is above)"
    fi

    device_id="chk_$(random_hex 8)"
    body="$(printf '{"external_user_id":"check-kotlin-%s","create":true,"device_id":"%s","device_fingerprint":"fp-%s","platform":"android"}' \
        "$device_id" "$device_id" "$device_id")"
    answer="$(curl -sS -X POST "$base/v1/admin/sessions" -H "Authorization: Bearer $admin" \
        -H 'Content-Type: application/json' -d "$body" -w '\n%{http_code}')" || die "POST /v1/admin/sessions: no answer"
    status="${answer##*$'\n'}"
    tokens="${answer%$'\n'*}"
    [ "$status" = 201 ] || die "POST /v1/admin/sessions answered $status: $tokens"
    access_token="$(printf '%s' "$tokens" | sed -n 's/.*"access_token" *: *"\([^"]*\)".*/\1/p')"
    [ -n "$access_token" ] || die "no access_token in the session answer"
    say "device session minted for $device_id"
    export BLOCKREMOTE_URL="$base" BLOCKREMOTE_TOKEN="$access_token" BLOCKREMOTE_DEVICE_ID="$device_id" BLOCKREMOTE_SEQ=1
    # The server and its device are throw-away: the self-check may lock the device to see the 403.
    export BLOCKREMOTE_SELFCHECK_ADMIN_TOKEN="$admin"
fi

# --- run ----------------------------------------------------------------------------------------
say "running the self-check"
set +e
java -cp "$jar" "$main_class"
rc=$?
set -e
if [ "$rc" -ne 0 ] && [ -n "$workdir" ] && [ -f "$workdir/server.log" ]; then
    say "last lines of the server's log:"
    tail -n 20 "$workdir/server.log" >&2 || true
fi
say "done in $((SECONDS - started)) s (exit $rc)"
exit "$rc"
