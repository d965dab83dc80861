//! The Kafka broker frozen (SIGSTOP), then killed (SIGKILL) and started again, under steady
//! traffic: the fsync'ed outbox answers every request meanwhile and delivers every fact once
//! the broker is back.
//!
//! `CLAW_FAULTS_FREEZE_SECS` sets how long the broker stays frozen (default 5 s). Past its
//! session timeout (`broker.session.timeout.ms`, 9 s) the KRaft controller fences the broker
//! when it resumes, and its Metadata answers show the partitions without a leader for a moment,
//! right before the kill.

use std::time::{Duration, Instant};

use crate::support::{
    all_ok, kafka_pid, note, services_up, signal, summary, wait_gone, ServicesGuard, Stack, Traffic,
};

/// How long the broker stays frozen: 5 s, or `CLAW_FAULTS_FREEZE_SECS`.
fn frozen() -> Duration {
    let secs = std::env::var("CLAW_FAULTS_FREEZE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    Duration::from_secs(secs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_frozen_then_killed_and_restarted_loses_nothing() {
    let _serial = crate::support::serial().await;
    let test_started = Instant::now();
    let mut stack = Stack::start(1, 1).await;
    let (_, key) = stack.create_key(0, "steady", Duration::from_mins(1)).await;

    // About 20 requests a second: 4 clients, one request every 200 ms each.
    let traffic = Traffic::start(&stack, &[(0, key)], 4, Duration::from_millis(200));
    traffic
        .wait_for_more(20, Duration::from_secs(20), "before the fault")
        .await;

    let pid = kafka_pid();
    let _services = ServicesGuard::kafka(pid);
    let frozen = frozen();
    note!("freezing the broker (pid {pid}) for {frozen:?}");
    let before = traffic.completed();
    signal(pid, "STOP");
    tokio::time::sleep(frozen).await;
    signal(pid, "CONT");
    let during_freeze = traffic.completed() - before;
    note!(
        "broker resumed; {during_freeze} requests answered while it was frozen; claw_outbox_backlog {}",
        stack.outbox_backlog_metric(0).await
    );
    traffic
        .wait_for_more(10, Duration::from_secs(20), "after the broker resumed")
        .await;

    signal(pid, "KILL");
    wait_gone(pid, Duration::from_secs(10)).await;
    note!("broker killed");
    let before = traffic.completed();
    traffic
        .wait_for_more(40, Duration::from_secs(20), "while the broker is dead")
        .await;
    note!(
        "{} requests answered since the kill; claw_outbox_backlog {}",
        traffic.completed() - before,
        stack.outbox_backlog_metric(0).await
    );
    let took = services_up().await;
    let restarted = kafka_pid();
    assert_ne!(restarted, pid, "the broker was not restarted");
    note!(
        "broker back (pid {restarted}) after {:.1} s of `services.sh up`; {} requests answered while it was down",
        took.as_secs_f64(),
        traffic.completed() - before
    );
    traffic
        .wait_for_more(40, Duration::from_secs(20), "after the broker came back")
        .await;
    assert!(
        during_freeze > 0,
        "no request was answered while the broker was frozen"
    );

    let outcomes = traffic.stop().await;
    stack.assert_all_running();
    let ids = all_ok(&outcomes, "through the broker outage");
    note!("all 200: {}", summary(&outcomes));

    stack
        .assert_accounted_exactly(&ids, Duration::from_mins(2))
        .await;
    note!("test took {:.1} s", test_started.elapsed().as_secs_f64());
}
