//! Gateway keys on the request path: secret generation and hashing, and the in-memory key
//! cache that authentication reads. The cache is loaded from the projection and kept fresh by
//! its change reports (the keys a fold created or revoked are re-read one by one; everything
//! after a missed report), so a request never waits on a database; a miss reads through once
//! and is remembered briefly (negative cache), so a flood of bad keys cannot hammer the store.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use claw_projector::{KeyChange, KeyChanges, KeyRecord, ReadModels, StoreError};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota};
use rand::distr::{Alphanumeric, SampleString};
use sha2::{Digest, Sha256};

/// Every gateway secret starts with this.
pub const SECRET_PREFIX: &str = "sk-nself-";
/// Random base62 characters after the prefix.
const SECRET_RANDOM_CHARS: usize = 40;
/// How long an unknown hash is remembered as unknown.
const NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// Most unknown hashes remembered at once.
const NEGATIVE_CAPACITY: usize = 10_000;

/// A new secret: `sk-nself-` + 40 random base62 characters.
pub fn generate_secret() -> String {
    format!(
        "{SECRET_PREFIX}{}",
        Alphanumeric.sample_string(&mut rand::rng(), SECRET_RANDOM_CHARS)
    )
}

/// `sha256:` + lowercase hex SHA-256 of the whole secret: the only form ever stored.
pub fn hash_secret(secret: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(secret.as_bytes())))
}

/// An active key as the request path sees it, with its rate limiter.
pub struct CachedKey {
    pub record: KeyRecord,
    /// This gateway's share of the key's `rpm_limit` as a token bucket (burst = share),
    /// kept across reloads.
    limiter: Arc<DefaultDirectRateLimiter>,
    /// How many gateways share the key's rpm (this one enforces `ceil(rpm / replicas)`).
    replicas: u32,
}

impl CachedKey {
    /// The entry for `record`: `old`'s rate-limit state when the limit is the same, a fresh
    /// bucket otherwise.
    fn renewed(old: Option<Arc<Self>>, record: KeyRecord, replicas: u32) -> Arc<Self> {
        match old {
            Some(old)
                if old.record.rpm_limit == record.rpm_limit
                    && old.record.id == record.id
                    && old.replicas == replicas =>
            {
                Arc::new(Self {
                    record,
                    limiter: old.limiter.clone(),
                    replicas,
                })
            }
            _ => Arc::new(Self::new(record, replicas)),
        }
    }

    fn new(record: KeyRecord, replicas: u32) -> Self {
        let share = record.rpm_limit.div_ceil(replicas.max(1));
        let rpm = NonZeroU32::new(share).unwrap_or(NonZeroU32::MIN);
        Self {
            limiter: Arc::new(DefaultDirectRateLimiter::direct(Quota::per_minute(rpm))),
            record,
            replicas,
        }
    }

    /// Takes one request from the key's budget, or says how many whole seconds until one frees.
    pub fn check_rate(&self) -> Result<(), u64> {
        self.limiter.check().map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
        })
    }
}

/// Why a key was refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyRefusal {
    #[error("unknown or revoked key")]
    Unknown,
    #[error("key store unavailable: {0}")]
    Store(#[from] StoreError),
}

/// The in-memory view of active keys, by secret hash.
pub struct KeyCache {
    store: ReadModels,
    /// Gateways serving the same keys (1 embedded); each enforces its share of every rpm.
    replicas: AtomicU32,
    /// Bumped before every refresh reads the store: a read-through that saw it move may hold
    /// an answer older than the refresh's, and does not remember it.
    refreshes: AtomicU64,
    active: RwLock<HashMap<String, Arc<CachedKey>>>,
    unknown: RwLock<HashMap<String, Instant>>,
}

impl KeyCache {
    /// Loads every active key from the projection.
    pub async fn load(store: ReadModels) -> Result<Arc<Self>, StoreError> {
        let cache = Arc::new(Self {
            store,
            replicas: AtomicU32::new(1),
            refreshes: AtomicU64::new(0),
            active: RwLock::default(),
            unknown: RwLock::default(),
        });
        cache.reload().await?;
        Ok(cache)
    }

    /// Re-reads every key; a key whose rpm is unchanged keeps its rate-limit state.
    pub async fn reload(&self) -> Result<(), StoreError> {
        self.refreshes.fetch_add(1, Ordering::AcqRel);
        let keys = self.store.list_keys().await?;
        let replicas = self.replicas.load(Ordering::Acquire);
        let mut active = self.active_mut();
        let mut next = HashMap::with_capacity(keys.len());
        for record in keys.into_iter().filter(|k| k.is_active) {
            let old = active.remove(&record.key_hash);
            next.insert(
                record.key_hash.clone(),
                CachedKey::renewed(old, record, replicas),
            );
        }
        *active = next;
        drop(active);
        self.unknown_mut().clear();
        metrics::counter!("claw_key_cache_reloads_total", "scope" => "all").increment(1);
        Ok(())
    }

