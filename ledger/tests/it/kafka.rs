//! The Kafka ledger against a real broker (`CLAW_KAFKA_BROKERS`): appends and their positions,
//! the records' headers on the wire, reads and ends, the consumer-group feed with its start
//! positions and rebalances, and startup against a broker that is not there. Every test has
//! a topic of its own, so they run in parallel.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use claw_ledger::{
    Appender, Endpoint, Envelope, Event, Feed, Frontier, GroupFeed, KafkaConfig, KafkaLedger,
    LedgerError, LedgerReader, Position, Provider, ReaderFeed, Recorded, RequestServed,
    StartPositions, Tier,
};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use uuid::Uuid;

/// How long any condition in these tests may take to become true.
const DEADLINE: Duration = Duration::from_secs(45);

fn brokers() -> String {
    std::env::var("CLAW_KAFKA_BROKERS").unwrap_or_else(|_| {
        panic!(
            "CLAW_KAFKA_BROKERS is not set: start the services: scripts/services.sh up; \
             eval \"$(scripts/services.sh env)\""
        )
    })
}

/// A configuration with a topic no other test uses.
fn fresh_config() -> KafkaConfig {
    KafkaConfig::new(
        brokers(),
        format!("claw-test-{}", Uuid::now_v7().simple()),
        "gw-test",
    )
}

async fn open(config: &KafkaConfig) -> KafkaLedger {
    KafkaLedger::open(config.clone())
        .await
        .unwrap_or_else(|e| panic!("opening the Kafka ledger at {}: {e}", config.brokers))
}

/// Removes a test's topic (best effort).
async fn delete_topic(config: &KafkaConfig) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .create()
        .unwrap();
    let _ = admin
        .delete_topics(
            &[config.topic.as_str()],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await;
    tokio::task::spawn_blocking(move || drop(admin))
        .await
        .unwrap();
}

/// `keys` keys' worth of sample events (four each, in order per key).
fn events_for(keys: usize, tag: &str) -> Vec<Envelope> {
    (0..keys)
        .flat_map(|i| crate::sample_events(&format!("{tag}-k{i}")))
        .collect()
}

/// One `RequestServed` event for `key_id`.
fn served(key_id: &str, n: u64) -> Envelope {
    Envelope::new(
        key_id,
        "bench",
        Event::RequestServed(RequestServed {
            request_id: format!("req-{n}"),
            endpoint: Endpoint::ChatCompletions,
            model_requested: "auto".into(),
            model_served: "llama3.2".into(),
            provider: Provider::Ollama,
            tier: Tier::Local,
            stream: false,
            status: 200,
            prompt_tokens: 12,
            completion_tokens: 30,
            total_tokens: 42,
            tokens_estimated: false,
            cost_usd: "0.000125".parse().unwrap(),
            latency_ms: 830,
            ttft_ms: None,
            session_id: None,
            admin_mode: false,
        }),
    )
}

fn frontier_of(positions: &[Position]) -> Frontier {
    let mut frontier = Frontier::new();
    for p in positions {
        frontier.pass(*p);
    }
    frontier
}

/// Start positions from a fixed frontier, remembering what was asked.
struct FixedStart {
    at: Frontier,
    asked: Mutex<Vec<Vec<i32>>>,
}

impl FixedStart {
    fn new(at: Frontier) -> Arc<Self> {
        Arc::new(Self {
            at,
            asked: Mutex::new(Vec::new()),
        })
    }
}

#[async_trait]
impl StartPositions for FixedStart {
    async fn start(&self, partitions: &[i32]) -> Result<Frontier, LedgerError> {
        self.asked.lock().unwrap().push(partitions.to_vec());
        Ok(partitions.iter().map(|&p| (p, self.at.next(p))).collect())
    }
}

/// The offsets committed to `group` on the test's topic.
async fn committed(config: &KafkaConfig, group: &str) -> Frontier {
    let probe: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_range(&config.topic, 0, config.partitions - 1);
    tokio::task::spawn_blocking(move || {
        let offsets = probe
            .committed_offsets(tpl, Duration::from_secs(10))
            .unwrap();
        offsets
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(n) => Some((e.partition(), u64::try_from(n).unwrap())),
                _ => None,
            })
            .collect()
    })
    .await
    .unwrap()
}

