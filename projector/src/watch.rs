//! Following a projection that another process folds (distributed mode: `nself claw projector`
//! writes PostgreSQL, every gateway reads it). Each fold announces itself inside its own
//! transaction (`NOTIFY`, see [`crate::fold::on_sqlx`]); this listens, and turns the notices
//! into the same [`ProjectorHandle`] an in-process projector gives: how far the projection is,
//! and a counter bumped when keys changed.
//!
//! A keys notice names the keys that changed, and the key cache re-reads just those. Notices
//! are lost while the connection is down, so every (re)connect re-reads the stored frontier and
//! asks for a full key reload; periodic re-reads are the safety net for anything else missed.

use std::time::Duration;

use claw_ledger::Frontier;
use sqlx::postgres::PgListener;
use tokio::sync::watch;

use crate::fold::on_postgres::{KeysNotice, Progress, KEYS_CHANNEL, PROGRESS_CHANNEL};
use crate::key_changes::{key_changes, KeyChange, KeyChangesTx};
use crate::runner::ProjectorHandle;
use crate::store::{ReadModels, StoreError};

/// How often the stored frontier is re-read even without a notice.
const REREAD: Duration = Duration::from_secs(1);
/// How often the key cache is told to reload even without a notice.
const KEYS_REFRESH: Duration = Duration::from_secs(30);
/// Longest pause between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Follows the projection of `source` in the PostgreSQL read models at `url`.
pub async fn follow_postgres(
    store: ReadModels,
    url: &str,
    source: &str,
) -> Result<ProjectorHandle, StoreError> {
    let from = store.next_offsets(source).await?;
    let (applied_tx, applied) = watch::channel(from);
    let (keys_tx, key_changes) = key_changes();
    let follower = Follower {
        store,
        url: url.to_owned(),
        source: source.to_owned(),
        applied: applied_tx,
        keys: keys_tx,
    };
    let task = tokio::spawn(follower.run());
    Ok(ProjectorHandle::new(applied, key_changes, task))
}

struct Follower {
    store: ReadModels,
    url: String,
    source: String,
    applied: watch::Sender<Frontier>,
    keys: KeyChangesTx,
}

impl Follower {
    async fn run(self) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.listen().await {
                Ok(()) => return,
                Err(err) => {
                    tracing::warn!(error = %err, retry_in = ?backoff, "lost the read models' change notices; reconnecting");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Re-reads the stored frontier and moves `applied` forward to it.
    async fn reread(&self) -> Result<(), StoreError> {
        let stored = self.store.next_offsets(&self.source).await?;
        self.applied.send_if_modified(|a| a.merge(&stored));
        Ok(())
    }

    /// One connection's life: listen, catch up, then follow notices until it drops. Returns
    /// `Ok` only when nobody holds the handle any more.
    async fn listen(&self) -> Result<(), StoreError> {
        let mut listener = PgListener::connect(&self.url).await?;
        listener
            .listen_all([PROGRESS_CHANNEL, KEYS_CHANNEL])
            .await?;
        // Listening first, then reading: nothing committed in between is missed.
        self.reread().await?;
        self.keys.all();
        let mut reread = tokio::time::interval(REREAD);
        let mut refresh = tokio::time::interval(KEYS_REFRESH);
        refresh.tick().await;
        loop {
            if self.applied.is_closed() {
                return Ok(());
            }
            tokio::select! {
                notice = listener.try_recv() => match notice? {
                    Some(n) if n.channel() == PROGRESS_CHANNEL => {
                        if let Ok(p) = serde_json::from_str::<Progress>(n.payload()) {
                            if p.source == self.source {
                                self.applied.send_if_modified(|a| a.merge(&p.frontier));
                            }
                        }
                    }
                    Some(n) => match serde_json::from_str::<KeysNotice>(n.payload()) {
                        Ok(k) if k.source != self.source => {}
                        Ok(k) => self.keys.send(k.keys.map_or(KeyChange::All, KeyChange::Keys)),
                        Err(err) => {
                            tracing::warn!(error = %err, payload = n.payload(), "unreadable keys notice; reloading every key");
                            self.keys.all();
                        }
                    },
                    // The connection dropped; the next try_recv reconnects. Catch up then.
                    None => {
                        tracing::warn!("read-model notices connection dropped; catching up after reconnect");
                        self.reread().await?;
                        self.keys.all();
                    }
                },
                _ = reread.tick() => self.reread().await?,
                _ = refresh.tick() => self.keys.all(),
            }
        }
    }
}
