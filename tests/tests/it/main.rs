//! End-to-end tests across the crates: the gateway in process in front of a fake Ollama
//! (OpenAI shapes validated against OpenAI's own schemas), and the real `nself` binary.

mod admin;
mod bad_input;
mod chat;
mod failures;
mod process;
mod process_support;
