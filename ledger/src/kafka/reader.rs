//! The Kafka ledger's random-access side: where each partition ends (its high watermark) and
//! reads of any partition from any offset. Audits and replays scan a partition page by page
//! (`read(p, from, 1000)`, then from where that stopped, …), so each partition keeps one
//! assigned consumer between calls: a call that continues where the last one stopped takes
//! what the consumer has already prefetched, with no seek and no new fetch session, and only
//! a call that jumps elsewhere re-assigns it. Consumers are group-less in effect (they only
//! `assign`, never join or commit). High watermarks are asked of the ledger's metadata client,
//! not of the reading consumer: a request on the reader's connection would queue behind its
//! own long-polling fetch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use uuid::Uuid;

use super::{blocking, decode, kafka_offset, topic_partitions, KafkaConfig, KafkaLedger};
use super::{KafkaLedgerError, LogContext, REQUEST_TIMEOUT};
use crate::log::{LedgerError, LedgerReader, Recorded};
use crate::position::Frontier;

/// How long one `read` waits for records the high watermark says are there.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest single wait inside a read, between checks of where the consumer is.
const POLL_SLICE: Duration = Duration::from_millis(100);

/// The per-partition reading consumers, created on first use and kept.
pub(super) struct Readers {
    topic: String,
    /// Settings for a new reading consumer (all share one never-joined `group.id`).
    config: ClientConfig,
    producer: String,
    /// Answers watermark requests (it never fetches, so it answers at once).
    meta: Arc<BaseConsumer<LogContext>>,
    slots: Mutex<HashMap<i32, Arc<Mutex<Option<PartitionReader>>>>>,
}

