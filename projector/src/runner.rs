//! The projector loop: follows the ledger from the projection's stored offset, folds batches,
//! and publishes how far it got (for commands that wait for their own events) and when keys
//! changed (for the gateway's key cache). Embedded mode runs it as a task in the gateway.

use std::sync::Arc;
use std::time::Duration;

use claw_ledger::EventLog;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::store::{ReadModels, StoreError};

/// The projection source name of the embedded ledger.
pub const EMBEDDED_SOURCE: &str = "ledger";
/// Events folded per transaction at most while following. Embedded, a fold holds the
/// database file's one writer, and appends wait behind it: short turns keep their wait short.
const BATCH: usize = 16;
/// Events folded per transaction when replaying into a scratch projection (nobody waits).
const REPLAY_BATCH: usize = 512;
/// When fewer than a batch are waiting, how long to let more gather before folding: under
/// load this turns many one-event transactions into fewer, fuller ones (commands wait this
/// much longer).
const GATHER: Duration = Duration::from_millis(20);

/// Follows one ledger partition into the read models.
pub struct Projector {
    log: Arc<dyn EventLog>,
    store: ReadModels,
    source: String,
}

/// A running projector: how far it has folded, and a counter bumped on every key change.
#[derive(Clone)]
pub struct ProjectorHandle {
    applied: watch::Receiver<u64>,
    key_changes: watch::Receiver<u64>,
    task: Arc<JoinHandle<()>>,
}

impl Projector {
    pub fn new(log: Arc<dyn EventLog>, store: ReadModels) -> Self {
        Self {
            log,
            store,
            source: EMBEDDED_SOURCE.to_owned(),
        }
    }

    /// Starts the loop on the current runtime.
    pub async fn spawn(self) -> Result<ProjectorHandle, StoreError> {
        let next = self.store.next_offset(&self.source, 0).await?;
        let (applied_tx, applied) = watch::channel(next);
        let (keys_tx, key_changes) = watch::channel(0);
        let task = tokio::spawn(self.run(next, applied_tx, keys_tx));
        Ok(ProjectorHandle {
            applied,
            key_changes,
            task: Arc::new(task),
        })
    }

    async fn run(self, mut next: u64, applied: watch::Sender<u64>, keys: watch::Sender<u64>) {
        let mut head = self.log.head();
        let mut backoff = Duration::from_millis(50);
        loop {
            let lag = head.borrow_and_update().saturating_sub(next);
            if lag == 0 {
                if head.changed().await.is_err() {
                    return;
                }
                continue;
            }
            if lag < BATCH as u64 {
                tokio::time::sleep(GATHER).await;
            }
            match self.step(next).await {
                Ok((new_next, keys_changed)) => {
                    backoff = Duration::from_millis(50);
                    next = new_next;
                    applied.send_replace(next);
                    if keys_changed {
                        keys.send_modify(|n| *n += 1);
                    }
                }
                Err(err) => {
                    tracing::error!(error = %err, offset = next, "projector fold failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn step(&self, next: u64) -> Result<(u64, bool), StoreError> {
        let batch = self.log.read(next, BATCH).await?;
        let Some(last) = batch.last() else {
            return Ok((next, false));
        };
        let new_next = last.offset + 1;
        let outcome = self.store.fold_batch(&self.source, &batch).await?;
        Ok((new_next, outcome.keys_changed))
    }
}

/// Folds the whole of `log` below `until` into `store` (used to build a scratch projection).
pub async fn replay(log: &dyn EventLog, store: &ReadModels, until: u64) -> Result<u64, StoreError> {
    let mut next = store.next_offset(EMBEDDED_SOURCE, 0).await?;
    while next < until {
        let limit = usize::try_from(until - next)
            .unwrap_or(REPLAY_BATCH)
            .min(REPLAY_BATCH);
        let batch = log.read(next, limit).await?;
        let Some(last) = batch.last() else { break };
        next = last.offset + 1;
        store.fold_batch(EMBEDDED_SOURCE, &batch).await?;
    }
    Ok(next)
}

impl ProjectorHandle {
    /// The next offset the projection will fold (everything below it is visible).
    pub fn applied(&self) -> u64 {
        *self.applied.borrow()
    }

    /// Waits until the event at `offset` is visible in the read models.
    pub async fn wait_for(&self, offset: u64, deadline: Duration) -> Result<(), StoreError> {
        let mut applied = self.applied.clone();
        let reached = tokio::time::timeout(deadline, applied.wait_for(|a| *a > offset))
            .await
            .is_ok_and(|r| r.is_ok());
        if reached {
            Ok(())
        } else {
            Err(StoreError::Lagging {
                offset,
                waited: deadline,
            })
        }
    }

    /// A receiver that changes whenever a key was created or revoked.
    pub fn key_changes(&self) -> watch::Receiver<u64> {
        self.key_changes.clone()
    }

    /// Whether the loop is still running.
    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }
}
