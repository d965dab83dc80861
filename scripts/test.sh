#!/usr/bin/env bash
# The whole test suite: every crate's unit and integration tests (including the real `nself`
# binary and the process-level restart/crash tests), then the official OpenAI SDKs for Python
# and Node against a real `nself claw serve`. Run from anywhere; needs Rust, Python 3 and Node.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> cargo build (all binaries the tests start)"
cargo build --workspace --bins --locked

echo "==> cargo test --workspace"
cargo test --workspace --locked

echo "==> Python: the official openai SDK against nself claw serve"
python="$(scripts/python-env.sh | tail -n 1)"
CLAW_BIN_DIR="$PWD/target/debug" "$python" -m pytest -q tests/python

echo "==> Node: the official openai SDK against nself claw serve"
scripts/node-env.sh
(cd tests/node && CLAW_BIN_DIR="$PWD/../../target/debug" node --test)
