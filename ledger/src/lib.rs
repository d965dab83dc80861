//! The ledger: what happened, in order, forever. This crate owns the event vocabulary
//! ([`event`]), its JSON Schemas ([`schema`]) and the append-only [`EventLog`] with its
//! embedded SQLite backend ([`sqlite`]) and that file's single [`writer`].

pub mod event;
pub mod log;
pub mod outbox;
pub mod schema;
pub mod sqlite;
pub mod writer;

pub use event::{
    format_time, Endpoint, Envelope, Event, FallbackReason, KeyCreated, KeyRevoked, Provider,
    RequestServed, Tier, TierFallback, SCHEMA_VERSION,
};
pub use log::{EventLog, LedgerError, Recorded};
pub use outbox::Outbox;
pub use sqlite::SqliteLedger;
pub use writer::SqliteWriter;