/// Takes what `feed` has ready within a short while.
async fn drain(feed: &mut GroupFeed, into: &mut Vec<Recorded>) {
    if let Ok(batch) = tokio::time::timeout(Duration::from_millis(50), feed.next_batch(500)).await {
        into.extend(batch.unwrap());
    }
}

fn ids(records: &[Recorded]) -> BTreeSet<Uuid> {
    records.iter().map(|r| r.event.event_id).collect()
}

/// Each partition's offsets, in delivery order.
fn offsets_by_partition(records: &[Recorded]) -> BTreeMap<i32, Vec<u64>> {
    let mut by: BTreeMap<i32, Vec<u64>> = BTreeMap::new();
    for r in records {
        by.entry(r.partition).or_default().push(r.offset);
    }
    by
}

#[tokio::test]
async fn appends_return_positions_and_a_keys_events_share_a_partition() {
    let config = fresh_config();
    let ledger = open(&config).await;
    assert_eq!(ledger.backend(), "kafka");
    ledger.ping().await.unwrap();

    let mut batch = crate::sample_events("alpha");
    batch.extend(crate::sample_events("beta"));
    let first = ledger.append(batch.clone()).await.unwrap();
    assert_eq!(first.len(), 8);
    let again = ledger.append(crate::sample_events("alpha")).await.unwrap();

    let alpha: Vec<Position> = first[..4].iter().chain(&again).copied().collect();
    let partition = alpha[0].partition;
    assert!(
        alpha.iter().all(|p| p.partition == partition),
        "one key, one partition: {alpha:?}"
    );
    assert!(
        alpha.windows(2).all(|w| w[0].offset < w[1].offset),
        "a key's offsets increase: {alpha:?}"
    );
    let beta = &first[4..];
    assert!(beta.iter().all(|p| p.partition == beta[0].partition));
    assert!(beta.windows(2).all(|w| w[0].offset < w[1].offset));

    let mut all = first.clone();
    all.extend(&again);
    let appended = ledger.appended();
    assert!(appended.borrow().covers(&frontier_of(&all)));
    assert_eq!(appended.borrow().total(), 12);
    delete_topic(&config).await;
}

