//! Shared test support: fake upstream providers that speak each provider's real wire format.

pub mod fake_ollama;
