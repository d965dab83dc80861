//! The outbox: recorded events reach the ledger in order, and what a crash left in the
//! outbox files is appended at the next open, torn or stale lines excepted.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use claw_ledger::{
    Appender, Envelope, Frontier, LedgerError, LedgerReader, Outbox, Position, SqliteLedger,
};
use tokio::sync::watch;

async fn ledger(dir: &std::path::Path) -> Arc<SqliteLedger> {
    Arc::new(SqliteLedger::open(&dir.join("claw.db")).await.unwrap())
}

async fn ledger_events(log: &SqliteLedger) -> Vec<Envelope> {
    log.read(0, 0, usize::MAX)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.event)
        .collect()
}

fn header(generation: u64) -> String {
    format!("claw-outbox v1 gen={generation:020}\n")
}

fn line(generation: u64, event: &Envelope) -> String {
    format!("{generation}\t{}\n", serde_json::to_string(event).unwrap())
}

#[tokio::test]
async fn recorded_events_reach_the_ledger_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let log = ledger(dir.path()).await;
    let outbox = Outbox::open(dir.path(), log.clone()).await.unwrap();
    let mut expected = Vec::new();
    for i in 0..50 {
        let events = crate::sample_events(&format!("k{i}"));
        outbox.record(events[1..3].to_vec()).await.unwrap();
        expected.extend_from_slice(&events[1..3]);
    }
    outbox.flush(Duration::from_secs(10)).await.unwrap();
    assert_eq!(ledger_events(log.as_ref()).await, expected);
    assert_eq!(outbox.backlog(), 0);
}

/// The real SQLite ledger behind a switch: while `down`, every append fails (as when the
/// disk is full or, distributed, the brokers are unreachable) and is counted.
struct Unreliable {
    inner: Arc<SqliteLedger>,
    down: AtomicBool,
    refused: AtomicUsize,
}

#[async_trait]
impl Appender for Unreliable {
    async fn append(&self, events: Vec<Envelope>) -> Result<Vec<Position>, LedgerError> {
        if self.down.load(Ordering::SeqCst) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(LedgerError::Write("injected: the ledger is down".into()));
        }
        self.inner.append(events).await
    }

    fn appended(&self) -> watch::Receiver<Frontier> {
        self.inner.appended()
    }

    async fn ping(&self) -> Result<(), LedgerError> {
        self.inner.ping().await
    }

    fn backend(&self) -> &'static str {
        "unreliable"
    }
}

#[tokio::test]
async fn records_made_while_the_ledger_is_down_reach_it_once_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let real = ledger(dir.path()).await;
    let log = Arc::new(Unreliable {
        inner: real.clone(),
        down: AtomicBool::new(false),
        refused: AtomicUsize::new(0),
    });
    let outbox = Outbox::open(dir.path(), log.clone()).await.unwrap();
    log.down.store(true, Ordering::SeqCst);

    // Recording still succeeds: the events are durable in the outbox file.
    let mut expected = Vec::new();
    for i in 0..5 {
        let events = crate::sample_events(&format!("k{i}"));
        outbox.record(events[1..3].to_vec()).await.unwrap();
        expected.extend_from_slice(&events[1..3]);
    }
    let err = outbox.flush(Duration::from_millis(300)).await.unwrap_err();
    assert!(
        err.to_string().contains("did not reach the ledger"),
        "{err}"
    );
    assert!(
        log.refused.load(Ordering::SeqCst) >= 2,
        "the drainer retries"
    );
    assert!(outbox.backlog() > 0, "what waits is reported");
    assert!(ledger_events(real.as_ref()).await.is_empty());

    log.down.store(false, Ordering::SeqCst);
    outbox.flush(Duration::from_secs(15)).await.unwrap();
    assert_eq!(
        ledger_events(real.as_ref()).await,
        expected,
        "all, in order, once"
    );
    assert_eq!(outbox.backlog(), 0);
}

#[tokio::test]
async fn what_a_crash_left_is_appended_at_open_oldest_generation_first() {
    let dir = tempfile::tempdir().unwrap();
    let older = crate::sample_events("k1");
    let newer = crate::sample_events("k2");
    let torn = line(8, &newer[3]);
    // Segment 1: generation 7, complete. Segment 0: generation 8, then a torn last line.
    let one = header(7) + &line(7, &older[0]) + &line(7, &older[1]);
    let zero = header(8) + &line(8, &newer[0]) + &line(8, &newer[1]) + &torn[..torn.len() / 2];
    std::fs::write(dir.path().join("outbox.1"), one).unwrap();
    std::fs::write(dir.path().join("outbox.0"), zero).unwrap();

    let log = ledger(dir.path()).await;
    let _outbox = Outbox::open(dir.path(), log.clone()).await.unwrap();
    assert_eq!(
        ledger_events(log.as_ref()).await,
        vec![
            older[0].clone(),
            older[1].clone(),
            newer[0].clone(),
            newer[1].clone()
        ]
    );
}

#[tokio::test]
async fn lines_of_an_earlier_generation_are_not_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let events = crate::sample_events("k1");
    // Generation 4 wrote one event over the start of what generation 3 had left.
    let segment = header(4) + &line(4, &events[0]) + &line(3, &events[1]) + &line(3, &events[2]);
    std::fs::write(dir.path().join("outbox.0"), segment).unwrap();
    let log = ledger(dir.path()).await;
    let _outbox = Outbox::open(dir.path(), log.clone()).await.unwrap();
    assert_eq!(ledger_events(log.as_ref()).await, vec![events[0].clone()]);
}

#[tokio::test]
async fn reopening_after_a_clean_drain_appends_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let log = ledger(dir.path()).await;
    let events = crate::sample_events("k1");
    {
        let outbox = Outbox::open(dir.path(), log.clone()).await.unwrap();
        outbox.record(events.clone()).await.unwrap();
        outbox.flush(Duration::from_secs(10)).await.unwrap();
    }
    // Opening again re-reads the same records (they are still in the file): the ledger keeps
    // one copy, and the new generation leaves nothing for a third open.
    let _again = Outbox::open(dir.path(), log.clone()).await.unwrap();
    let _third = Outbox::open(dir.path(), log.clone()).await.unwrap();
    assert_eq!(ledger_events(log.as_ref()).await, events);
    assert_eq!(log.appended().borrow().next(0), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_take_turns_and_stay_their_preallocated_size() {
    let dir = tempfile::tempdir().unwrap();
    let log = ledger(dir.path()).await;
    let outbox = Outbox::open(dir.path(), log.clone()).await.unwrap();
    // ~12 MiB of records in batches: more than one segment holds before it switches.
    let mut recorded = 0;
    while recorded < 12 << 20 {
        let batch: Vec<Envelope> = (0..64)
            .flat_map(|i| crate::sample_events(&format!("k{i}")))
            .collect();
        recorded += batch
            .iter()
            .map(|e| serde_json::to_string(e).unwrap().len())
            .sum::<usize>();
        outbox.record(batch).await.unwrap();
        outbox.flush(Duration::from_secs(10)).await.unwrap();
    }
    for segment in ["outbox.0", "outbox.1"] {
        let len = std::fs::metadata(dir.path().join(segment)).unwrap().len();
        assert_eq!(len, 8 << 20, "{segment} grew");
    }
    let in_ledger = log.appended().borrow().next(0);
    drop(outbox);
    // Nothing was lost or doubled by the switches: a reopen finds the ledger complete.
    let _again = Outbox::open(dir.path(), log.clone()).await.unwrap();
    assert_eq!(log.appended().borrow().next(0), in_ledger);
}
