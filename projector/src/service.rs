//! `nself claw projector`: the projector as its own service (distributed mode). A member of
//! the topic's consumer group, it folds the partitions Kafka assigns it into the PostgreSQL
//! read models, resuming each partition where the projection (not Kafka) says it stopped. Any
//! number of instances may run: the group splits the partitions between them, and a
//! partition that moves mid-batch is at worst folded twice, which the fold ignores.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use claw_ledger::kafka::{KafkaConfig, KafkaLedger};
use claw_ledger::{Frontier, LedgerReader as _};

use crate::runner::{Projector, StoredStart};
use crate::store::{ReadModels, StoreError};

/// Events folded per PostgreSQL transaction at most: a fold is a handful of multi-row
/// statements whatever its size, so bigger batches mean fewer round trips per event.
pub const SERVICE_BATCH: usize = 1024;

/// Longest pause before joining the group again after a membership ended.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// The consumer group of a topic's projectors unless `CLAW_KAFKA_GROUP` says otherwise: one
/// per topic, so stacks sharing a broker never share a group.
pub fn default_group(topic: &str) -> String {
    format!("{topic}.projector")
}

/// What the projector service needs.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// The ledger topic, its brokers and partitions (created when missing).
    pub kafka: KafkaConfig,
    /// The consumer group the instances share.
    pub group: String,
    /// `postgres://…` of the read models.
    pub database_url: String,
}

/// Runs the projector until `shutdown` completes. A group membership that ends (its feed
/// closed, e.g. the read models stayed unreachable through a rebalance) is started afresh.
pub async fn run(
    config: ServiceConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StoreError> {
    let store = ReadModels::open_postgres(&config.database_url).await?;
    let source = config.kafka.topic.clone();
    let ledger = KafkaLedger::open(config.kafka).await?;
    let mut shutdown = std::pin::pin!(shutdown);
    let mut backoff = Duration::from_millis(500);
    loop {
        let start = Arc::new(StoredStart {
            store: store.clone(),
            source: source.clone(),
        });
        let feed = ledger.group_feed(&config.group, start)?;
        let handle = Projector::new(Box::new(feed), store.clone(), &source, SERVICE_BATCH)
            .spawn()
            .await?;
        tracing::info!(topic = %source, group = %config.group, "projector folding the Kafka ledger into PostgreSQL");
        let mut stall = Stall::default();
        let mut check = tokio::time::interval(STALL_CHECK);
        loop {
            tokio::select! {
                () = &mut shutdown => {
                    tracing::info!(applied = ?handle.applied(), "projector stopping");
                    return Ok(());
                }
                () = handle.stopped() => {
                    tracing::warn!(retry_in = ?backoff, "the projector's group membership ended; joining again");
                    break;
                }
                _ = check.tick() => {
                    if let Some(behind) = stall.check(&ledger, &store, &source).await {
                        tracing::error!(behind, stalled_for = ?STALL_LIMIT, "the projection has not moved while the ledger is ahead; rejoining the group with a new consumer");
                        break;
                    }
                }
            }
        }
        // Stopping the old projector drops its feed, which closes the old consumer.
        handle.abort();
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// How often the service checks that the projection moves.
const STALL_CHECK: Duration = Duration::from_secs(10);
/// How long the projection may stand still while the ledger is ahead of it before the
/// consumer is replaced. A consumer can wedge after the broker was fenced and restarted
/// (librdkafka stops looking for the group's coordinator); a new one recovers.
const STALL_LIMIT: Duration = Duration::from_secs(30);

/// Watches the whole projection (every instance's partitions) against the ledger's ends.
#[derive(Default)]
struct Stall {
    last: Option<Frontier>,
    since: Option<Instant>,
}

impl Stall {
    /// `Some(events behind)` once the projection stood still for [`STALL_LIMIT`] while
    /// behind the ledger.
    async fn check(
        &mut self,
        ledger: &KafkaLedger,
        store: &ReadModels,
        source: &str,
    ) -> Option<u64> {
        let (Ok(ends), Ok(stored)) = (ledger.ends().await, store.next_offsets(source).await) else {
            // Cannot tell (a backend is away): not a stall of ours.
            self.since = None;
            return None;
        };
        let behind = stored.behind(&ends);
        let still = self.last.as_ref() == Some(&stored);
        self.last = Some(stored);
        if behind == 0 || !still {
            self.since = None;
            return None;
        }
        let since = *self.since.get_or_insert_with(Instant::now);
        if since.elapsed() >= STALL_LIMIT {
            self.since = None;
            Some(behind)
        } else {
            None
        }
    }
}
