//! End-to-end tests across the crates: the gateway in process in front of fake providers that
//! speak each provider's wire format (OpenAI shapes validated against OpenAI's own schemas),
//! the provider adapters against those fakes, and the real `nself` binary.

mod admin;
mod anthropic;
mod bad_input;
mod chat;
mod console;
mod failures;
mod gemini;
mod keep_alive;
mod nginx;
mod nself_features;
mod openai;
mod process;
mod process_support;
mod queue;
mod routing;
mod sessions;
mod tools;
