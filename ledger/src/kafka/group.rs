//! Following the Kafka ledger as one member of a consumer group: the distributed projector's
//! [`Feed`]. The brokers share the topic's partitions among the group's members; this member
//! folds the ones it is given, each from where the projection says (its stored offsets are
//! the truth; the group's committed offsets are never used to position the consumer).
//!
//! librdkafka's consumer blocks, and rebalances are served inside its `poll`, so each feed
//! runs its consumer on a thread of its own. When partitions are assigned, the thread asks
//! [`StartPositions`] (on the runtime, through a captured handle) and assigns them at those
//! offsets; when they are revoked it forgets them. Events go to the async side over a bounded
//! channel, so a slow fold holds the consumer back instead of filling memory. Each
//! assignment of a partition is an *epoch*: events still queued from an assignment that has
//! since been revoked are dropped, never delivered as if this member still owned them.
//!
//! Assignment strategy: `cooperative-sticky`. When a member joins or leaves, only the
//! partitions that move are revoked and reassigned; the others keep folding without a pause
//! or a new start-position query, and each assign/revoke names exactly the partitions that
//! change, which is what the epochs and start positions are kept for.
//!
//! Offsets delivered by [`GroupFeed::next_batch`] are also committed to the group, about once
//! a second, asynchronously and best effort, only so that standard lag tools
//! (`kafka-consumer-groups --describe`) show progress. They are "delivered", not "folded".

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use tokio::runtime::Handle;
use tokio::sync::mpsc;

use super::{decode, kafka_offset, log_client_error, log_line, KafkaConfig, KafkaLedgerError};
use crate::log::{Feed, LedgerError, Recorded, StartPositions};
use crate::position::Frontier;

/// Events buffered between the consumer thread and the fold.
const BUFFER: usize = 4096;

/// How long the consumer thread waits in one poll (and so how soon it notices a stop).
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// How often delivered offsets are committed to the group.
const COMMIT_EVERY: Duration = Duration::from_secs(1);

/// How long one [`StartPositions::start`] call may take.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a failing [`StartPositions::start`] is tried before the feed fails.
const START_ATTEMPTS: u32 = 5;

/// What the consumer thread sends the feed. Nearly every item is an event, so the size
/// difference is the common case, not waste; boxing would allocate once per event.
#[allow(clippy::large_enum_variant)]
enum Item {
    Event { epoch: u64, record: Recorded },
    Failed(LedgerError),
}

/// State shared by the feed and its consumer thread.
struct Shared {
    topic: String,
    group: String,
    /// Set when the feed is dropped or closed.
    stop: AtomicBool,
    /// The partitions this member owns now, each with the epoch of its assignment.
    assignment: Mutex<Assignment>,
    /// The next offset after the last event the feed delivered, per partition.
    delivered: Mutex<HashMap<i32, u64>>,
}

#[derive(Default)]
struct Assignment {
    epochs: BTreeMap<i32, u64>,
    next_epoch: u64,
}

impl Shared {
    fn assignment(&self) -> MutexGuard<'_, Assignment> {
        self.assignment
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn delivered(&self) -> MutexGuard<'_, HashMap<i32, u64>> {
        self.delivered
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// A consumer-group member's [`Feed`]: the events of the partitions the group gives it.
/// Dropping it stops its consumer thread, which leaves the group, so the others rebalance
/// promptly ([`close`](Self::close) also waits for that).
pub struct GroupFeed {
    rx: mpsc::Receiver<Item>,
    shared: Arc<Shared>,
    /// A failure received while a batch was being gathered, reported by the next call.
    failed: Option<LedgerError>,
    thread: Option<JoinHandle<()>>,
}

impl GroupFeed {
    pub(super) fn start(
        config: &KafkaConfig,
        group: &str,
        start: Arc<dyn StartPositions>,
    ) -> Result<Self, LedgerError> {
        let runtime = Handle::try_current().map_err(KafkaLedgerError::from)?;
        let shared = Arc::new(Shared {
            topic: config.topic.clone(),
            group: group.to_owned(),
            stop: AtomicBool::new(false),
            assignment: Mutex::new(Assignment::default()),
            delivered: Mutex::new(HashMap::new()),
        });
        let context = GroupContext {
            shared: shared.clone(),
            start,
            runtime,
            failure: Mutex::new(None),
        };
        let consumer: BaseConsumer<GroupContext> = config
            .client(&format!("group-{group}"))
            .set("group.id", group)
            .set("partition.assignment.strategy", "cooperative-sticky")
            // The projection's offsets are the truth: nothing is stored or committed
            // automatically, and a committed offset never positions this consumer.
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // A member that dies without leaving loses its partitions after 10 s, not 45.
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "2000")
            .set("max.partition.fetch.bytes", "4194304")
            .create_with_context(context)?;
        consumer.subscribe(&[config.topic.as_str()])?;

