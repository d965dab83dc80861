//! The one writer of the embedded database file. SQLite lets one connection write at a time,
//! so instead of several connections queueing for its lock, a dedicated thread owns the file's
//! only write connection and does every write in arrival order:
//!
//! - ledger appends, group-committed: every append waiting when the thread comes round goes
//!   into one transaction, committed with `synchronous = FULL` (fsync'ed) before any caller is
//!   answered; appends go before other work that arrived with them;
//! - other transactions ([`SqliteWriter::transact`], the embedded projector's folds), committed
//!   with `synchronous = NORMAL`: their data is rebuildable from the ledger, and the next durable
//!   append's fsync covers them anyway (WAL order). Right after one, another thread starts
//!   flushing the log, so that the next append's fsync finds less left to write.
//!
//! The thread talks to SQLite through rusqlite, statement by statement on its own stack: an
//! async driver would cost a thread hand-off per statement.
//!
//! Checkpoints are arranged so that commits stay cheap. A commit's fsync costs about twice as
//! much when it grows the write-ahead log (the file system must also journal the new size) as
//! when it overwrites blocks the log already has, and SQLite only goes back to the start of
//! the log when a write begins with every frame copied into the database. So a second thread
//! now and then ([`CHECKPOINT_EVERY`]) copies the bulk of the log into the database without
//! stopping anyone (a passive checkpoint), and the writer, the next time it has nothing to do,
//! copies the few frames committed since and so lets its next write start the log over.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension as _, Transaction, TransactionBehavior};
use tokio::sync::{mpsc, oneshot, watch};

use crate::log::LedgerError;
use crate::position::Frontier;
use crate::sqlite::EMBEDDED_PARTITION;

/// How many jobs may wait for the writer before callers feel backpressure.
const QUEUE_DEPTH: usize = 4096;
/// The most jobs taken in one round.
const MAX_ROUND: usize = 1024;
/// How long the writer waits for SQLite's lock when another process holds it.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the checkpointer copies the write-ahead log into the database by default.
/// Rarely is better: a checkpoint writes in a burst, and the outbox's fsyncs queue behind it
/// (measured: every 2 s beat every 200 ms and every 5 s at the p99).
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(2);
/// Below this many frames in the log, starting it over is not worth a catch-up checkpoint.
const RESTART_AFTER_FRAMES: i64 = 256;

const CREATE_LEDGER: &str = "CREATE TABLE IF NOT EXISTS ledger (
    seq        INTEGER PRIMARY KEY,
    event_id   TEXT    NOT NULL UNIQUE,
    event_type TEXT    NOT NULL,
    key_id     TEXT    NOT NULL,
    envelope   TEXT    NOT NULL
)";

/// One event ready to store.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub event_id: String,
    pub event_type: &'static str,
    pub key_id: String,
    pub envelope: String,
}

/// A transaction to run on the writer thread; it begins, commits and answers by itself.
type Work = Box<dyn FnOnce(&mut Connection) + Send>;

enum Job {
    Append {
        rows: Vec<Row>,
        done: oneshot::Sender<Result<Vec<u64>, LedgerError>>,
    },
    Transact(Work),
}

/// A handle on the writer thread; cheap to clone. The thread stops when the last handle is
/// dropped.
#[derive(Clone)]
pub struct SqliteWriter {
    jobs: mpsc::Sender<Job>,
}

impl std::fmt::Debug for SqliteWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteWriter").finish_non_exhaustive()
    }
}

impl SqliteWriter {
    /// Opens the write connection on `path` (creating the file and the ledger table), starts
    /// the writer and checkpointer threads, and returns the handle with a watch on the ledger's
    /// head (the next offset to be written).
    pub(crate) fn start(
        path: &Path,
        checkpoint_every: Duration,
        durability: Durability,
    ) -> Result<(Self, watch::Receiver<Frontier>), LedgerError> {
        let conn = open_connection(path)?;
        if durability == Durability::Disposable {
            conn.pragma_update(None, "cache_size", DISPOSABLE_CACHE_KIB)?;
        }
        conn.execute(CREATE_LEDGER, [])?;
        let next: i64 =
            conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM ledger", [], |r| r.get(0))?;
        let (head_tx, head) = watch::channel(Frontier::from_iter([(
            EMBEDDED_PARTITION,
            u64::try_from(next).unwrap_or(0),
        )]));
        let (jobs, rx) = mpsc::channel(QUEUE_DEPTH);
        let (flushes, flush_requests) = std_mpsc::channel::<()>();
        let backfilled = Arc::new(AtomicBool::new(false));
        let checkpointer = Checkpointer {
            path: path.to_owned(),
            every: checkpoint_every,
            flush_requests,
            backfilled: backfilled.clone(),
        };
        std::thread::Builder::new()
            .name("claw-checkpoint".into())
            .spawn(move || checkpointer.run())
            .map_err(LedgerError::Thread)?;
        std::thread::Builder::new()
            .name("claw-sqlite-writer".into())
            .spawn(move || {
                Writer {
                    conn,
                    durability,
                    head: head_tx,
                    durable: None,
                    backfilled,
                    flushes,
                }
                .run(rx);
            })
            .map_err(LedgerError::Thread)?;
        Ok((Self { jobs }, head))
    }

