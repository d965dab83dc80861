#!/usr/bin/env bash
# Builds the release binaries and runs the gateway benchmark end to end: starts a fake
# Ollama and `nself claw serve` (release), creates a key, and measures one of:
#
#   bench/run.sh [whole] [...]        # whole requests: 1000 req/s for 20 s, direct vs gateway
#   bench/run.sh ttft [...]           # streams: time to first token, 200 req/s for 20 s
#   bench/run.sh streams [...]        # 1000 concurrent streams: the gateway's memory
#   bench/run.sh --rate 500 --duration 10 --json
#   bench/run.sh --help               # every option (and `bench/run.sh ttft --help`, ...)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
cargo build --release --quiet -p nself -p claw-tests

# Every open stream holds two sockets in the gateway (which inherits this limit) and one
# in the client: raise the soft limit on open files towards the hard one.
want=65536
hard="$(ulimit -Hn)"
if [[ "$hard" != unlimited ]] && ((hard < want)); then want="$hard"; fi
soft="$(ulimit -n)"
if [[ "$soft" != unlimited ]] && ((soft < want)); then ulimit -n "$want" || true; fi

exec target/release/bench-gateway "$@"
