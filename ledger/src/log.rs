//! The `EventLog` abstraction: an append-only, ordered, durable log of envelopes. Appends return
//! once the events are durable; readers read from an offset and follow new events through a
//! head watch instead of polling.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::event::Envelope;

/// An event as stored in the log, with its position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recorded {
    /// Kafka partition; always 0 for the embedded log.
    pub partition: i32,
    /// Position within the partition, from 0.
    pub offset: u64,
    /// The event.
    pub event: Envelope,
}

/// What can go wrong with the log.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger storage failed: {0}")]
    Storage(#[from] sqlx::Error),
    #[error("ledger storage failed: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("ledger write failed: {0}")]
    Write(String),
    #[error("could not start a ledger thread: {0}")]
    Thread(std::io::Error),
    #[error("ledger record at offset {offset} is not a valid envelope: {source}")]
    Corrupt {
        offset: u64,
        source: serde_json::Error,
    },
    #[error("ledger event could not be encoded: {0}")]
    Encode(serde_json::Error),
    #[error("the ledger writer has stopped")]
    Closed,
}

/// The append-only log every fact goes to.
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Appends `events` in order and returns their offsets once they are durable. An event whose
    /// `event_id` is already in the log is not written again; its existing offset is returned.
    async fn append(&self, events: Vec<Envelope>) -> Result<Vec<u64>, LedgerError>;

    /// Reads up to `limit` events starting at `from` (inclusive), in order.
    async fn read(&self, from: u64, limit: usize) -> Result<Vec<Recorded>, LedgerError>;

    /// The next offset to be written (= number of events). It changes after every durable
    /// append, so followers can wait on it.
    fn head(&self) -> watch::Receiver<u64>;

    /// Whether the log's storage answers (for `/readyz`).
    async fn ping(&self) -> Result<(), LedgerError>;
}
