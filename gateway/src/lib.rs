//! The ɳClaw gateway: an OpenAI-compatible API (`/v1`) that routes each request through tiers
//! (local Ollama first), accounts for it in the ledger, and an admin API (`/claw/v1`) for keys,
//! usage, events and audits.

pub mod accounting;
pub mod auth;
pub mod capacity;
pub mod circuit;
pub mod cluster;
pub mod config;
pub mod console;
pub mod error;
pub mod exchange;
pub mod images;
pub mod keys;
pub mod nself;
pub mod openai;
pub mod pricing;
pub mod providers;
pub mod router;
pub mod routes;
pub mod startup;
pub mod state;
pub mod unread_body;

pub use config::Settings;
pub use routes::router;
pub use startup::{open, serve, serve_on, StartError};
pub use state::AppState;