        let (tx, rx) = mpsc::channel(BUFFER);
        let thread = std::thread::Builder::new()
            .name(format!("claw-group-{group}"))
            .spawn({
                let shared = shared.clone();
                move || {
                    run(&consumer, &tx, &shared);
                    // Closing leaves the group (revoking what is still assigned).
                    drop(consumer);
                    shared.assignment().epochs.clear();
                }
            })
            .map_err(LedgerError::Thread)?;
        tracing::info!(group, topic = %config.topic, "joined the consumer group");
        Ok(Self {
            rx,
            shared,
            failed: None,
            thread: Some(thread),
        })
    }

    /// The partitions this member owns now.
    pub fn assigned(&self) -> Vec<i32> {
        self.shared.assignment().epochs.keys().copied().collect()
    }

    /// The consumer group's name.
    pub fn group(&self) -> &str {
        &self.shared.group
    }

    /// Leaves the group and waits until the consumer is closed (its partitions then go to
    /// the other members). Dropping the feed does the same without waiting.
    pub async fn close(mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.rx.close();
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }

    /// Takes an item into `batch` unless it belongs to a revoked assignment.
    fn accept(&mut self, items: Vec<Item>) -> Vec<Recorded> {
        let mut batch = Vec::with_capacity(items.len());
        {
            let assignment = self.shared.assignment();
            for item in items {
                match item {
                    Item::Event { epoch, record } => {
                        if assignment.epochs.get(&record.partition) == Some(&epoch) {
                            batch.push(record);
                        }
                    }
                    Item::Failed(err) => {
                        self.failed.get_or_insert(err);
                    }
                }
            }
        }
        if !batch.is_empty() {
            let mut delivered = self.shared.delivered();
            for record in &batch {
                let next = delivered.entry(record.partition).or_default();
                *next = (*next).max(record.offset + 1);
            }
        }
        batch
    }
}

