#!/usr/bin/env bash
# Fuzzes the admin API from its own OpenAPI document: starts `nself claw serve` embedded (a
# temporary data dir, a random internal token, a free port, Ollama pointed at a
# `fake-upstream`), waits for /readyz, and runs schemathesis against
# /claw/v1/openapi.json: no 5xx, and every response's status, content type and body as the
# document declares. `GET /claw/v1/events` is left out (with follow=true it streams until the
# client goes). Exits non-zero on any failure; always stops what it started.
#
#   scripts/fuzz-admin.sh [SCHEMATHESIS_RUN_ARGS ...]   (e.g. --seed 1, or -n 200)
#
# Binaries from $CLAW_BIN_DIR (default <repo>/target/debug: `cargo build -p nself -p
# claw-tests`); schemathesis in a venv of its own (tests/fuzz/requirements.txt), $CLAW_FUZZ_VENV
# (default <repo>/target/fuzz-venv). $CLAW_FUZZ_EXAMPLES cases per operation (default 100);
# the run is killed after $CLAW_FUZZ_TIMEOUT seconds (default 600; it takes ~25 s).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$(cd "${CLAW_BIN_DIR:-$repo/target/debug}" && pwd)"
for exe in nself fake-upstream; do
    [ -x "$bin/$exe" ] || { echo "$bin/$exe missing: run \`cargo build -p nself -p claw-tests\`" >&2; exit 1; }
done
python="$(CLAW_VENV="${CLAW_FUZZ_VENV:-$repo/target/fuzz-venv}" "$repo/scripts/python-env.sh" \
    "$repo/tests/fuzz/requirements.txt" | tail -n 1)"

tmp="$(mktemp -d)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Provider settings the gateway must not pick up from the caller's shell (as tests/python).
unset GEMINI_API_KEYS GEMINI_BASE_URL GEMINI_MODEL OPENAI_API_KEY OPENAI_BASE_URL OPENAI_MODEL \
    OPENAI_EMBED_MODEL ANTHROPIC_API_KEY ANTHROPIC_BASE_URL ANTHROPIC_MODEL OLLAMA_MODEL \
    OLLAMA_EMBED_MODEL OLLAMA_MAX_INFLIGHT CLAW_KAFKA_BROKERS CLAW_DATABASE_URL NSELF_CLAW_URL

deadline=$((SECONDS + 30))
"$bin/fake-upstream" ollama --listen 127.0.0.1:0 >"$tmp/fake.out" &
pids+=($!)
until ollama="$(sed -n 's/^listening on //p' "$tmp/fake.out")" && [ -n "$ollama" ]; do
    [ "$SECONDS" -lt "$deadline" ] || { echo "fake-upstream did not start" >&2; exit 1; }
    sleep 0.1
done

secret="$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
url="http://127.0.0.1:$port"
mkdir "$tmp/cwd" # no `.env` here
(cd "$tmp/cwd" && CLAW_LISTEN="127.0.0.1:$port" CLAW_DATA_DIR="$tmp/data" NO_COLOR=1 \
    PLUGIN_INTERNAL_SECRET="$secret" OLLAMA_BASE_URL="$ollama" \
    exec "$bin/nself" claw serve >"$tmp/gateway.log" 2>&1) &
pids+=($!)
ready() { "$python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' "$url/readyz" 2>/dev/null; }
until ready; do
    if ! kill -0 "${pids[-1]}" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
        echo "gateway not ready:" >&2; tail -n 50 "$tmp/gateway.log" >&2; exit 1
    fi
    sleep 0.1
done

status=0
# From $tmp: schemathesis keeps a crash cache (.schemathesis/) in its working directory.
(cd "$tmp" && exec timeout "${CLAW_FUZZ_TIMEOUT:-600}" "$(dirname "$python")/schemathesis" run "$url/claw/v1/openapi.json" \
    --header "x-internal-token: $secret" \
    --checks not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance \
    --exclude-path /claw/v1/events \
    --max-examples "${CLAW_FUZZ_EXAMPLES:-100}" --request-timeout 10 --workers 2 \
    --generation-with-security-parameters false --generation-database none --no-color \
    "$@") || status=$?
if [ "$status" != 0 ]; then
    echo "==> schemathesis failed ($status); the gateway's warnings, errors and panics:" >&2
    grep -aE ' (WARN|ERROR) |panicked' "$tmp/gateway.log" | tail -n 40 >&2 || true
fi
exit "$status"
