//! Cluster-wide rate limits (distributed mode). Every gateway announces itself in the read
//! models every [`HEARTBEAT`] and counts the gateways seen within [`STALE_AFTER`]; with N
//! alive, each enforces `ceil(rpm / N)` of every key's rate limit in memory, so N replicas
//! together allow about `rpm`, not `N × rpm`, with no database round trip per request.
//!
//! The bound is approximate, by design: traffic spread evenly over the replicas gets the
//! key's full rpm (plus up to N−1 for rounding); traffic that reaches only one replica gets
//! only that replica's share; for up to [`STALE_AFTER`] after a replica joins or dies, the
//! others still divide by the old N; and a change of N restarts every bucket (one burst of
//! leeway).

use std::sync::Arc;
use std::time::Duration;

use claw_projector::ReadModels;

use crate::keys::KeyCache;

/// How often a gateway announces itself.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// A gateway not heard from for this long is counted out.
pub const STALE_AFTER: Duration = Duration::from_secs(6);

/// Announces `instance` and keeps `keys`' shares current, until the cache is dropped.
pub fn join(store: ReadModels, instance: String, keys: &Arc<KeyCache>) {
    let keys = Arc::downgrade(keys);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(HEARTBEAT);
        loop {
            tick.tick().await;
            let Some(keys) = keys.upgrade() else {
                let _ = store.leave(&instance).await;
                return;
            };
            let now = chrono::Utc::now();
            let stale = now - chrono::Duration::from_std(STALE_AFTER).unwrap_or_default();
            match store.heartbeat(&instance, now, stale).await {
                Ok(alive) => keys.set_replicas(alive),
                // Keep the last known share: a database hiccup must not multiply the limits.
                Err(err) => {
                    tracing::warn!(error = %err, "gateway heartbeat failed; keeping the current rate-limit share");
                }
            }
        }
    });
}
