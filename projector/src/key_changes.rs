//! Which keys changed in the projection, as a key cache needs to hear it: the ids of the keys
//! that folds created or revoked, gathered until the cache takes them, or "all of them" when
//! notices may have been missed (a reconnect, the periodic safety refresh) or too many piled
//! up to be worth reading one by one.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;

/// More changed keys than this pending at once are read as one full reload.
pub const MAX_PENDING: usize = 256;

/// What a key cache should re-read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyChange {
    /// These keys (by id).
    Keys(BTreeSet<String>),
    /// Every key.
    All,
}

impl Default for KeyChange {
    fn default() -> Self {
        Self::Keys(BTreeSet::new())
    }
}

impl KeyChange {
    fn is_empty(&self) -> bool {
        matches!(self, Self::Keys(ids) if ids.is_empty())
    }

    fn add(&mut self, other: Self) {
        match (&mut *self, other) {
            (Self::All, _) => {}
            (_, Self::All) => *self = Self::All,
            (Self::Keys(ids), Self::Keys(more)) => {
                ids.extend(more);
                if ids.len() > MAX_PENDING {
                    *self = Self::All;
                }
            }
        }
    }
}

/// The publishing side, held by whatever learns of folds (the in-process projector, or the
/// follower of another process's notices).
#[derive(Debug)]
pub struct KeyChangesTx {
    pending: Arc<Mutex<KeyChange>>,
    bell: watch::Sender<()>,
}

/// The receiving side: one consumer takes what has gathered since it last looked.
#[derive(Debug, Clone)]
pub struct KeyChanges {
    pending: Arc<Mutex<KeyChange>>,
    bell: watch::Receiver<()>,
}

/// A connected pair.
pub fn key_changes() -> (KeyChangesTx, KeyChanges) {
    let pending = Arc::new(Mutex::new(KeyChange::default()));
    let (tx, rx) = watch::channel(());
    (
        KeyChangesTx {
            pending: pending.clone(),
            bell: tx,
        },
        KeyChanges { pending, bell: rx },
    )
}

impl KeyChangesTx {
    /// Announces a change (nothing when it names no key).
    pub fn send(&self, change: KeyChange) {
        if change.is_empty() {
            return;
        }
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .add(change);
        self.bell.send_replace(());
    }

    /// Announces that every key must be re-read.
    pub fn all(&self) {
        self.send(KeyChange::All);
    }
}

impl KeyChanges {
    /// Waits for changes and takes everything gathered so far; `None` once the publisher is
    /// gone.
    pub async fn next(&mut self) -> Option<KeyChange> {
        loop {
            self.bell.changed().await.ok()?;
            let taken =
                std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner));
            if !taken.is_empty() {
                return Some(taken);
            }
        }
    }

    /// Whether changes are waiting to be taken.
    pub fn has_pending(&self) -> bool {
        !self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(ids: &[&str]) -> KeyChange {
        KeyChange::Keys(ids.iter().map(|s| (*s).to_owned()).collect())
    }

    #[tokio::test]
    async fn changes_gather_until_taken_and_all_absorbs_the_rest() {
        let (tx, mut rx) = key_changes();
        tx.send(keys(&["a"]));
        tx.send(keys(&["b", "a"]));
        tx.send(keys(&[]));
        assert_eq!(rx.next().await, Some(keys(&["a", "b"])));
        assert!(!rx.has_pending());
        tx.send(keys(&["c"]));
        tx.all();
        tx.send(keys(&["d"]));
        assert_eq!(rx.next().await, Some(KeyChange::All));
        drop(tx);
        assert_eq!(rx.next().await, None, "the publisher is gone");
    }

    #[test]
    fn too_many_pending_keys_become_one_full_reload() {
        let mut change = KeyChange::default();
        for i in 0..=MAX_PENDING {
            change.add(keys(&[&i.to_string()]));
        }
        assert_eq!(change, KeyChange::All);
    }
}
