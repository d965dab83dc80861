//! The projector loop: takes batches from a [`Feed`] (the embedded log followed from the
//! projection's stored frontier, or a Kafka consumer-group member that seeks there on every
//! assignment), folds them, and publishes how far the projection got (for commands that wait
//! for their own events) and when keys changed (for the gateway's key cache). Embedded mode
//! runs it as a task in the gateway; `nself claw projector` runs it as its own service.
//!
//! Whoever waits on the projection holds a [`ProjectorHandle`]: fed by this loop in-process,
//! or by the read models' change notices when the projector is another process
//! ([`crate::watch`]).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use claw_ledger::{Feed, Frontier, LedgerError, LedgerReader, ReaderFeed, StartPositions};
use futures::{StreamExt as _, TryStreamExt as _};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::key_changes::{key_changes, KeyChange, KeyChanges, KeyChangesTx};
use crate::store::{ReadModels, StoreError};

/// The projection source name of the embedded ledger.
pub const EMBEDDED_SOURCE: &str = "ledger";
/// Events folded per transaction at most while following. Embedded, a fold holds the
/// database file's one writer, and appends wait behind it: short turns keep their wait short.
pub const BATCH: usize = 16;
/// Events folded per transaction when replaying into a scratch projection (nobody waits):
/// few commits, since each rewrites the pages the batch touched.
const REPLAY_BATCH: usize = 16_384;
/// Partitions replayed at once.
const REPLAY_PARTITIONS: usize = 3;
/// When fewer than a batch are waiting, how long to let more gather before folding: under
/// load this turns many one-event transactions into fewer, fuller ones (commands wait this
/// much longer).
const GATHER: Duration = Duration::from_millis(20);

/// Folds one source's feed into the read models.
pub struct Projector {
    feed: Box<dyn Feed>,
    store: ReadModels,
    source: String,
    /// Events per fold at most.
    batch: usize,
}

/// A projection that is behind and has not moved for this long is reported stalled.
pub const STALL: Duration = Duration::from_secs(10);

/// Where a projection is: how far it has folded, when it last moved, and which keys changed.
#[derive(Clone)]
pub struct ProjectorHandle {
    applied: watch::Receiver<Frontier>,
    /// When `applied` last moved (or the handle was made).
    moved: Arc<Mutex<Instant>>,
    key_changes: KeyChanges,
    task: Arc<JoinHandle<()>>,
}

/// The projection's stored frontier of one source, as a consumer's starting point.
pub struct StoredStart {
    pub store: ReadModels,
    pub source: String,
}

#[async_trait]
impl StartPositions for StoredStart {
    async fn start(&self, partitions: &[i32]) -> Result<Frontier, LedgerError> {
        let stored = self
            .store
            .next_offsets(&self.source)
            .await
            .map_err(LedgerError::backend)?;
        Ok(partitions.iter().map(|p| (*p, stored.next(*p))).collect())
    }
}

impl Projector {
    /// Folds `feed` (events of `source`) into `store`, up to `batch` events per fold.
    pub fn new(feed: Box<dyn Feed>, store: ReadModels, source: &str, batch: usize) -> Self {
        Self {
            feed,
            store,
            source: source.to_owned(),
            batch,
        }
    }

    /// The embedded projector: follows `log` from the projection's stored frontier, woken by
    /// the log's commits.
    pub async fn embedded(
        log: Arc<dyn LedgerReader>,
        wake: watch::Receiver<Frontier>,
        store: ReadModels,
    ) -> Result<Self, StoreError> {
        let from = store.next_offsets(EMBEDDED_SOURCE).await?;
        let feed = ReaderFeed::new(log, from).woken_by(wake);
        Ok(Self::new(Box::new(feed), store, EMBEDDED_SOURCE, BATCH))
    }

    /// Starts the loop on the current runtime.
    pub async fn spawn(self) -> Result<ProjectorHandle, StoreError> {
        let from = self.store.next_offsets(&self.source).await?;
        let (applied_tx, applied) = watch::channel(from);
        let (keys_tx, key_changes) = key_changes();
        let task = tokio::spawn(self.run(applied_tx, keys_tx));
        Ok(ProjectorHandle::new(applied, key_changes, task))
    }

