#!/usr/bin/env bash
# Validates compose.yaml (the distributed deployment) with Docker Compose's own loader,
# compose-go, and checks that what it references exists in the repo: see
# scripts/compose-check/main.go. Needs Go; modules come from the Go module proxy into the
# normal module cache (go.sum is committed). Prints one OK line, or errors and exits 1.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
bin="$(mktemp -d)"
trap 'rm -rf "$bin"' EXIT
(cd "$repo/scripts/compose-check" && go build -o "$bin/compose-check" .)
"$bin/compose-check" "$repo"
