//! The Kafka ledger: one topic whose partitions are the ledger's partitions, keyed by
//! `key_id` so that one key's events stay in one partition, in order. This module owns the
//! configuration ([`KafkaConfig`]), opening the ledger ([`KafkaLedger::open`]: the topic is
//! created when missing, with infinite retention, since the ledger is forever), the client
//! settings and logging every client shares, and the Kafka-specific errors. The producer side
//! lives in [`producer`], random-access reads in [`reader`], and the consumer-group feed that
//! the distributed projector follows in [`group`].
//!
//! librdkafka's calls block, so every one of them runs on a blocking thread
//! ([`tokio::task::spawn_blocking`]) or on a thread of its own, never on the async runtime.

mod group;
mod producer;
mod reader;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::metadata::Metadata;
use rdkafka::producer::FutureProducer;
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::watch;

use crate::event::Envelope;
use crate::log::{LedgerError, Recorded, StartPositions};
use crate::position::{Frontier, Position};

pub use group::GroupFeed;

use reader::Readers;

/// Partitions of a topic this crate creates, unless configured otherwise.
pub const DEFAULT_PARTITIONS: i32 = 6;

/// Replication factor of a topic this crate creates, unless configured otherwise.
pub const DEFAULT_REPLICATION: i16 = 1;

/// How long [`KafkaLedger::open`] waits for the brokers (metadata, topic creation) before it
/// gives up with an error.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one metadata or watermark request may take once open.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`Appender::ping`](crate::log::Appender::ping) waits for an answer.
const PING_TIMEOUT: Duration = Duration::from_secs(3);

/// Where the Kafka ledger lives and who writes to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaConfig {
    /// `bootstrap.servers`: `host:port[,host:port…]`.
    pub brokers: String,
    /// The ledger's topic.
    pub topic: String,
    /// Partitions of the topic when this process creates it (an existing topic keeps its own).
    pub partitions: i32,
    /// Replication factor of the topic when this process creates it.
    pub replication: i16,
    /// This instance's name: the envelopes' `producer`, the `ce_source` and the client ids.
    pub producer: String,
}

impl KafkaConfig {
    /// A configuration with the default partitions and replication.
    pub fn new(
        brokers: impl Into<String>,
        topic: impl Into<String>,
        producer: impl Into<String>,
    ) -> Self {
        Self {
            brokers: brokers.into(),
            topic: topic.into(),
            partitions: DEFAULT_PARTITIONS,
            replication: DEFAULT_REPLICATION,
            producer: producer.into(),
        }
    }

    /// Settings every client of this ledger shares; `role` names the client to the brokers.
    fn client(&self, role: &str) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("client.id", format!("claw-{}-{role}", self.producer))
            // Never let a metadata request create the topic with the broker's defaults
            // (7-day retention): the ledger's topic is created here, on purpose, or not at all.
            .set("allow.auto.create.topics", "false")
            .set_log_level(RDKafkaLogLevel::Info);
        config
    }
}

/// The Kafka-backed `EventLog`. Cheap to share behind an `Arc`; every method takes `&self`.
pub struct KafkaLedger {
    config: KafkaConfig,
    /// `urn:nself:claw:<producer>`.
    ce_source: String,
    /// The idempotent producer every append goes through.
    producer: FutureProducer<LogContext>,
    /// A group-less consumer for metadata and watermarks.
    meta: Arc<BaseConsumer<LogContext>>,
    /// One cached consumer per partition for [`LedgerReader::read`](crate::log::LedgerReader::read).
    readers: Arc<Readers>,
    /// How far this process's appends reached.
    appended: watch::Sender<Frontier>,
}

impl KafkaLedger {
    /// Connects to the brokers, creates the topic when it is missing (with `partitions`
    /// partitions, infinite retention, never compacted) and builds the idempotent producer.
    /// Fails within about [`OPEN_TIMEOUT`] when the brokers do not answer.
    pub async fn open(config: KafkaConfig) -> Result<Self, LedgerError> {
        let deadline = Instant::now() + OPEN_TIMEOUT;
        let meta: Arc<BaseConsumer<LogContext>> =
            Arc::new(config.client("meta").create_with_context(LogContext)?);

        let metadata = {
            let meta = meta.clone();
            blocking(move || meta.fetch_metadata(None, OPEN_TIMEOUT)).await?
        }
        .map_err(|source| KafkaLedgerError::Unreachable {
            brokers: config.brokers.clone(),
            timeout: OPEN_TIMEOUT,
            source,
        })?;
        if partition_ids(&metadata, &config.topic).is_none() {
            create_topic(&config, deadline).await?;
        }
        let partitions = wait_for_topic(&meta, &config, deadline).await?;
        if usize::try_from(config.partitions).ok() != Some(partitions) {
            tracing::warn!(
                topic = %config.topic,
                partitions,
                configured = config.partitions,
                "the ledger topic exists with another partition count; using its own"
            );
        }

        let producer = producer::create(&config)?;
        let readers = Arc::new(Readers::new(&config, meta.clone()));
        let (appended, _) = watch::channel(Frontier::new());
        tracing::info!(
            brokers = %config.brokers,
            topic = %config.topic,
            partitions,
            "kafka ledger open"
        );
        Ok(Self {
            ce_source: format!("urn:nself:claw:{}", config.producer),
            config,
            producer,
            meta,
            readers,
            appended,
        })
    }