#[tokio::test]
async fn records_carry_the_cloudevents_headers() {
    let config = fresh_config();
    let ledger = open(&config).await;
    let event = crate::sample_events("key-headers").remove(0);
    let position = ledger.append(vec![event.clone()]).await.unwrap()[0];

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .set("group.id", format!("raw-{}", Uuid::now_v7().simple()))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&config.topic, position.partition, Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let (key, headers, payload) = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        loop {
            assert!(started.elapsed() < DEADLINE, "no record came back");
            if let Some(message) = consumer.poll(Duration::from_millis(200)) {
                let message = message.unwrap();
                let headers: Vec<(String, String)> = message
                    .headers()
                    .unwrap()
                    .iter()
                    .map(|h| {
                        let value = String::from_utf8(h.value.unwrap().to_vec()).unwrap();
                        (h.key.to_owned(), value)
                    })
                    .collect();
                return (
                    message.key().unwrap().to_vec(),
                    headers,
                    message.payload().unwrap().to_vec(),
                );
            }
        }
    })
    .await
    .unwrap();

    assert_eq!(key, event.key_id.as_bytes());
    let expected: Vec<(String, String)> = [
        ("event_type", "KeyCreated".to_owned()),
        ("schema_version", "1".to_owned()),
        ("ce_specversion", "1.0".to_owned()),
        ("ce_id", event.event_id.to_string()),
        ("ce_source", "urn:nself:claw:gw-test".to_owned()),
        ("ce_type", "org.nself.claw.KeyCreated.v1".to_owned()),
        ("ce_time", claw_ledger::format_time(event.occurred_at)),
        ("ce_subject", "key-headers".to_owned()),
        ("content-type", "application/json".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(headers, expected);
    let back: Envelope = serde_json::from_slice(&payload).unwrap();
    assert_eq!(back, event);
    delete_topic(&config).await;
}

#[tokio::test]
async fn ends_and_reads_give_back_every_event_intact() {
    let config = fresh_config();
    let ledger = Arc::new(open(&config).await);
    let events = events_for(40, "rt");
    let positions = ledger.append(events.clone()).await.unwrap();
    let expected: HashMap<Position, Envelope> = positions
        .iter()
        .copied()
        .zip(events.iter().cloned())
        .collect();

    let ends = ledger.ends().await.unwrap();
    assert_eq!(
        ends.iter().map(|(p, _)| p).collect::<Vec<_>>(),
        (0..config.partitions).collect::<Vec<_>>(),
        "every partition has an end, empty ones too"
    );
    assert_eq!(ends.total(), 160);
    assert!(ends.covers(&frontier_of(&positions)));

    for (partition, end) in ends.iter() {
        let all = ledger.read(partition, 0, 1000).await.unwrap();
        assert_eq!(all.len() as u64, end, "partition {partition}");
        for (i, r) in all.iter().enumerate() {
            assert_eq!((r.partition, r.offset), (partition, i as u64));
            assert_eq!(&r.event, &expected[&r.position()]);
        }
    }

    // Page by page (the cached consumer continues), then jumps (it is re-pointed).
    let (busiest, end) = ends.iter().max_by_key(|(_, n)| *n).unwrap();
    let whole = ledger.read(busiest, 0, 1000).await.unwrap();
    let mut paged = Vec::new();
    let mut from = 0;
    loop {
        let page = ledger.read(busiest, from, 3).await.unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 3);
        from = page.last().unwrap().offset + 1;
        paged.extend(page);
    }
    assert_eq!(paged, whole);
    let middle = ledger.read(busiest, 1, 2).await.unwrap();
    assert_eq!(middle, whole[1..3].to_vec());
    let again = ledger.read(busiest, 0, 1).await.unwrap();
    assert_eq!(again, whole[..1].to_vec());

    // At and past the end: fewer, or none.
    let tail = ledger.read(busiest, end - 1, 10).await.unwrap();
    assert_eq!(tail, whole[whole.len() - 1..].to_vec());
    assert!(ledger.read(busiest, end, 10).await.unwrap().is_empty());
    assert!(ledger
        .read(busiest, end + 100, 10)
        .await
        .unwrap()
        .is_empty());
    assert!(ledger.read(busiest, 0, 0).await.unwrap().is_empty());

    // A read sees what was appended since the last one.
    let more = ledger
        .append(crate::sample_events("rt-k0")) // the key of `positions[0]`
        .await
        .unwrap();
    let grown = ledger
        .read(more[0].partition, more[0].offset, 100)
        .await
        .unwrap();
    assert_eq!(grown.len(), 4);

    // The generic follower works over the Kafka reader too.
    let mut feed = ReaderFeed::new(ledger.clone(), Frontier::new()).woken_by(ledger.appended());
    let mut followed = Vec::new();
    while followed.len() < 164 {
        let batch = tokio::time::timeout(DEADLINE, feed.next_batch(50))
            .await
            .expect("the reader feed stalled")
            .unwrap();
        followed.extend(batch);
    }
    assert_eq!(followed.len(), 164);
    assert_eq!(ids(&followed).len(), 164);
    delete_topic(&config).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_feed_starts_where_the_start_positions_say() {
    let config = fresh_config();
    let ledger = open(&config).await;
    let positions = ledger.append(events_for(60, "gs")).await.unwrap();
    let skipped = positions[0].partition; // has at least this key's four events
    let start = FixedStart::new([(skipped, 2)].into_iter().collect());

    let group = format!("claw-test-{}", Uuid::now_v7().simple());
    let mut feed = ledger.group_feed(&group, start.clone()).unwrap();
    let mut got = Vec::new();
    let started = Instant::now();
    while got.len() < positions.len() - 2 {
        assert!(
            started.elapsed() < DEADLINE,
            "only {} events came",
            got.len()
        );
        drain(&mut feed, &mut got).await;
    }
    let delivered: BTreeSet<Position> = got.iter().map(Recorded::position).collect();
    let expected: BTreeSet<Position> = positions
        .iter()
        .copied()
        .filter(|p| !(p.partition == skipped && p.offset < 2))
        .collect();
    assert_eq!(delivered, expected);
    for (partition, offsets) in offsets_by_partition(&got) {
        let first = if partition == skipped { 2 } else { 0 };
        assert_eq!(
            offsets[0], first,
            "partition {partition} starts at its start position"
        );
        assert!(offsets.windows(2).all(|w| w[0] < w[1]), "in order");
    }
    assert_eq!(feed.assigned(), (0..config.partitions).collect::<Vec<_>>());
    let asked: BTreeSet<i32> = start
        .asked
        .lock()
        .unwrap()
        .iter()
        .flatten()
        .copied()
        .collect();
    assert_eq!(asked, (0..config.partitions).collect());

    // Delivered offsets reach the group's committed offsets (for lag tools), best effort.
    let ends = ledger.ends().await.unwrap();
    let want: Frontier = ends.iter().filter(|(_, n)| *n > 0).collect();
    loop {
        let now = committed(&config, &group).await;
        if now == want {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "committed {now:?}, ends {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // It follows the log as it grows.
    let more = ledger.append(events_for(5, "gs-more")).await.unwrap();
    let mut live = Vec::new();
    while live.len() < more.len() {
        assert!(started.elapsed() < DEADLINE * 2, "new events did not come");
        drain(&mut feed, &mut live).await;
    }
    assert_eq!(
        live.iter().map(Recorded::position).collect::<BTreeSet<_>>(),
        more.into_iter().collect()
    );
    feed.close().await;
    delete_topic(&config).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_split_the_partitions_and_together_deliver_everything() {
    let config = fresh_config();
    let ledger = open(&config).await;
    let all_partitions: BTreeSet<i32> = (0..config.partitions).collect();
    let mut appended = ledger.append(events_for(60, "two-a")).await.unwrap();
    let group = format!("claw-test-{}", Uuid::now_v7().simple());
    let start = FixedStart::new(Frontier::new());

    let mut a = ledger.group_feed(&group, start.clone()).unwrap();
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    let started = Instant::now();
    while a.assigned().len() != all_partitions.len() {
        assert!(
            started.elapsed() < DEADLINE,
            "the first member got no partitions"
        );
        drain(&mut a, &mut got_a).await;
    }

    let mut b = ledger.group_feed(&group, start.clone()).unwrap();
    let split = |a: &GroupFeed, b: &GroupFeed| {
        let (pa, pb): (BTreeSet<i32>, BTreeSet<i32>) = (
            a.assigned().into_iter().collect(),
            b.assigned().into_iter().collect(),
        );
        !pa.is_empty()
            && !pb.is_empty()
            && pa.is_disjoint(&pb)
            && pa.union(&pb).copied().collect::<BTreeSet<_>>() == all_partitions
    };
    while !split(&a, &b) {
        assert!(
            started.elapsed() < DEADLINE,
            "no split: {:?} / {:?}",
            a.assigned(),
            b.assigned()
        );
        drain(&mut a, &mut got_a).await;
        drain(&mut b, &mut got_b).await;
    }

    appended.extend(ledger.append(events_for(60, "two-b")).await.unwrap());
    let want: BTreeSet<Position> = appended.iter().copied().collect();
    loop {
        let seen: BTreeSet<Position> = got_a.iter().chain(&got_b).map(Recorded::position).collect();
        if seen.is_superset(&want) {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE * 2,
            "together they delivered {} of {}",
            seen.len(),
            want.len()
        );
        drain(&mut a, &mut got_a).await;
        drain(&mut b, &mut got_b).await;
    }
    // After the split, each member delivers only its own partitions.
    let (owned_a, owned_b): (BTreeSet<i32>, BTreeSet<i32>) = (
        a.assigned().into_iter().collect(),
        b.assigned().into_iter().collect(),
    );
    assert!(!got_b.is_empty(), "the second member delivered nothing");
    assert!(got_b.iter().all(|r| owned_b.contains(&r.partition)));
    let late: Vec<&Recorded> = got_a
        .iter()
        .filter(|r| r.event.key_id.starts_with("two-b"))
        .collect();
    assert!(late.iter().all(|r| owned_a.contains(&r.partition)));

    // The first leaves: the second takes every partition and goes on alone.
    a.close().await;
    while b.assigned().len() != all_partitions.len() {
        assert!(
            started.elapsed() < DEADLINE * 3,
            "the second member did not take over: {:?}",
            b.assigned()
        );
        drain(&mut b, &mut got_b).await;
    }
    let last = ledger.append(events_for(10, "two-c")).await.unwrap();
    let want: BTreeSet<Position> = last.into_iter().collect();
    loop {
        let seen: BTreeSet<Position> = got_b.iter().map(Recorded::position).collect();
        if seen.is_superset(&want) {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE * 4,
            "the survivor missed events"
        );
        drain(&mut b, &mut got_b).await;
    }
    b.close().await;
    delete_topic(&config).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_record_is_corrupt_to_read_and_skipped_by_the_group_feed() {
    let mut config = fresh_config();
    config.partitions = 1;
    let ledger = open(&config).await;
    let foreign: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .create()
        .unwrap();
    foreign
        .send(
            FutureRecord::to(&config.topic)
                .key("intruder")
                .payload("not an envelope"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let positions = ledger.append(crate::sample_events("after")).await.unwrap();
    assert_eq!(positions[0], Position::new(0, 1));

    match ledger.read(0, 0, 10).await {
        Err(LedgerError::Corrupt { position, .. }) => assert_eq!(position, Position::new(0, 0)),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(ledger.read(0, 1, 10).await.unwrap().len(), 4);

    let group = format!("claw-test-{}", Uuid::now_v7().simple());
    let mut feed = ledger
        .group_feed(&group, FixedStart::new(Frontier::new()))
        .unwrap();
    let mut got = Vec::new();
    let started = Instant::now();
    while got.len() < 4 {
        assert!(
            started.elapsed() < DEADLINE,
            "the feed stalled at the foreign record"
        );
        drain(&mut feed, &mut got).await;
    }
    assert_eq!(
        got.iter().map(Recorded::position).collect::<Vec<_>>(),
        positions
    );
    feed.close().await;
    delete_topic(&config).await;
}

#[tokio::test]
async fn opening_an_unreachable_broker_fails_in_time() {
    let config = KafkaConfig::new("127.0.0.1:1", "claw-test-unreachable", "gw-test");
    let started = Instant::now();
    let Err(err) = KafkaLedger::open(config).await else {
        panic!("opened a ledger at 127.0.0.1:1");
    };
    let took = started.elapsed();
    assert!(
        took < claw_ledger::kafka::OPEN_TIMEOUT + Duration::from_secs(5),
        "took {took:?}"
    );
    let message = err.to_string();
    println!("open(127.0.0.1:1) failed after {took:?}: {message}");
    assert!(
        message.contains("127.0.0.1:1") && message.contains("did not answer"),
        "{message}"
    );
}

/// Not a pass/fail check: prints append and read throughput. The count can be raised with
/// `CLAW_KAFKA_THROUGHPUT_EVENTS` (e.g. 1000000, with `--release`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput() {
    let total: usize = std::env::var("CLAW_KAFKA_THROUGHPUT_EVENTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(20_000);
    let config = fresh_config();
    let ledger = open(&config).await;

    let started = Instant::now();
    let mut appended = 0;
    let mut n = 0u64;
    while appended < total {
        let batch: Vec<Envelope> = (0..500.min(total - appended))
            .map(|_| {
                n += 1;
                served(&format!("key-{}", n % 1000), n)
            })
            .collect();
        appended += ledger.append(batch).await.unwrap().len();
    }
    let append_secs = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let ends = ledger.ends().await.unwrap();
    let mut read = 0;
    for (partition, end) in ends.iter() {
        let mut from = 0;
        while from < end {
            let page = ledger.read(partition, from, 1000).await.unwrap();
            from = page.last().expect("a page short of the end").offset + 1;
            read += page.len();
        }
    }
    let read_secs = started.elapsed().as_secs_f64();
    assert_eq!(read, total);
    let count = f64::from(u32::try_from(total).unwrap());
    println!(
        "kafka throughput: append {total} events in batches of 500: {append_secs:.2} s \
         ({:.0} events/s); read back by read(p, from, 1000): {read_secs:.2} s ({:.0} events/s)",
        count / append_secs,
        count / read_secs
    );
    delete_topic(&config).await;
}
