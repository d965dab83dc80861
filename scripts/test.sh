#!/usr/bin/env bash
# The whole test suite: every crate's unit and integration tests (including the real `nself`
# binary and the process-level restart/crash tests), the in-process gateway suites a second
# time on real Kafka and PostgreSQL (distributed mode), then the official OpenAI SDKs for
# Python and Node against a real `nself claw serve` (with agent clients too — the SDKs' tool
# loops, LangChain, the Vercel AI SDK — running tool loops against each provider's fake; the
# web console in headless Debian chromium), the admin API fuzzed by schemathesis from its
# OpenAPI document, and last, alone, the distributed fault tests (the broker frozen and
# killed, a projector killed, PostgreSQL restarted). Run from anywhere; needs Rust, Python 3,
# Node and Java (for Kafka); installs the Debian packages the build and the services need and
# starts PostgreSQL and Kafka on loopback (scripts/services.sh; `scripts/services.sh down`
# stops them).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> Debian packages: the build's, and the tests' (nginx, chromium)"
scripts/debian-deps.sh build
scripts/debian-deps.sh test

echo "==> services: PostgreSQL and Kafka on loopback"
scripts/services.sh up
eval "$(scripts/services.sh env)"
scripts/services.sh clean-tests

echo "==> cargo build (all binaries the tests start)"
cargo build --workspace --bins --locked

echo "==> cargo test --workspace (embedded; the Kafka backend's own tests on the real broker)"
# Every test except the fault tests (claw-tests' `faults` binary), which run alone at the end.
cargo test --workspace --locked --exclude claw-tests
cargo test -p claw-tests --locked --lib --bins --test it
cargo test -p claw-tests --locked --doc

echo "==> the gateway suites again, distributed (Kafka ledger, PostgreSQL read models)"
CLAW_TEST_BACKEND=distributed cargo test -p claw-tests --test it --locked

echo "==> Python: the official openai SDK and LangChain against nself claw serve"
python="$(scripts/python-env.sh | tail -n 1)"
CLAW_BIN_DIR="$PWD/target/debug" "$python" -m pytest -q tests/python

echo "==> schemathesis: the admin API fuzzed from its OpenAPI document (nself claw serve)"
CLAW_BIN_DIR="$PWD/target/debug" scripts/fuzz-admin.sh

echo "==> Node: the official openai SDK and the Vercel AI SDK against nself claw serve"
scripts/node-env.sh
(cd tests/node && CLAW_BIN_DIR="$PWD/../../target/debug" node --test)

# Last, and alone: these tests SIGSTOP/SIGKILL the Kafka broker and restart PostgreSQL (and
# bring both back, even when they fail), so nothing else may use the services meanwhile, and
# they run one at a time.
echo "==> fault tests: real processes while Kafka, a projector and PostgreSQL fail (distributed)"
cargo test -p claw-tests --test faults --locked -- --test-threads=1