    /// The configuration this ledger was opened with.
    pub fn config(&self) -> &KafkaConfig {
        &self.config
    }

    /// The topic's partitions, as the brokers report them now.
    pub async fn partitions(&self) -> Result<Vec<i32>, LedgerError> {
        let meta = self.meta.clone();
        let topic = self.config.topic.clone();
        blocking(move || topic_partitions(&meta, &topic, REQUEST_TIMEOUT)).await?
    }

    /// Joins consumer group `group` on the ledger's topic and follows the partitions the group
    /// gives this member, each from where `start` says (the projection's own offsets, never
    /// the group's committed ones). Must be called from within a Tokio runtime (with its
    /// timer enabled): `start` is asked on that runtime.
    pub fn group_feed(
        &self,
        group: &str,
        start: Arc<dyn StartPositions>,
    ) -> Result<GroupFeed, LedgerError> {
        GroupFeed::start(&self.config, group, start)
    }
}

/// Creates the ledger topic; "already exists" (a racing instance) is success.
async fn create_topic(config: &KafkaConfig, deadline: Instant) -> Result<(), LedgerError> {
    let remaining = deadline.saturating_duration_since(Instant::now());
    let admin: AdminClient<LogContext> = config.client("admin").create_with_context(LogContext)?;
    let options = AdminOptions::new()
        .request_timeout(Some(remaining))
        .operation_timeout(Some(remaining));
    let replication = i32::from(config.replication);
    let mut topic = NewTopic::new(
        &config.topic,
        config.partitions,
        TopicReplication::Fixed(replication),
    )
    // The ledger is forever: no time or size limit, and never compacted (every event of a
    // key is a fact, not a newer version of the last one).
    .set("retention.ms", "-1")
    .set("retention.bytes", "-1")
    .set("cleanup.policy", "delete");
    if replication >= 3 {
        // acks=all then means "on at least two brokers".
        topic = topic.set("min.insync.replicas", "2");
    }
    let created = tokio::time::timeout(
        remaining + Duration::from_secs(1),
        admin.create_topics([&topic], &options),
    )
    .await;
    // Dropping an AdminClient joins its polling thread: not on the runtime.
    tokio::task::spawn_blocking(move || drop(admin));

    let results = created
        .map_err(|_| KafkaLedgerError::Unreachable {
            brokers: config.brokers.clone(),
            timeout: OPEN_TIMEOUT,
            source: KafkaError::AdminOp(RDKafkaErrorCode::OperationTimedOut),
        })?
        .map_err(|source| KafkaLedgerError::CreateTopic {
            topic: config.topic.clone(),
            code: source.rdkafka_error_code(),
            detail: source.to_string(),
        })?;
    for result in results {
        match result {
            Ok(name) => tracing::info!(
                topic = %name,
                partitions = config.partitions,
                replication,
                "created the ledger topic"
            ),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(KafkaLedgerError::CreateTopic {
                    topic: name,
                    code: Some(code),
                    detail: code.to_string(),
                }
                .into())
            }
        }
    }
    Ok(())
}