    /// Appends `rows` durably; returns each row's offset (an `event_id` already in the ledger
    /// keeps its first offset).
    pub(crate) async fn append(&self, rows: Vec<Row>) -> Result<Vec<u64>, LedgerError> {
        let (done, wait) = oneshot::channel();
        self.send(Job::Append { rows, done }).await?;
        wait.await.map_err(|_| LedgerError::Closed)?
    }

    /// Runs `work` in one transaction on the writer thread and returns what it returned. The
    /// transaction commits when `work` succeeds and rolls back when it fails; its commit is not
    /// fsync'ed by itself (use it for data that can be rebuilt from the ledger).
    pub async fn transact<T, E, F>(&self, work: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<LedgerError> + Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T, E> + Send + 'static,
    {
        let (done, wait) = oneshot::channel();
        let job: Work = Box::new(move |conn| {
            let result = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(|e| E::from(LedgerError::from(e)))
                .and_then(|tx| {
                    let value = work(&tx)?;
                    tx.commit().map_err(|e| E::from(LedgerError::from(e)))?;
                    Ok(value)
                });
            let _ = done.send(result);
        });
        self.send(Job::Transact(job)).await?;
        wait.await.map_err(|_| E::from(LedgerError::Closed))?
    }

    async fn send(&self, job: Job) -> Result<(), LedgerError> {
        self.jobs.send(job).await.map_err(|_| LedgerError::Closed)
    }
}

/// What a database file's commits are worth.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// The ledger's: every commit of an append is fsync'ed before it is acknowledged.
    Durable,
    /// Rebuilt from elsewhere when lost (a scratch projection): nothing is fsync'ed, and the
    /// page cache holds a replay's working set, so large transactions do not spill.
    Disposable,
}

/// The page cache of a disposable file, in KiB (as `PRAGMA cache_size` takes it: negative).
const DISPOSABLE_CACHE_KIB: i64 = -262_144;

fn open_connection(path: &Path) -> Result<Connection, rusqlite::Error> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

/// The writer thread's state.
struct Writer {
    conn: Connection,
    durability: Durability,
    /// The log's end (partition 0's next offset), published after each commit.
    head: watch::Sender<Frontier>,
    /// The `synchronous` setting the connection has now (`None` until first set).
    durable: Option<bool>,
    /// Set by the checkpointer when it has copied most of a log worth starting over.
    backfilled: Arc<AtomicBool>,
    /// Asks the checkpointer to flush the log now (after a relaxed commit).
    flushes: std_mpsc::Sender<()>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        // Checkpoints are the checkpointer's job; projections are folded by many statements,
        // so keep them prepared.
        if let Err(err) = self.conn.pragma_update(None, "wal_autocheckpoint", 0) {
            tracing::warn!(error = %err, "could not turn off automatic checkpoints");
        }
        self.conn.set_prepared_statement_cache_capacity(256);
        let mut round = Vec::with_capacity(MAX_ROUND);
        while let Some(first) = rx.blocking_recv() {
            round.push(first);
            while round.len() < MAX_ROUND {
                match rx.try_recv() {
                    Ok(job) => round.push(job),
                    Err(_) => break,
                }
            }
            let mut appends = Vec::new();
            let mut others = Vec::new();
            for job in round.drain(..) {
                match job {
                    Job::Append { rows, done } => appends.push((rows, done)),
                    Job::Transact(work) => others.push(work),
                }
            }
            if !appends.is_empty() {
                self.commit_appends(appends);
            }
            for work in others {
                self.transact(work);
            }
            if rx.is_empty() && self.backfilled.swap(false, Ordering::Relaxed) {
                self.catch_up();
            }
        }
    }

    /// Copies what the checkpointer left in the log into the database, so that the next write
    /// starts the log over (unless a reader is still using it; then it grows a little more).
    fn catch_up(&mut self) {
        if let Err(err) = self
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
        {
            tracing::warn!(error = %err, "catch-up checkpoint failed");
        }
    }

    /// Sets `synchronous` for the next commits, if it is not set so already.
    fn set_durable(&mut self, durable: bool) -> Result<(), rusqlite::Error> {
        if self.durable != Some(durable) {
            let mode = match (self.durability, durable) {
                (Durability::Disposable, _) => "OFF",
                (Durability::Durable, true) => "FULL",
                (Durability::Durable, false) => "NORMAL",
            };
            self.conn.pragma_update(None, "synchronous", mode)?;
            self.durable = Some(durable);
        }
        Ok(())
    }

    fn commit_appends(&mut self, appends: Appends) {
        let started = Instant::now();
        let written = self
            .set_durable(true)
            .and_then(|()| write_rows(&mut self.conn, &appends));
        metrics::histogram!("claw_ledger_commit_seconds").record(started.elapsed().as_secs_f64());
        #[allow(clippy::cast_precision_loss)]
        metrics::histogram!("claw_ledger_commit_appends").record(appends.len() as f64);
        match written {
            Ok((offsets, next)) => {
                self.head
                    .send_if_modified(|h| h.advance(EMBEDDED_PARTITION, next));
                for ((_, done), offs) in appends.into_iter().zip(offsets) {
                    let _ = done.send(Ok(offs));
                }
            }
            Err(err) => {
                tracing::error!(error = %err, appends = appends.len(), "ledger append failed");
                let msg = err.to_string();
                for (_, done) in appends {
                    let _ = done.send(Err(LedgerError::Write(msg.clone())));
                }
            }
        }
    }

    fn transact(&mut self, work: Work) {
        if let Err(err) = self.set_durable(false) {
            tracing::warn!(error = %err, "could not relax synchronous for a projection write");
        }
        let started = Instant::now();
        work(&mut self.conn);
        metrics::histogram!("claw_sqlite_transaction_seconds")
            .record(started.elapsed().as_secs_f64());
        // Start writing the transaction's frames to disk now, off this thread, rather than
        // leave them all to the next append's fsync.
        let _ = self.flushes.send(());
    }
}