    /// Re-reads the keys `change` names (all of them for [`KeyChange::All`]): a created key
    /// is added (and forgotten as unknown), a revoked one removed, the others left alone.
    pub async fn refresh(&self, change: KeyChange) -> Result<(), StoreError> {
        let ids = match change {
            KeyChange::All => return self.reload().await,
            KeyChange::Keys(ids) => ids,
        };
        self.refreshes.fetch_add(1, Ordering::AcqRel);
        let mut records = Vec::with_capacity(ids.len());
        for id in &ids {
            records.extend(self.store.key_by_id(id).await?);
        }
        let replicas = self.replicas.load(Ordering::Acquire);
        let mut active = self.active_mut();
        for record in &records {
            let old = active.remove(&record.key_hash);
            if record.is_active {
                active.insert(
                    record.key_hash.clone(),
                    CachedKey::renewed(old, record.clone(), replicas),
                );
            }
        }
        drop(active);
        let mut unknown = self.unknown_mut();
        for record in &records {
            unknown.remove(&record.key_hash);
        }
        metrics::counter!("claw_key_cache_reloads_total", "scope" => "keys").increment(1);
        Ok(())
    }

    fn active_mut(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<CachedKey>>> {
        self.active
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn unknown_mut(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Instant>> {
        self.unknown
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Finds the active key for `secret`.
    pub async fn authenticate(&self, secret: &str) -> Result<Arc<CachedKey>, KeyRefusal> {
        let hash = hash_secret(secret);
        if let Some(hit) = self
            .active
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&hash)
        {
            return Ok(hit.clone());
        }
        let now = Instant::now();
        let known_unknown = self
            .unknown
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&hash)
            .is_some_and(|at| now.duration_since(*at) < NEGATIVE_TTL);
        if known_unknown || !secret.starts_with(SECRET_PREFIX) {
            return Err(KeyRefusal::Unknown);
        }
        // A miss reads through once: another gateway may have created the key a moment ago.
        let before = self.refreshes.load(Ordering::Acquire);
        let found = self.store.key_by_hash(&hash).await?;
        let current = || self.refreshes.load(Ordering::Acquire) == before;
        match found {
            Some(record) if record.is_active => {
                let mut active = self.active_mut();
                if !current() {
                    return Ok(Arc::new(CachedKey::new(record, 1)));
                }
                Ok(active
                    .entry(hash)
                    .or_insert_with(|| {
                        Arc::new(CachedKey::new(
                            record,
                            self.replicas.load(Ordering::Acquire),
                        ))
                    })
                    .clone())
            }
            _ => {
                let mut unknown = self.unknown_mut();
                if !current() {
                    return Err(KeyRefusal::Unknown);
                }
                if unknown.len() >= NEGATIVE_CAPACITY {
                    unknown.retain(|_, at| now.duration_since(*at) < NEGATIVE_TTL);
                    if unknown.len() >= NEGATIVE_CAPACITY {
                        unknown.clear();
                    }
                }
                unknown.insert(hash, now);
                Err(KeyRefusal::Unknown)
            }
        }
    }

    /// How many active keys the cache holds.
    pub fn active_count(&self) -> usize {
        self.active
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// Sets how many gateways share the keys' rate limits; when it changes, every key's bucket
    /// starts over at its new share (a moment's leeway, not a lockout).
    pub fn set_replicas(&self, replicas: u32) {
        let replicas = replicas.max(1);
        if self.replicas.swap(replicas, Ordering::AcqRel) == replicas {
            return;
        }
        let mut active = self.active_mut();
        for key in active.values_mut() {
            *key = Arc::new(CachedKey::new(key.record.clone(), replicas));
        }
    }

    /// Re-reads the keys the projection reports changed, until the reports stop. When that
    /// fails (the store is down), the next change re-reads everything.
    pub fn follow(self: &Arc<Self>, mut changes: KeyChanges) {
        let cache = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut failed = false;
            while let Some(change) = changes.next().await {
                let Some(cache) = cache.upgrade() else { return };
                let change = if failed { KeyChange::All } else { change };
                failed = cache.refresh(change).await.is_err_and(|err| {
                    tracing::warn!(error = %err, "key cache refresh failed; serving the previous keys until the next change");
                    true
                });
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_have_the_contract_shape_and_hash() {
        let s = generate_secret();
        assert!(s.starts_with("sk-nself-"));
        let random = &s[SECRET_PREFIX.len()..];
        assert!(random.len() >= 32 && random.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(generate_secret(), s);
        assert_eq!(
            hash_secret("abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn the_bucket_allows_a_burst_of_rpm_then_says_when_to_retry() {
        let key = CachedKey::new(
            KeyRecord {
                id: "k".into(),
                name: "n".into(),
                key_prefix: "sk-nself-abc".into(),
                key_hash: String::new(),
                is_active: true,
                admin_allowed: false,
                rpm_limit: 3,
                created_at: String::new(),
                last_used_at: None,
                revoked_at: None,
            },
            1,
        );
        for _ in 0..3 {
            assert!(key.check_rate().is_ok());
        }
        let wait = key.check_rate().unwrap_err();
        assert!(
            (1..=20).contains(&wait),
            "one token per 20 s at 3 rpm, got {wait}"
        );
    }
}
