//! PostgreSQL (the read models) stopped and started again under steady traffic: known keys
//! keep working from the gateway's in-memory key cache, and once PostgreSQL is back the
//! gateway and the projector recover by themselves.

use std::time::{Duration, Instant};

use crate::support::{
    all_ok, note, pg_ctlcluster, services_up, summary, ServicesGuard, Stack, Traffic,
};

/// How long PostgreSQL stays down (at least; the clients must get answers meanwhile).
const DOWN: Duration = Duration::from_secs(3);

/// Waits until the gateway's `/readyz` answers 200.
async fn wait_ready(stack: &Stack, within: Duration) -> Duration {
    let started = Instant::now();
    let url = format!("{}/readyz", stack.gateways[0].url);
    loop {
        let resp = stack
            .http
            .get(&url)
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        let last = match resp {
            Ok(r) if r.status().is_success() => return started.elapsed(),
            Ok(r) => format!("{} {}", r.status(), r.text().await.unwrap_or_default()),
            Err(e) => e.to_string(),
        };
        assert!(
            started.elapsed() < within,
            "/readyz not 200 within {within:?} of PostgreSQL's start: {last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_restarted_during_traffic_keys_keep_working() {
    let _serial = crate::support::serial().await;
    let test_started = Instant::now();
    let mut stack = Stack::start(1, 1).await;
    let (_, first) = stack.create_key(0, "first", Duration::from_mins(1)).await;
    let (_, second) = stack.create_key(0, "second", Duration::from_mins(1)).await;

    let traffic = Traffic::start(
        &stack,
        &[(0, first), (0, second)],
        4,
        Duration::from_millis(200),
    );
    traffic
        .wait_for_more(20, Duration::from_secs(20), "before the restart")
        .await;

    let _services = ServicesGuard::new();
    let stopping = Instant::now();
    let at_stop = traffic.completed();
    pg_ctlcluster("stop").await;
    let stopped = Instant::now();
    note!(
        "PostgreSQL stopped (`pg_ctlcluster stop` took {:.1} s; {} requests answered meanwhile)",
        stopping.elapsed().as_secs_f64(),
        traffic.completed() - at_stop
    );
    let before = traffic.completed();
    tokio::time::sleep(DOWN).await;
    traffic
        .wait_for_more(20, Duration::from_secs(20), "while PostgreSQL is down")
        .await;
    let during = traffic.completed() - before;
    let down_for = stopped.elapsed();
    let asked = Instant::now();
    let readyz = stack
        .http
        .get(format!("{}/readyz", stack.gateways[0].url))
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .map_or_else(|e| e.to_string(), |r| r.status().to_string());
    note!(
        "{during} requests answered in {:.1} s with PostgreSQL down; /readyz then: {readyz} after {:.1} s",
        down_for.as_secs_f64(),
        asked.elapsed().as_secs_f64()
    );
    pg_ctlcluster("start").await;
    services_up().await;
    let back = Instant::now();
    note!(
        "PostgreSQL back after {:.1} s",
        stopped.elapsed().as_secs_f64()
    );

    let ready = wait_ready(&stack, Duration::from_mins(1)).await;
    note!(
        "gateway ready {:.1} s after PostgreSQL",
        ready.as_secs_f64()
    );
    let created = Instant::now();
    let (_, third) = stack.create_key(0, "third", Duration::from_mins(1)).await;
    note!(
        "a key created {:.1} s after PostgreSQL came back (create took {:.1} s)",
        back.elapsed().as_secs_f64(),
        created.elapsed().as_secs_f64()
    );
    let mut extra = Vec::new();
    for _ in 0..5 {
        extra.push(stack.chat(0, &third).await);
    }
    traffic
        .wait_for_more(20, Duration::from_secs(20), "after PostgreSQL came back")
        .await;

    let outcomes = traffic.stop().await;
    stack.assert_all_running();
    let mut ids = all_ok(&outcomes, "with known keys through the restart");
    ids.extend(all_ok(&extra, "with the key created after the restart"));
    note!("all 200: {}", summary(&outcomes));

    stack
        .assert_accounted_exactly(&ids, Duration::from_secs(90))
        .await;
    note!("test took {:.1} s", test_started.elapsed().as_secs_f64());
}