/// Waits until the topic's metadata shows every partition with a leader; returns how many.
async fn wait_for_topic(
    meta: &Arc<BaseConsumer<LogContext>>,
    config: &KafkaConfig,
    deadline: Instant,
) -> Result<usize, LedgerError> {
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let metadata = {
            let meta = meta.clone();
            let topic = config.topic.clone();
            blocking(move || meta.fetch_metadata(Some(&topic), remaining)).await?
        };
        let ready = metadata.ok().and_then(|metadata| {
            let topic = metadata
                .topics()
                .iter()
                .find(|t| t.name() == config.topic)?;
            let partitions = topic.partitions();
            let led = topic.error().is_none()
                && !partitions.is_empty()
                && partitions
                    .iter()
                    .all(|p| p.error().is_none() && p.leader() >= 0);
            led.then_some(partitions.len())
        });
        if let Some(partitions) = ready {
            return Ok(partitions);
        }
        if Instant::now() >= deadline {
            return Err(KafkaLedgerError::TopicNotReady {
                topic: config.topic.clone(),
                timeout: OPEN_TIMEOUT,
            }
            .into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The partition ids of `topic` in `metadata`, sorted; `None` when the topic is not there.
fn partition_ids(metadata: &Metadata, topic: &str) -> Option<Vec<i32>> {
    let topic = metadata.topics().iter().find(|t| t.name() == topic)?;
    if topic.error().is_some() || topic.partitions().is_empty() {
        return None;
    }
    let mut ids: Vec<i32> = topic
        .partitions()
        .iter()
        .map(rdkafka::metadata::MetadataPartition::id)
        .collect();
    ids.sort_unstable();
    Some(ids)
}

/// The topic's partitions, asking the brokers (blocking).
fn topic_partitions<C: ConsumerContext>(
    client: &BaseConsumer<C>,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<i32>, LedgerError> {
    let metadata = client.fetch_metadata(Some(topic), timeout)?;
    partition_ids(&metadata, topic).ok_or_else(|| {
        KafkaLedgerError::TopicMissing {
            topic: topic.to_owned(),
        }
        .into()
    })
}

/// Runs blocking librdkafka work off the async runtime.
async fn blocking<T, F>(work: F) -> Result<T, LedgerError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(LedgerError::backend)
}

/// A record's value as a ledger event, or `Corrupt`.
fn decode(partition: i32, offset: i64, payload: Option<&[u8]>) -> Result<Recorded, LedgerError> {
    let offset = u64::try_from(offset).map_err(|_| KafkaLedgerError::BadOffset { offset })?;
    let event: Envelope =
        serde_json::from_slice(payload.unwrap_or_default()).map_err(|source| {
            LedgerError::Corrupt {
                position: Position::new(partition, offset),
                source,
            }
        })?;
    Ok(Recorded {
        partition,
        offset,
        event,
    })
}

/// A ledger offset as librdkafka takes it.
fn kafka_offset(offset: u64) -> Result<i64, LedgerError> {
    i64::try_from(offset).map_err(|_| KafkaLedgerError::BadOffset { offset: i64::MAX }.into())
}

/// What can go wrong with the Kafka ledger beyond the driver's own errors. Carried inside
/// [`LedgerError::Backend`].
#[derive(Debug, thiserror::Error)]
pub enum KafkaLedgerError {
    #[error("Kafka at {brokers} did not answer within {timeout:?} ({source}); is the broker up and the address right?")]
    Unreachable {
        brokers: String,
        timeout: Duration,
        #[source]
        source: KafkaError,
    },
    #[error("could not create the ledger topic {topic}: {detail}")]
    CreateTopic {
        topic: String,
        code: Option<RDKafkaErrorCode>,
        detail: String,
    },
    #[error("the ledger topic {topic} had no leader for every partition within {timeout:?}")]
    TopicNotReady { topic: String, timeout: Duration },
    #[error("the ledger topic {topic} does not exist")]
    TopicMissing { topic: String },
    #[error("a delivery report for topic {topic} never came (the producer was dropped)")]
    DeliveryCanceled { topic: String },
    #[error("reading {topic} partition {partition} from offset {from} got nothing in {timeout:?}, though the partition ends at {end}")]
    ReadTimeout {
        topic: String,
        partition: i32,
        from: u64,
        end: u64,
        timeout: Duration,
    },
    #[error("asking where to start partitions {partitions:?} of group {group} failed: {source}")]
    StartPositions {
        group: String,
        partitions: Vec<i32>,
        #[source]
        source: Box<LedgerError>,
    },
    #[error("asking where to start partitions {partitions:?} of group {group} took longer than {timeout:?}")]
    StartPositionsTimeout {
        group: String,
        partitions: Vec<i32>,
        timeout: Duration,
    },
    #[error("a group feed needs a Tokio runtime to ask where to start: {0}")]
    NoRuntime(#[from] tokio::runtime::TryCurrentError),
    #[error("offset {offset} is not a ledger offset")]
    BadOffset { offset: i64 },
}

impl From<KafkaLedgerError> for LedgerError {
    fn from(err: KafkaLedgerError) -> Self {
        LedgerError::backend(err)
    }
}

impl From<KafkaError> for LedgerError {
    fn from(err: KafkaError) -> Self {
        LedgerError::backend(err)
    }
}

/// Sends librdkafka's log lines and client errors to `tracing` (target `librdkafka`).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct LogContext;

impl ClientContext for LogContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        log_line(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        log_client_error(&error, reason);
    }
}

impl ConsumerContext for LogContext {}

fn log_line(level: RDKafkaLogLevel, fac: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => tracing::error!(target: "librdkafka", fac, "{message}"),
        RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", fac, "{message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", fac, "{message}");
        }
        RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", fac, "{message}"),
    }
}

/// librdkafka reports transport trouble here and retries by itself: a warning, not a failure.
fn log_client_error(error: &KafkaError, reason: &str) {
    tracing::warn!(target: "librdkafka", %error, reason, "kafka client error");
}
