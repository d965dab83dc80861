#!/usr/bin/env bash
# Installs the Node packages of tests/node (OpenAI's official Node SDK) into
# tests/node/node_modules. Idempotent: when node_modules already matches
# package-lock.json (a stamp of the lock's hash inside node_modules) it does nothing.
#
#   scripts/node-env.sh && (cd tests/node && node --test)
#
# Uses `npm ci` when package-lock.json exists, else `npm install` (which writes the lock).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="$repo/tests/node"
stamp="$dir/node_modules/.claw-lock.sha256"

want() {
    # The lock pins everything; the manifest too, so an edit without a re-lock is noticed.
    cat "$dir/package.json" "$dir/package-lock.json" 2>/dev/null | sha256sum | cut -d' ' -f1
}

if [ -f "$dir/package-lock.json" ] && [ -d "$dir/node_modules" ] &&
    [ "$(cat "$stamp" 2>/dev/null || true)" = "$(want)" ]; then
    exit 0
fi

cd "$dir"
if [ -f package-lock.json ]; then
    npm ci --silent --no-audit --no-fund >&2
else
    npm install --silent --no-audit --no-fund >&2
fi
want >"$stamp"
