//! The embedded SQLite ledger: durable appends, ordered reads, following, idempotency.

use std::time::Duration;

use claw_ledger::{Appender, LedgerReader, Position, SqliteLedger};

fn at(offsets: &[u64]) -> Vec<Position> {
    offsets.iter().map(|o| Position::new(0, *o)).collect()
}

#[tokio::test]
async fn appends_are_read_back_in_order_from_any_offset() {
    let dir = tempfile::tempdir().unwrap();
    let log = SqliteLedger::open(&dir.path().join("claw.db"))
        .await
        .unwrap();
    let events = crate::sample_events("k1");
    let offsets = log.append(events.clone()).await.unwrap();
    assert_eq!(offsets, at(&[0, 1, 2, 3]));
    assert_eq!(log.appended().borrow().next(0), 4);

    let all = log.read(0, 0, 100).await.unwrap();
    assert_eq!(
        all.iter().map(|r| r.offset).collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
    assert_eq!(
        all.iter().map(|r| r.event.clone()).collect::<Vec<_>>(),
        events
    );
    let tail = log.read(0, 2, 1).await.unwrap();
    assert_eq!(tail.len(), 1);
    assert_eq!(tail[0].offset, 2);
    assert_eq!(tail[0].event, events[2]);
}

#[tokio::test]
async fn the_same_event_id_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let log = SqliteLedger::open(&dir.path().join("claw.db"))
        .await
        .unwrap();
    let events = crate::sample_events("k1");
    log.append(events[..2].to_vec()).await.unwrap();
    let again = log.append(events[1..3].to_vec()).await.unwrap();
    assert_eq!(again, at(&[1, 2]), "a redelivered event keeps its offset");
    assert_eq!(log.read(0, 0, 100).await.unwrap().len(), 3);
}

#[tokio::test]
async fn events_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("claw.db");
    let events = crate::sample_events("k1");
    {
        let log = SqliteLedger::open(&path).await.unwrap();
        log.append(events.clone()).await.unwrap();
    }
    let log = SqliteLedger::open(&path).await.unwrap();
    assert_eq!(log.appended().borrow().next(0), 4);
    let back: Vec<_> = log
        .read(0, 0, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.event)
        .collect();
    assert_eq!(back, events);
}

#[tokio::test]
async fn concurrent_appends_are_group_committed_without_loss() {
    let dir = tempfile::tempdir().unwrap();
    let log = std::sync::Arc::new(
        SqliteLedger::open(&dir.path().join("claw.db"))
            .await
            .unwrap(),
    );
    let mut tasks = Vec::new();
    for i in 0..200 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            log.append(crate::sample_events(&format!("k{i}"))[1..2].to_vec())
                .await
                .unwrap()[0]
                .offset
        }));
    }
    let mut offsets = Vec::new();
    for t in tasks {
        offsets.push(t.await.unwrap());
    }
    offsets.sort_unstable();
    assert_eq!(offsets, (0..200).collect::<Vec<u64>>());
}

#[tokio::test]
async fn followers_are_woken_by_new_appends() {
    let dir = tempfile::tempdir().unwrap();
    let log = std::sync::Arc::new(
        SqliteLedger::open(&dir.path().join("claw.db"))
            .await
            .unwrap(),
    );
    let mut head = log.appended();
    let writer = log.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        writer
            .append(crate::sample_events("k")[..1].to_vec())
            .await
            .unwrap();
    });
    tokio::time::timeout(Duration::from_secs(5), head.wait_for(|h| h.next(0) == 1))
        .await
        .expect("follower woken within deadline")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_ahead_log_starts_over_under_steady_appends() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("claw.db");
    let log = SqliteLedger::open_with_checkpoints(&path, Duration::from_millis(200))
        .await
        .unwrap();
    let wal = dir.path().join("claw.db-wal");
    // One event per commit for a while: each commit adds at least two 4 KiB frames, so a log
    // that never started over would pass 8 MiB; checkpoints and restarts keep it far smaller.
    let started = std::time::Instant::now();
    let mut appended: usize = 0;
    while started.elapsed() < Duration::from_millis(1500) || appended < 1000 {
        log.append(crate::sample_events("k1")[..1].to_vec())
            .await
            .unwrap();
        appended += 1;
    }
    let frames_written = u64::try_from(appended).unwrap() * 2;
    let wal_bytes = std::fs::metadata(&wal).unwrap().len();
    assert!(
        wal_bytes < frames_written * 4096 / 2,
        "{wal_bytes} bytes of log after {appended} commits"
    );
    assert_eq!(log.read(0, 0, usize::MAX).await.unwrap().len(), appended);
}
