//! The embedded ledger: an append-only table in the local SQLite file. Appends go to the file's
//! one writer ([`SqliteWriter`]), which group-commits every append waiting into a single
//! fsync'ed transaction, so durability costs one fsync per batch, not per request. Reads go
//! through a small pool of read connections, never blocked by the writer (WAL).

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row as _, SqlitePool};
use tokio::sync::watch;

use crate::event::Envelope;
use crate::log::{Appender, LedgerError, LedgerReader, Recorded};
use crate::position::{Frontier, Position};
use crate::writer::{seq_to_offset, Durability, Row, SqliteWriter, CHECKPOINT_EVERY};

/// The embedded log is one partition.
pub const EMBEDDED_PARTITION: i32 = 0;

/// The SQLite-backed `EventLog`.
pub struct SqliteLedger {
    /// Readers; never blocked by the writer (WAL).
    reader: SqlitePool,
    /// The file's single writer, shared with the embedded projector.
    writer: SqliteWriter,
    /// The log's end, published after each commit (one writer: what this process appended).
    head: watch::Receiver<Frontier>,
}

/// Connection options for reading the embedded database file.
pub fn sqlite_options(path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(10))
        .foreign_keys(true)
}

impl SqliteLedger {
    /// Opens (creating if needed) the ledger in the SQLite file at `path`.
    pub async fn open(path: &Path) -> Result<Self, LedgerError> {
        Self::open_with_checkpoints(path, CHECKPOINT_EVERY).await
    }

    /// Opens a file whose contents can be rebuilt (a scratch projection folded through its
    /// writer): nothing fsync'ed, a large page cache.
    pub async fn open_disposable(path: &Path) -> Result<Self, LedgerError> {
        Self::start(path, CHECKPOINT_EVERY, Durability::Disposable).await
    }

    /// [`open`](Self::open), checkpointing the write-ahead log every `checkpoint_every`.
    pub async fn open_with_checkpoints(
        path: &Path,
        checkpoint_every: Duration,
    ) -> Result<Self, LedgerError> {
        Self::start(path, checkpoint_every, Durability::Durable).await
    }

    async fn start(
        path: &Path,
        checkpoint_every: Duration,
        durability: Durability,
    ) -> Result<Self, LedgerError> {
        let (writer, head) = SqliteWriter::start(path, checkpoint_every, durability)?;
        let reader = SqlitePoolOptions::new()
            .test_before_acquire(false)
            .max_connections(4)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(sqlite_options(path))
            .await?;
        Ok(Self {
            reader,
            writer,
            head,
        })
    }

    /// The writer every other write to this database file in the process must go through
    /// (the embedded projector's folds).
    pub fn writer(&self) -> SqliteWriter {
        self.writer.clone()
    }
}

#[async_trait]
impl Appender for SqliteLedger {
    async fn append(&self, events: Vec<Envelope>) -> Result<Vec<Position>, LedgerError> {
        let rows = events
            .iter()
            .map(|e| {
                Ok(Row {
                    event_id: e.event_id.to_string(),
                    event_type: e.event_type(),
                    key_id: e.key_id.clone(),
                    envelope: serde_json::to_string(e).map_err(LedgerError::Encode)?,
                })
            })
            .collect::<Result<Vec<_>, LedgerError>>()?;
        let offsets = self.writer.append(rows).await?;
        Ok(offsets
            .into_iter()
            .map(|o| Position::new(EMBEDDED_PARTITION, o))
            .collect())
    }

    fn appended(&self) -> watch::Receiver<Frontier> {
        self.head.clone()
    }

    async fn ping(&self) -> Result<(), LedgerError> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "sqlite"
    }
}

#[async_trait]
impl LedgerReader for SqliteLedger {
    async fn ends(&self) -> Result<Frontier, LedgerError> {
        Ok(self.head.borrow().clone())
    }

    async fn read(
        &self,
        partition: i32,
        from: u64,
        limit: usize,
    ) -> Result<Vec<Recorded>, LedgerError> {
        if partition != EMBEDDED_PARTITION {
            return Ok(Vec::new());
        }
        let rows =
            sqlx::query("SELECT seq, envelope FROM ledger WHERE seq > ? ORDER BY seq LIMIT ?")
                .bind(i64::try_from(from).unwrap_or(i64::MAX))
                .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                .fetch_all(&self.reader)
                .await?;
        rows.into_iter()
            .map(|row| {
                let offset = seq_to_offset(row.get::<i64, _>(0));
                let text: String = row.get(1);
                let event = serde_json::from_str(&text).map_err(|source| LedgerError::Corrupt {
                    position: Position::new(EMBEDDED_PARTITION, offset),
                    source,
                })?;
                Ok(Recorded {
                    partition: EMBEDDED_PARTITION,
                    offset,
                    event,
                })
            })
            .collect()
    }
}
