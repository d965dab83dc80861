#!/usr/bin/env bash
# Builds the release binaries and runs the gateway latency benchmark end to end:
# starts a fake Ollama and `nself claw serve` (release), creates a key, drives
# the same open-loop load straight at the fake and through the gateway, and
# prints both latency distributions and the latency the gateway adds.
#
#   bench/run.sh                      # 1000 req/s for 20 s, concurrency 128
#   bench/run.sh --rate 500 --duration 10 --json
#   bench/run.sh --help               # every option
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
cargo build --release --quiet -p nself -p claw-tests
exec target/release/bench-gateway "$@"