impl Drop for GroupFeed {
    fn drop(&mut self) {
        // The thread sees this (or the closed channel) within a poll interval, then closes
        // its consumer; not joined here, so dropping never blocks the runtime.
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

#[async_trait]
impl Feed for GroupFeed {
    async fn next_batch(&mut self, max: usize) -> Result<Vec<Recorded>, LedgerError> {
        let max = max.max(1);
        loop {
            if let Some(err) = self.failed.take() {
                return Err(err);
            }
            let Some(first) = self.rx.recv().await else {
                return Err(LedgerError::Closed);
            };
            let mut items = vec![first];
            while items.len() < max {
                match self.rx.try_recv() {
                    Ok(item) => items.push(item),
                    Err(_) => break,
                }
            }
            let batch = self.accept(items);
            if !batch.is_empty() {
                return Ok(batch);
            }
        }
    }

    async fn ready_batch(&mut self, max: usize) -> Result<Vec<Recorded>, LedgerError> {
        if let Some(err) = self.failed.take() {
            return Err(err);
        }
        let mut items = Vec::new();
        while items.len() < max {
            match self.rx.try_recv() {
                Ok(item) => items.push(item),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    if items.is_empty() {
                        return Err(LedgerError::Closed);
                    }
                    break;
                }
            }
        }
        Ok(self.accept(items))
    }
}

/// The consumer thread: polls, serves rebalances, forwards events, commits now and then.
fn run(consumer: &BaseConsumer<GroupContext>, tx: &mpsc::Sender<Item>, shared: &Shared) {
    let mut committed: HashMap<i32, u64> = HashMap::new();
    let mut last_commit = Instant::now();
    while !shared.stop.load(Ordering::Relaxed) && !tx.is_closed() {
        let polled = consumer.poll(POLL_INTERVAL);
        if let Some(err) = consumer.context().take_failure() {
            let _ = tx.blocking_send(Item::Failed(err));
            break;
        }
        match polled {
            None => {}
            Some(Ok(message)) => {
                let partition = message.partition();
                let Some(epoch) = shared.assignment().epochs.get(&partition).copied() else {
                    continue;
                };
                match decode(partition, message.offset(), message.payload()) {
                    Ok(record) => {
                        // Blocks while the buffer is full: the fold sets the pace.
                        if tx.blocking_send(Item::Event { epoch, record }).is_err() {
                            break;
                        }
                    }
                    Err(err) => tracing::error!(
                        topic = %shared.topic,
                        partition,
                        offset = message.offset(),
                        error = %err,
                        "skipping a ledger record that is not a valid envelope"
                    ),
                }
            }
            Some(Err(err @ KafkaError::MessageConsumptionFatal(_))) => {
                let _ = tx.blocking_send(Item::Failed(err.into()));
                break;
            }
            Some(Err(err)) => tracing::warn!(
                group = %shared.group,
                error = %err,
                "kafka group consumer: transient error"
            ),
        }
        if last_commit.elapsed() >= COMMIT_EVERY {
            commit_delivered(consumer, shared, &mut committed);
            last_commit = Instant::now();
        }
    }
    tracing::info!(group = %shared.group, "leaving the consumer group");
}

/// Commits (async, best effort) the delivered offsets of the partitions owned now.
fn commit_delivered(
    consumer: &BaseConsumer<GroupContext>,
    shared: &Shared,
    committed: &mut HashMap<i32, u64>,
) {
    let owned: Vec<i32> = shared.assignment().epochs.keys().copied().collect();
    let delivered = shared.delivered().clone();
    let mut tpl = TopicPartitionList::new();
    for partition in owned {
        let Some(&next) = delivered.get(&partition) else {
            continue;
        };
        if committed.get(&partition) == Some(&next) {
            continue;
        }
        let Ok(offset) = kafka_offset(next) else {
            continue;
        };
        if tpl
            .add_partition_offset(&shared.topic, partition, Offset::Offset(offset))
            .is_ok()
        {
            committed.insert(partition, next);
        }
    }
    if tpl.count() > 0 {
        if let Err(err) = consumer.commit(&tpl, CommitMode::Async) {
            tracing::debug!(group = %shared.group, error = %err, "could not commit offsets");
        }
    }
}

/// The group consumer's callbacks: rebalances go through [`StartPositions`].
struct GroupContext {
    shared: Arc<Shared>,
    start: Arc<dyn StartPositions>,
    runtime: Handle,
    /// Set when a rebalance could not be served; the thread then fails the feed and stops.
    failure: Mutex<Option<LedgerError>>,
}

impl GroupContext {
    fn take_failure(&self) -> Option<LedgerError> {
        self.failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    fn fail(&self, err: LedgerError) {
        tracing::error!(group = %self.shared.group, error = %err, "the group feed fails");
        self.failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(err);
    }

    /// The next offsets of `partitions`, asked of [`StartPositions`] on the runtime, with
    /// retries (this thread is not a runtime thread, so `block_on` is allowed).
    fn start_positions(&self, partitions: &[i32]) -> Result<Frontier, LedgerError> {
        let mut backoff = Duration::from_millis(500);
        let mut attempt = 1;
        loop {
            let start = self.start.clone();
            let asked = partitions.to_vec();
            let result = self.runtime.block_on(async move {
                tokio::time::timeout(START_TIMEOUT, start.start(&asked)).await
            });
            let err = match result {
                Ok(Ok(frontier)) => return Ok(frontier),
                Ok(Err(err)) => KafkaLedgerError::StartPositions {
                    group: self.shared.group.clone(),
                    partitions: partitions.to_vec(),
                    source: Box::new(err),
                },
                Err(_elapsed) => KafkaLedgerError::StartPositionsTimeout {
                    group: self.shared.group.clone(),
                    partitions: partitions.to_vec(),
                    timeout: START_TIMEOUT,
                },
            };
            if attempt >= START_ATTEMPTS || self.shared.stop.load(Ordering::Relaxed) {
                return Err(err.into());
            }
            tracing::warn!(group = %self.shared.group, attempt, error = %err, "retrying");
            std::thread::sleep(backoff);
            backoff *= 2;
            attempt += 1;
        }
    }

    /// Partitions are ours: position each at its start offset, then take them.
    fn assign(
        &self,
        consumer: &BaseConsumer<Self>,
        tpl: &mut TopicPartitionList,
        cooperative: bool,
    ) {
        let topic = &self.shared.topic;
        let partitions: Vec<i32> = tpl
            .elements_for_topic(topic)
            .iter()
            .map(rdkafka::topic_partition_list::TopicPartitionListElem::partition)
            .collect();
        let mut starts = BTreeMap::new();
        if !partitions.is_empty() {
            match self.start_positions(&partitions) {
                Ok(frontier) => {
                    for &partition in &partitions {
                        let next = frontier.next(partition);
                        let set = kafka_offset(next).and_then(|offset| {
                            tpl.set_partition_offset(topic, partition, Offset::Offset(offset))
                                .map_err(LedgerError::from)
                        });
                        if let Err(err) = set {
                            self.fail(err);
                        }
                        starts.insert(partition, next);
                    }
                }
                // The partitions must still be taken (the protocol requires it); the thread
                // then stops, closing the consumer, and they go to another member.
                Err(err) => self.fail(err),
            }
        }
        let taken = if cooperative {
            consumer.incremental_assign(tpl)
        } else {
            consumer.assign(tpl)
        };
        if let Err(err) = taken {
            self.fail(err.into());
            return;
        }
        let mut assignment = self.shared.assignment();
        if !cooperative {
            assignment.epochs.clear();
        }
        for &partition in &partitions {
            let epoch = assignment.next_epoch;
            assignment.next_epoch += 1;
            assignment.epochs.insert(partition, epoch);
        }
        let owned: Vec<i32> = assignment.epochs.keys().copied().collect();
        drop(assignment);
        tracing::info!(
            group = %self.shared.group,
            ?starts,
            ?owned,
            "partitions assigned"
        );
    }

    /// Partitions are no longer ours: forget them, then give them up.
    fn revoke(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList, cooperative: bool) {
        let partitions: Vec<i32> = tpl
            .elements_for_topic(&self.shared.topic)
            .iter()
            .map(rdkafka::topic_partition_list::TopicPartitionListElem::partition)
            .collect();
        {
            let mut assignment = self.shared.assignment();
            if cooperative {
                for partition in &partitions {
                    assignment.epochs.remove(partition);
                }
            } else {
                assignment.epochs.clear();
            }
        }
        let given_up = if cooperative {
            consumer.incremental_unassign(tpl)
        } else {
            consumer.unassign()
        };
        if let Err(err) = given_up {
            tracing::warn!(group = %self.shared.group, error = %err, "unassign failed");
        }
        tracing::info!(
            group = %self.shared.group,
            ?partitions,
            lost = consumer.assignment_lost(),
            "partitions revoked"
        );
    }
}

impl ClientContext for GroupContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        log_line(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        log_client_error(&error, reason);
    }
}

impl ConsumerContext for GroupContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.assign(consumer, tpl, cooperative);
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.revoke(consumer, tpl, cooperative);
            }
            other => {
                tracing::error!(group = %self.shared.group, error = ?other, "rebalance error");
                self.revoke(consumer, tpl, cooperative);
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(err) = result {
            tracing::debug!(group = %self.shared.group, error = %err, "offset commit failed");
        }
    }
}
