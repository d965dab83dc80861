//! The embedded ledger: an append-only table in the local SQLite file. One writer task
//! group-commits every append that is waiting into a single fsync'ed transaction, so durability
//! costs one fsync per batch, not per request.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Row as _, Sqlite, SqliteConnection, SqlitePool};
use tokio::sync::{mpsc, oneshot, watch};

use crate::event::Envelope;
use crate::log::{EventLog, LedgerError, Recorded};

/// How many appends may wait for the writer before callers feel backpressure.
const QUEUE_DEPTH: usize = 4096;
/// The most appends folded into one transaction.
const MAX_BATCH: usize = 1024;

const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS ledger (
    seq        INTEGER PRIMARY KEY,
    event_id   TEXT    NOT NULL UNIQUE,
    event_type TEXT    NOT NULL,
    key_id     TEXT    NOT NULL,
    envelope   TEXT    NOT NULL
)";

/// One event ready to store: (event_id, event_type, key_id, envelope JSON).
type Row = (String, &'static str, String, String);

struct AppendJob {
    rows: Vec<Row>,
    done: oneshot::Sender<Result<Vec<u64>, LedgerError>>,
}

/// Serialises the process's write transactions on the embedded database file. SQLite allows
/// one writer at a time and a blocked writer sleeps in growing steps (up to 100 ms); queueing
/// in-process instead hands the lock over the moment it is free.
pub type WriteGate = Arc<tokio::sync::Mutex<()>>;

/// The SQLite-backed `EventLog`.
pub struct SqliteLedger {
    /// Readers; never blocked by the writer (WAL).
    reader: SqlitePool,
    /// Feeds the group-commit writer task.
    jobs: mpsc::Sender<AppendJob>,
    /// Next offset to be written, published after each commit.
    head: watch::Receiver<u64>,
    /// Shared with the embedded projector, which writes to the same file.
    gate: WriteGate,
}

/// Connection options shared by everything that opens the embedded database file.
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
        Self::open_with(sqlite_options(path)).await
    }

    async fn open_with(opts: SqliteConnectOptions) -> Result<Self, LedgerError> {
        let writer = SqlitePoolOptions::new()
            .test_before_acquire(false)
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(opts.clone())
            .await?;
        sqlx::query(CREATE_TABLE).execute(&writer).await?;
        let reader = SqlitePoolOptions::new()
            .test_before_acquire(false)
            .max_connections(4)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(opts)
            .await?;
        let next: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM ledger")
            .fetch_one(&writer)
            .await?;
        let (head_tx, head) = watch::channel(u64::try_from(next).unwrap_or(0));
        let (jobs, rx) = mpsc::channel(QUEUE_DEPTH);
        let gate = WriteGate::default();
        tokio::spawn(write_loop(writer, rx, head_tx, gate.clone()));
        Ok(Self {
            reader,
            jobs,
            head,
            gate,
        })
    }

    /// The gate every writer to this database file in the process must hold.
    pub fn write_gate(&self) -> WriteGate {
        self.gate.clone()
    }
}

#[async_trait]
impl EventLog for SqliteLedger {
    async fn append(&self, events: Vec<Envelope>) -> Result<Vec<u64>, LedgerError> {
        let rows = events
            .iter()
            .map(|e| {
                let json = serde_json::to_string(e).map_err(LedgerError::Encode)?;
                Ok((
                    e.event_id.to_string(),
                    e.event_type(),
                    e.key_id.clone(),
                    json,
                ))
            })
            .collect::<Result<Vec<_>, LedgerError>>()?;
        let (done, wait) = oneshot::channel();
        self.jobs
            .send(AppendJob { rows, done })
            .await
            .map_err(|_| LedgerError::Closed)?;
        wait.await.map_err(|_| LedgerError::Closed)?
    }

    async fn read(&self, from: u64, limit: usize) -> Result<Vec<Recorded>, LedgerError> {
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
                let event = serde_json::from_str(&text)
                    .map_err(|source| LedgerError::Corrupt { offset, source })?;
                Ok(Recorded {
                    partition: 0,
                    offset,
                    event,
                })
            })
            .collect()
    }

    fn head(&self) -> watch::Receiver<u64> {
        self.head.clone()
    }

    async fn ping(&self) -> Result<(), LedgerError> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }
}

