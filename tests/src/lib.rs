//! Shared test support: fake upstream providers that speak each provider's real wire format,
//! an in-process gateway harness, OpenAI schema validation, and reading `/metrics`.

pub mod backends;
pub mod fake_anthropic;
pub mod fake_gemini;
pub mod fake_ollama;
pub mod fake_openai;
pub mod fake_server;
pub mod gateway;
pub mod openai_schema;
pub mod process;
pub mod prometheus;
