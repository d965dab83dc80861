//! The ledger: what happened, in order, forever. This crate owns the event vocabulary
//! ([`event`]), its JSON Schemas ([`schema`]), places in the log ([`position`]), the log's
//! producer and consumer sides ([`log`]) with the embedded SQLite backend ([`sqlite`], and that
//! file's single [`writer`]), and the [`outbox`] that makes requests' facts durable first.

pub mod event;
pub mod follow;
pub mod kafka;
pub mod log;
pub mod outbox;
pub mod position;
pub mod schema;
pub mod sqlite;
pub mod writer;

pub use event::{
    format_time, Endpoint, Envelope, Event, FallbackReason, KeyCreated, KeyRevoked, Provider,
    RequestServed, Tier, TierFallback, SCHEMA_VERSION,
};
pub use follow::ReaderFeed;
pub use kafka::{GroupFeed, KafkaConfig, KafkaLedger, KafkaLedgerError};
pub use log::{Appender, EventLog, Feed, LedgerError, LedgerReader, Recorded, StartPositions};
pub use outbox::Outbox;
pub use position::{Frontier, Position};
pub use sqlite::{SqliteLedger, EMBEDDED_PARTITION};
pub use writer::SqliteWriter;