/// Offsets count from 0; SQLite's `seq` from 1.
fn seq_to_offset(seq: i64) -> u64 {
    u64::try_from(seq - 1).unwrap_or(0)
}

/// The single writer: takes every waiting job, commits them in one transaction, answers each.
async fn write_loop(
    pool: SqlitePool,
    mut rx: mpsc::Receiver<AppendJob>,
    head: watch::Sender<u64>,
    gate: WriteGate,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let committed = {
            let _gate = gate.lock().await;
            let current = *head.borrow();
            commit(&pool, &batch, current).await
        };
        match committed {
            Ok((offsets, next)) => {
                head.send_if_modified(|h| {
                    let changed = *h != next;
                    *h = next;
                    changed
                });
                for (job, offs) in batch.drain(..).zip(offsets) {
                    let _ = job.done.send(Ok(offs));
                }
            }
            Err(err) => {
                tracing::error!(error = %err, jobs = batch.len(), "ledger append failed");
                let msg = err.to_string();
                for job in batch.drain(..) {
                    let _ = job
                        .done
                        .send(Err(LedgerError::Storage(sqlx::Error::Protocol(
                            msg.clone(),
                        ))));
                }
            }
        }
    }
}

/// Rows per `INSERT` statement (4 parameters each, well under SQLite's limit).
const ROWS_PER_INSERT: usize = 1000;

/// Writes every row of `batch` atomically and returns each job's offsets and the new head.
/// Statements, not rows, are what cost here: up to a thousand rows go in one multi-row
/// `INSERT`, which SQLite commits atomically on its own; larger batches share a transaction.
async fn commit(
    pool: &SqlitePool,
    batch: &[AppendJob],
    head: u64,
) -> Result<(Vec<Vec<u64>>, u64), sqlx::Error> {
    let rows: Vec<&Row> = batch.iter().flat_map(|job| job.rows.iter()).collect();
    if rows.len() <= ROWS_PER_INSERT {
        let mut conn = pool.acquire().await?;
        return write_rows(&mut conn, batch, &rows, head).await;
    }
    // IMMEDIATE: take the write lock up front, so the busy timeout applies instead of a
    // read snapshot failing to upgrade when another writer committed in between.
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let written = write_rows(&mut tx, batch, &rows, head).await?;
    tx.commit().await?;
    Ok(written)
}

async fn write_rows(
    conn: &mut SqliteConnection,
    batch: &[AppendJob],
    rows: &[&Row],
    head: u64,
) -> Result<(Vec<Vec<u64>>, u64), sqlx::Error> {
    let mut seqs: HashMap<String, i64> = HashMap::with_capacity(rows.len());
    for chunk in rows.chunks(ROWS_PER_INSERT) {
        let mut insert = QueryBuilder::<Sqlite>::new(
            "INSERT INTO ledger (event_id, event_type, key_id, envelope) ",
        );
        insert.push_values(chunk, |mut row, (event_id, event_type, key_id, json)| {
            row.push_bind(event_id.as_str())
                .push_bind(*event_type)
                .push_bind(key_id.as_str())
                .push_bind(json.as_str());
        });
        insert.push(" ON CONFLICT (event_id) DO NOTHING RETURNING event_id, seq");
        let written: Vec<(String, i64)> = insert.build_query_as().fetch_all(&mut *conn).await?;
        seqs.extend(written);
    }
    let mut new_head = head;
    let mut all = Vec::with_capacity(batch.len());
    for job in batch {
        let mut offsets = Vec::with_capacity(job.rows.len());
        for (event_id, ..) in &job.rows {
            let seq = match seqs.get(event_id) {
                Some(seq) => *seq,
                // Already in the ledger (a redelivery): it keeps its first offset.
                None => {
                    sqlx::query_scalar("SELECT seq FROM ledger WHERE event_id = ?")
                        .bind(event_id)
                        .fetch_one(&mut *conn)
                        .await?
                }
            };
            new_head = new_head.max(u64::try_from(seq).unwrap_or(0));
            offsets.push(seq_to_offset(seq));
        }
        all.push(offsets);
    }
    Ok((all, new_head))
}
