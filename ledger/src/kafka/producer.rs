//! The Kafka ledger's producer side: each envelope becomes one record (key `key_id`, value the
//! envelope's JSON, CloudEvents 1.0 binary-mode headers), sent through one idempotent producer
//! (`acks=all`), so a retried send never duplicates or reorders within a partition. An append
//! returns once every record's delivery report is in; the caller (the fsync'ed outbox) retries
//! a failed append whole, and the consumers drop the duplicates that may cause by `event_id`.

use std::time::Duration;

use async_trait::async_trait;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::watch;

use super::PING_TIMEOUT;
use super::{blocking, topic_partitions, KafkaConfig, KafkaLedger, KafkaLedgerError, LogContext};
use crate::event::{format_time, Envelope};
use crate::log::{Appender, LedgerError};
use crate::position::{Frontier, Position};

/// How long a record may take to be delivered, retries included, before its append fails.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long to wait before enqueueing again when librdkafka's local queue is full.
const QUEUE_FULL_BACKOFF: Duration = Duration::from_millis(5);

/// The ledger's idempotent producer.
pub(super) fn create(config: &KafkaConfig) -> Result<FutureProducer<LogContext>, LedgerError> {
    let producer = config
        .client("producer")
        // No duplicates or reordering from the producer's own retries; all in-sync replicas
        // have every record before it counts as appended.
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        .set(
            "message.timeout.ms",
            MESSAGE_TIMEOUT.as_millis().to_string(),
        )
        .set("request.timeout.ms", "10000")
        // The Java producer's partitioner, so any producer of the same key_id agrees on the
        // partition (librdkafka's own default hashes differently).
        .set("partitioner", "murmur2_random")
        // JSON shrinks well; lz4 costs little CPU.
        .set("compression.type", "lz4")
        .create_with_context(LogContext)?;
    Ok(producer)
}

impl KafkaLedger {
    /// The record headers for `event`: its type and schema version, and the CloudEvents 1.0
    /// attributes in Kafka binary mode.
    fn headers(&self, event: &Envelope) -> OwnedHeaders {
        let event_type = event.event_type();
        let schema_version = event.schema_version.to_string();
        let ce_type = format!("org.nself.claw.{event_type}.v{schema_version}");
        let ce_id = event.event_id.to_string();
        let ce_time = format_time(event.occurred_at);
        [
            ("event_type", event_type),
            ("schema_version", schema_version.as_str()),
            ("ce_specversion", "1.0"),
            ("ce_id", ce_id.as_str()),
            ("ce_source", self.ce_source.as_str()),
            ("ce_type", ce_type.as_str()),
            ("ce_time", ce_time.as_str()),
            ("ce_subject", event.key_id.as_str()),
            ("content-type", "application/json"),
        ]
        .into_iter()
        .fold(
            OwnedHeaders::new_with_capacity(9),
            |headers, (key, value)| {
                headers.insert(Header {
                    key,
                    value: Some(value),
                })
            },
        )
    }

    /// Hands one record to librdkafka, waiting while its local queue is full.
    async fn enqueue(&self, event: &Envelope) -> Result<DeliveryFuture, LedgerError> {
        let payload = serde_json::to_vec(event).map_err(LedgerError::Encode)?;
        let mut record = FutureRecord::to(&self.config.topic)
            .key(event.key_id.as_str())
            .payload(&payload)
            .headers(self.headers(event));
        loop {
            match self.producer.send_result(record) {
                Ok(delivery) => return Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(QUEUE_FULL_BACKOFF).await;
                }
                Err((err, _)) => return Err(err.into()),
            }
        }
    }
}

#[async_trait]
impl Appender for KafkaLedger {
    async fn append(&self, events: Vec<Envelope>) -> Result<Vec<Position>, LedgerError> {
        // Enqueue all first (in order: one producer, so per-partition order is the call's
        // order), then wait for every report: one round trip per batch, not per record.
        let mut deliveries = Vec::with_capacity(events.len());
        for event in &events {
            deliveries.push(self.enqueue(event).await?);
        }
        let mut positions = Vec::with_capacity(deliveries.len());
        let mut failure = None;
        for report in futures::future::join_all(deliveries).await {
            match report {
                Ok(Ok(delivery)) => {
                    let offset = u64::try_from(delivery.offset).map_err(|_| {
                        KafkaLedgerError::BadOffset {
                            offset: delivery.offset,
                        }
                    })?;
                    positions.push(Position::new(delivery.partition, offset));
                }
                Ok(Err((err, _))) => {
                    failure.get_or_insert(LedgerError::from(err));
                }
                Err(_canceled) => {
                    failure.get_or_insert(
                        KafkaLedgerError::DeliveryCanceled {
                            topic: self.config.topic.clone(),
                        }
                        .into(),
                    );
                }
            }
        }
        // What did reach the log still moves the frontier: it is there, whatever the caller
        // does next.
        self.appended.send_if_modified(|frontier| {
            positions
                .iter()
                .fold(false, |moved, p| frontier.pass(*p) | moved)
        });
        match failure {
            Some(err) => Err(err),
            None => Ok(positions),
        }
    }

    fn appended(&self) -> watch::Receiver<Frontier> {
        self.appended.subscribe()
    }

    async fn ping(&self) -> Result<(), LedgerError> {
        let meta = self.meta.clone();
        let topic = self.config.topic.clone();
        blocking(move || topic_partitions(&meta, &topic, PING_TIMEOUT)).await??;
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "kafka"
    }
}