    async fn run(mut self, applied: watch::Sender<Frontier>, keys: KeyChangesTx) {
        let mut backoff = Duration::from_millis(50);
        // A batch that failed to fold is folded again, never skipped.
        let mut pending = Vec::new();
        loop {
            if pending.is_empty() {
                pending = match self.feed.next_batch(self.batch).await {
                    Ok(batch) => batch,
                    Err(LedgerError::Closed) => {
                        tracing::error!(
                            "the projector's ledger feed has closed; the projector stops"
                        );
                        return;
                    }
                    Err(err) => {
                        tracing::error!(error = %err, "projector could not read the ledger; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                };
                if pending.len() < self.batch {
                    tokio::time::sleep(GATHER).await;
                    let room = self.batch - pending.len();
                    match self.feed.ready_batch(room).await {
                        Ok(more) => pending.extend(more),
                        Err(err) => {
                            tracing::warn!(error = %err, "projector could not read more of the ledger");
                        }
                    }
                }
            }
            match self.store.fold_batch(&self.source, &pending).await {
                Ok(outcome) => {
                    backoff = Duration::from_millis(50);
                    applied.send_modify(|a| {
                        a.merge(&outcome.reached);
                    });
                    pending.clear();
                    keys.send(KeyChange::Keys(outcome.changed_keys));
                }
                Err(err) => {
                    tracing::error!(error = %err, events = pending.len(), "projector fold failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// Folds the whole of `log` below `until` into `store` (used to build a scratch projection).
/// Partitions are independent (a key's events share one, so per-key order holds within it):
/// up to [`REPLAY_PARTITIONS`] are replayed at once, each reading its next batch while the
/// last one folds, so reading and decoding run on other cores while the writer folds.
pub async fn replay(
    log: Arc<dyn LedgerReader>,
    store: &ReadModels,
    until: &Frontier,
) -> Result<Frontier, StoreError> {
    let from = store.next_offsets(EMBEDDED_SOURCE).await?;
    let partitions = until.iter().map(|(partition, end)| {
        replay_partition(log.clone(), store, partition, from.next(partition), end)
    });
    let reached: Vec<(i32, u64)> = futures::stream::iter(partitions)
        .buffer_unordered(REPLAY_PARTITIONS)
        .try_collect()
        .await?;
    Ok(reached.into_iter().collect())
}

/// Replays `partition` from `from` up to `end`; returns it with its next offset.
async fn replay_partition(
    log: Arc<dyn LedgerReader>,
    store: &ReadModels,
    partition: i32,
    from: u64,
    end: u64,
) -> Result<(i32, u64), StoreError> {
    let read = |from: u64| {
        let log = log.clone();
        let limit = usize::try_from(end.saturating_sub(from))
            .unwrap_or(REPLAY_BATCH)
            .min(REPLAY_BATCH);
        async move {
            if limit == 0 {
                Ok(Vec::new())
            } else {
                log.read(partition, from, limit).await
            }
        }
    };
    let mut next = from;
    let mut batch = read(next).await?;
    while let Some(last) = batch.last() {
        next = last.offset + 1;
        let (folded, following) =
            tokio::join!(store.fold_batch(EMBEDDED_SOURCE, &batch), read(next));
        folded?;
        batch = following?;
    }
    Ok((partition, next))
}

impl ProjectorHandle {
    /// A handle on watches fed by `task`.
    pub fn new(
        applied: watch::Receiver<Frontier>,
        key_changes: KeyChanges,
        task: JoinHandle<()>,
    ) -> Self {
        let moved = Arc::new(Mutex::new(Instant::now()));
        let mut watch = applied.clone();
        let last = moved.clone();
        tokio::spawn(async move {
            while watch.changed().await.is_ok() {
                *last.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
            }
        });
        Self {
            applied,
            moved,
            key_changes,
            task: Arc::new(task),
        }
    }

    /// How long since the projection last moved.
    pub fn idle(&self) -> Duration {
        self.moved
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .elapsed()
    }

    /// `running`, `stalled` (`lag` events behind and not moved for [`STALL`]: the projector
    /// service is down or stuck) or `stopped` (this process no longer follows it).
    pub fn condition(&self, lag: u64) -> &'static str {
        if !self.is_running() {
            "stopped"
        } else if lag > 0 && self.idle() >= STALL {
            "stalled"
        } else {
            "running"
        }
    }

    /// How far the projection has folded (everything below it is visible).
    pub fn applied(&self) -> Frontier {
        self.applied.borrow().clone()
    }

    /// A receiver of the applied frontier, to watch it move.
    pub fn applied_watch(&self) -> watch::Receiver<Frontier> {
        self.applied.clone()
    }

    /// Waits until everything below `target` is visible in the read models.
    pub async fn wait_for(&self, target: &Frontier, deadline: Duration) -> Result<(), StoreError> {
        let mut applied = self.applied.clone();
        let reached = tokio::time::timeout(deadline, applied.wait_for(|a| a.covers(target)))
            .await
            .is_ok_and(|r| r.is_ok());
        if reached {
            Ok(())
        } else {
            Err(StoreError::Lagging {
                target: serde_json::to_string(target).unwrap_or_default(),
                applied: serde_json::to_string(&self.applied()).unwrap_or_default(),
                waited: deadline,
            })
        }
    }

    /// The keys created or revoked, as they are folded (for one consumer: the key cache).
    pub fn key_changes(&self) -> KeyChanges {
        self.key_changes.clone()
    }

    /// Whether the loop is still running.
    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }

    /// Stops the loop (its feed with it) wherever it is; a fold in progress rolls back.
    pub fn abort(&self) {
        self.task.abort();
    }

    /// Completes when the loop has stopped (its feed closed).
    pub async fn stopped(&self) {
        let mut applied = self.applied.clone();
        while applied.changed().await.is_ok() {}
    }
}
