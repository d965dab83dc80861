//! Process-level fault tests of distributed mode: real `nself claw serve` gateways and
//! `nself claw projector`s on the real Kafka broker and PostgreSQL server of
//! `scripts/services.sh`, while the broker is frozen and killed, a projector is `kill -9`ed,
//! PostgreSQL restarts, and a key is revoked on one gateway of two. No mocks but the upstream
//! (a fake Ollama).
//!
//! These tests stop and restart the shared services: run them alone, after every other suite,
//! one at a time (`cargo test -p claw-tests --test faults -- --test-threads=1`; they also take
//! a lock so that they never overlap). Each test leaves Kafka and PostgreSQL running, even
//! when it fails.

mod broker;
mod postgres;
mod projector;
mod revocation;
mod support;