/// One round's appends and where to answer each.
type Appends = Vec<(Vec<Row>, oneshot::Sender<Result<Vec<u64>, LedgerError>>)>;

/// Writes every row of `appends` in one transaction; returns each append's offsets and the
/// new head. Redelivered `event_id`s are not written again and keep their first offset.
fn write_rows(
    conn: &mut Connection,
    appends: &Appends,
) -> Result<(Vec<Vec<u64>>, u64), rusqlite::Error> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut offsets = Vec::with_capacity(appends.len());
    let mut next = 0;
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO ledger (event_id, event_type, key_id, envelope) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (event_id) DO NOTHING RETURNING seq",
        )?;
        let mut existing = tx.prepare_cached("SELECT seq FROM ledger WHERE event_id = ?1")?;
        let mut seen: HashMap<&str, i64> = HashMap::new();
        for (rows, _) in appends {
            let mut offs = Vec::with_capacity(rows.len());
            for row in rows {
                let inserted: Option<i64> = insert
                    .query_row(
                        (&row.event_id, row.event_type, &row.key_id, &row.envelope),
                        |r| r.get(0),
                    )
                    .optional()?;
                let seq = match inserted.or_else(|| seen.get(row.event_id.as_str()).copied()) {
                    Some(seq) => seq,
                    None => existing.query_row([&row.event_id], |r| r.get(0))?,
                };
                seen.insert(&row.event_id, seq);
                next = next.max(seq);
                offs.push(seq_to_offset(seq));
            }
            offsets.push(offs);
        }
    }
    tx.commit()?;
    Ok((offsets, u64::try_from(next).unwrap_or(0)))
}

/// Offsets count from 0; SQLite's `seq` from 1.
pub(crate) fn seq_to_offset(seq: i64) -> u64 {
    u64::try_from(seq - 1).unwrap_or(0)
}

/// The write-ahead log's file beside the database at `path`.
fn wal_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

/// Copies the write-ahead log into the database file now and then, on its own connection, so
/// that no commit pays for it. Passive: it never waits for the writer or for readers.
struct Checkpointer {
    path: PathBuf,
    every: Duration,
    /// Requests to flush the log; disconnects when the writer stops.
    flush_requests: std_mpsc::Receiver<()>,
    /// Tells the writer that the log is (nearly) all copied.
    backfilled: Arc<AtomicBool>,
}

impl Checkpointer {
    fn run(self) {
        let conn = match open_connection(&self.path) {
            Ok(conn) => conn,
            Err(err) => {
                tracing::error!(error = %err, "checkpointer could not open the database; the write-ahead log will grow until restart");
                return;
            }
        };
        let wal_path = wal_path(&self.path);
        let mut wal: Option<std::fs::File> = None;
        let mut due = Instant::now() + self.every;
        loop {
            match self
                .flush_requests
                .recv_timeout(due.saturating_duration_since(Instant::now()))
            {
                Ok(()) => {
                    while self.flush_requests.try_recv().is_ok() {}
                    if wal.is_none() {
                        wal = std::fs::File::open(&wal_path).ok();
                    }
                    if let Some(file) = &wal {
                        if let Err(err) = file.sync_data() {
                            tracing::warn!(error = %err, "could not flush the write-ahead log");
                            wal = None;
                        }
                    }
                    continue;
                }
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
                Err(std_mpsc::RecvTimeoutError::Timeout) => {
                    due = Instant::now() + self.every;
                }
            }
            // (blocked, frames in the log, frames copied)
            let result = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
            });
            match result {
                Ok((frames, _)) if frames >= RESTART_AFTER_FRAMES => {
                    self.backfilled.store(true, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(err) => tracing::warn!(error = %err, "checkpoint failed; retrying"),
            }
        }
    }
}
