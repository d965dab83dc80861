//! The ledger's two sides. Producers ([`Appender`]) append envelopes and learn each one's
//! [`Position`] once it is durable. Consumers ([`LedgerReader`]) see where each partition
//! ends and read any partition from any offset; following and de-duplication by `event_id`
//! are theirs to do (Kafka delivers at least once and cannot refuse a duplicate append).
//! Each backend (embedded SQLite, Kafka) implements both.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::event::Envelope;
use crate::position::{Frontier, Position};

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

impl Recorded {
    pub fn position(&self) -> Position {
        Position::new(self.partition, self.offset)
    }
}

/// What can go wrong with the log. The backends' own errors are one boxed variant.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger backend failed: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("ledger write failed: {0}")]
    Write(String),
    #[error("could not start a ledger thread: {0}")]
    Thread(std::io::Error),
    #[error("ledger record at {position} is not a valid envelope: {source}")]
    Corrupt {
        position: Position,
        source: serde_json::Error,
    },
    #[error("ledger event could not be encoded: {0}")]
    Encode(serde_json::Error),
    #[error("the ledger writer has stopped")]
    Closed,
}

impl LedgerError {
    /// Wraps a backend's own error.
    pub fn backend(err: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Backend(Box::new(err))
    }
}

impl From<sqlx::Error> for LedgerError {
    fn from(err: sqlx::Error) -> Self {
        Self::backend(err)
    }
}

impl From<rusqlite::Error> for LedgerError {
    fn from(err: rusqlite::Error) -> Self {
        Self::backend(err)
    }
}

/// The producer side: where every fact goes.
#[async_trait]
pub trait Appender: Send + Sync + 'static {
    /// Appends `events`, in order (at least per `key_id`), and returns each one's position
    /// once it is durable.
    async fn append(&self, events: Vec<Envelope>) -> Result<Vec<Position>, LedgerError>;

    /// How far this process's own appends reached, per partition; changes after every durable
    /// append (waiting for the projection to cover it = "what I wrote is visible").
    fn appended(&self) -> watch::Receiver<Frontier>;

    /// Whether the log answers (for `/readyz`).
    async fn ping(&self) -> Result<(), LedgerError>;

    /// `sqlite` or `kafka`, for status reports.
    fn backend(&self) -> &'static str;
}

/// The consumer side: random access to every partition.
#[async_trait]
pub trait LedgerReader: Send + Sync + 'static {
    /// Where each partition ends now (its next offset).
    async fn ends(&self) -> Result<Frontier, LedgerError>;

    /// Up to `limit` events of `partition` from offset `from` (inclusive), in order; fewer,
    /// or none, at the end.
    async fn read(
        &self,
        partition: i32,
        from: u64,
        limit: usize,
    ) -> Result<Vec<Recorded>, LedgerError>;
}

/// Both sides of one backend.
pub trait EventLog: Appender + LedgerReader {}

impl<T: Appender + LedgerReader> EventLog for T {}

/// Where a consumer starts on the partitions it is given: the projection keeps its own
/// offsets, so it, not the broker, says where to resume.
#[async_trait]
pub trait StartPositions: Send + Sync + 'static {
    /// The next offset to read of each of `partitions` (0 for a partition never folded).
    async fn start(&self, partitions: &[i32]) -> Result<Frontier, LedgerError>;
}

/// A consumer's stream of events: batches from the partitions it follows, each partition in
/// offset order. It may deliver an event twice (at least once): the fold drops repeats.
#[async_trait]
pub trait Feed: Send {
    /// Waits for events, then returns up to `max` of those ready.
    async fn next_batch(&mut self, max: usize) -> Result<Vec<Recorded>, LedgerError>;

    /// Up to `max` events that are ready now, without waiting (maybe none).
    async fn ready_batch(&mut self, max: usize) -> Result<Vec<Recorded>, LedgerError> {
        let _ = max;
        Ok(Vec::new())
    }
}