impl Readers {
    pub(super) fn new(config: &KafkaConfig, meta: Arc<BaseConsumer<LogContext>>) -> Self {
        let mut client = config.client("reader");
        client
            // Required by librdkafka for assign(); the group is never joined.
            .set(
                "group.id",
                format!("claw-reader-{}", Uuid::now_v7().simple()),
            )
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // Says "nothing more right now" so a read at a gap does not wait out its timeout.
            .set("enable.partition.eof", "true")
            // Prefetch generously: a scan reads far ahead of the page it was asked for.
            .set("fetch.min.bytes", "1")
            .set("fetch.wait.max.ms", "500")
            .set("max.partition.fetch.bytes", "8388608")
            .set("fetch.max.bytes", "52428800")
            .set("queued.min.messages", "200000")
            .set("queued.max.messages.kbytes", "16384");
        Self {
            topic: config.topic.clone(),
            config: client,
            producer: config.producer.clone(),
            meta,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// `partition`'s reader slot (one read of a partition at a time).
    fn slot(&self, partition: i32) -> Arc<Mutex<Option<PartitionReader>>> {
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(partition)
            .or_default()
            .clone()
    }

    /// Reads up to `limit` events of `partition` from `from` (blocking).
    fn read(&self, partition: i32, from: u64, limit: usize) -> Result<Vec<Recorded>, LedgerError> {
        let slot = self.slot(partition);
        let mut slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
        let mut reader = match slot.take() {
            Some(reader) => reader,
            None => PartitionReader::new(self, partition)?,
        };
        // On an error the reader is dropped: the next read starts from a clean consumer.
        let records = reader.read(&self.meta, from, limit)?;
        *slot = Some(reader);
        Ok(records)
    }
}

impl Drop for Readers {
    /// Closing a consumer blocks (about 100 ms each): the readers are closed on a thread of
    /// their own, so dropping the ledger on the runtime does not stall it.
    fn drop(&mut self) {
        let slots = std::mem::take(self.slots.get_mut().unwrap_or_else(PoisonError::into_inner));
        if slots.is_empty() {
            return;
        }
        let closing = std::thread::Builder::new()
            .name("claw-kafka-readers-close".into())
            .spawn(move || drop(slots));
        if let Err(err) = closing {
            tracing::warn!(error = %err, "closing the ledger readers on this thread");
        }
    }
}

/// One partition's reading consumer and where it stands.
struct PartitionReader {
    topic: String,
    partition: i32,
    consumer: BaseConsumer<LogContext>,
    /// The offset the consumer delivers next, when it is assigned.
    next: Option<u64>,
    /// The highest high watermark seen: below it, records exist without asking the broker.
    known_end: u64,
}

impl PartitionReader {
    fn new(readers: &Readers, partition: i32) -> Result<Self, LedgerError> {
        let mut config = readers.config.clone();
        config.set(
            "client.id",
            format!("claw-{}-reader-{partition}", readers.producer),
        );
        Ok(Self {
            topic: readers.topic.clone(),
            partition,
            consumer: config.create_with_context(LogContext)?,
            next: None,
            known_end: 0,
        })
    }

    fn read(
        &mut self,
        meta: &BaseConsumer<LogContext>,
        from: u64,
        limit: usize,
    ) -> Result<Vec<Recorded>, LedgerError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let wanted = u64::try_from(limit).unwrap_or(u64::MAX);
        if from.saturating_add(wanted) > self.known_end {
            let (_, high) =
                match meta.fetch_watermarks(&self.topic, self.partition, REQUEST_TIMEOUT) {
                    Ok(watermarks) => watermarks,
                    // A partition that does not exist has nothing to read.
                    Err(KafkaError::MetadataFetch(
                        rdkafka::types::RDKafkaErrorCode::UnknownPartition,
                    )) => return Ok(Vec::new()),
                    Err(err) => return Err(err.into()),
                };
            self.known_end = self.known_end.max(u64::try_from(high).unwrap_or(0));
        }
        // The end as it was when the read began: a read never waits for the log to grow.
        let end = self.known_end;
        if from >= end {
            return Ok(Vec::new());
        }
        if self.next != Some(from) {
            self.assign(from)?;
        }

        let capacity = usize::try_from(end - from).unwrap_or(usize::MAX).min(limit);
        let mut records = Vec::with_capacity(capacity);
        let deadline = Instant::now() + READ_TIMEOUT;
        let mut last_error = None;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break;
            }
            match self.consumer.poll(remaining.min(POLL_SLICE)) {
                Some(Ok(message)) => {
                    if message.partition() != self.partition {
                        continue;
                    }
                    let record = decode(message.partition(), message.offset(), message.payload())?;
                    if record.offset < from {
                        continue;
                    }
                    let next = record.offset + 1;
                    self.next = Some(next);
                    records.push(record);
                    if records.len() >= limit || next >= end {
                        break;
                    }
                }
                // Caught up with what the broker has (or nothing came in a slice): done if
                // the consumer is past `end` (records at the end may be transaction markers,
                // which are never delivered).
                Some(Err(KafkaError::PartitionEOF(_))) | None => {
                    if self.position()? >= end {
                        break;
                    }
                }
                Some(Err(err)) => {
                    tracing::debug!(
                        topic = %self.topic,
                        partition = self.partition,
                        error = %err,
                        "kafka read: transient error"
                    );
                    last_error = Some(err);
                }
            }
        }
        if records.is_empty() && self.position()? < end {
            if let Some(err) = last_error {
                return Err(err.into());
            }
            return Err(KafkaLedgerError::ReadTimeout {
                topic: self.topic.clone(),
                partition: self.partition,
                from,
                end,
                timeout: READ_TIMEOUT,
            }
            .into());
        }
        Ok(records)
    }

    /// Points the consumer at `from`, dropping whatever it had prefetched.
    fn assign(&mut self, from: u64) -> Result<(), LedgerError> {
        let mut tpl = TopicPartitionList::with_capacity(1);
        tpl.add_partition_offset(
            &self.topic,
            self.partition,
            Offset::Offset(kafka_offset(from)?),
        )?;
        self.next = None;
        self.consumer.assign(&tpl)?;
        self.next = Some(from);
        Ok(())
    }

    /// The offset the consumer has delivered up to (0 when it has delivered nothing).
    fn position(&self) -> Result<u64, LedgerError> {
        let positions = self.consumer.position()?;
        Ok(positions
            .find_partition(&self.topic, self.partition)
            .and_then(|elem| match elem.offset() {
                Offset::Offset(n) => u64::try_from(n).ok(),
                _ => None,
            })
            .unwrap_or(0))
    }
}

#[async_trait]
impl LedgerReader for KafkaLedger {
    async fn ends(&self) -> Result<Frontier, LedgerError> {
        let meta = self.meta.clone();
        let topic = self.config.topic.clone();
        blocking(move || {
            topic_partitions(&meta, &topic, REQUEST_TIMEOUT)?
                .into_iter()
                .map(|partition| {
                    let (_, high) = meta.fetch_watermarks(&topic, partition, REQUEST_TIMEOUT)?;
                    Ok((partition, u64::try_from(high).unwrap_or(0)))
                })
                .collect()
        })
        .await?
    }

    async fn read(
        &self,
        partition: i32,
        from: u64,
        limit: usize,
    ) -> Result<Vec<Recorded>, LedgerError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let readers = self.readers.clone();
        blocking(move || readers.read(partition, from, limit)).await?
    }
}
