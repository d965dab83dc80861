//! `nself claw projector`: the projector as its own service (distributed mode). A member of
//! the topic's consumer group, it folds the partitions Kafka assigns it into the PostgreSQL
//! read models, resuming each partition where the projection (not Kafka) says it stopped. Any
//! number of instances may run: the group splits the partitions between them, and a
//! partition that moves mid-batch is at worst folded twice, which the fold ignores.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use claw_ledger::kafka::{KafkaConfig, KafkaLedger};

use crate::runner::{Projector, StoredStart};
use crate::store::{ReadModels, StoreError};

/// Events folded per PostgreSQL transaction at most: a fold is a handful of multi-row
/// statements whatever its size, so bigger batches mean fewer round trips per event.
pub const SERVICE_BATCH: usize = 1024;

/// Longest pause before joining the group again after a membership ended.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

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
        tokio::select! {
            () = &mut shutdown => {
                tracing::info!(applied = ?handle.applied(), "projector stopping");
                return Ok(());
            }
            () = handle.stopped() => {
                tracing::warn!(retry_in = ?backoff, "the projector's group membership ended; joining again");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}
