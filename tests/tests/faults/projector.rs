//! The only projector `kill -9`ed while it folds steady traffic, and a new projector process
//! started in its place: the new member resumes where the projection stopped, and the read
//! models end exactly the fold of the ledger.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{all_ok, note, summary, Stack, Traffic};

/// Events the projection has folded, as gateway 0 sees it.
async fn applied(stack: &Stack) -> u64 {
    let status = stack.admin_get(0, "/claw/v1/status").await;
    status["projection"]["applied"]
        .as_object()
        .map_or(0, |parts| parts.values().filter_map(Value::as_u64).sum())
}

/// Waits until the projection has folded more than `past` events.
async fn wait_applied_past(stack: &Stack, past: u64, within: Duration, what: &str) -> u64 {
    let deadline = Instant::now() + within;
    loop {
        let now = applied(stack).await;
        if now > past {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the projection stayed at {now} events for {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until gateway 0's status shows the projection in `state`; returns that status part.
async fn wait_projection_state(stack: &Stack, state: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let projection = stack.admin_get(0, "/claw/v1/status").await["projection"].take();
        if projection["state"] == state {
            return projection;
        }
        assert!(
            Instant::now() < deadline,
            "the projection is not {state} after {within:?}: {projection}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn projector_killed_mid_stream_resumes_without_drift() {
    let _serial = crate::support::serial().await;
    let test_started = Instant::now();
    let mut stack = Stack::start(1, 1).await;
    let (_, first) = stack.create_key(0, "first", Duration::from_mins(1)).await;
    let (_, second) = stack.create_key(0, "second", Duration::from_mins(1)).await;

    // Up to ~120 requests a second over two keys (two partitions, most likely).
    let traffic = Traffic::start(
        &stack,
        &[(0, first), (0, second)],
        6,
        Duration::from_millis(50),
    );
    traffic
        .wait_for_more(100, Duration::from_secs(30), "before the kill")
        .await;

    // Kill it right after it was seen to fold: it is folding the stream as it dies.
    let seen = applied(&stack).await;
    let folding = wait_applied_past(&stack, seen, Duration::from_secs(10), "before the kill").await;
    let pid = stack.projectors[0].pid();
    stack.projectors[0].kill();
    note!("projector (pid {pid}) killed at {folding} events folded");

    // The ledger runs ahead while no projector folds, and the gateway says the projection
    // has stalled (still ready: it serves every key it knows).
    traffic
        .wait_for_more(100, Duration::from_secs(30), "with no projector")
        .await;
    let stalled = wait_projection_state(&stack, "stalled", Duration::from_secs(30)).await;
    note!("status says the projection stalled: {stalled}");
    let ready = stack.admin_get(0, "/readyz").await;
    assert_eq!(ready["status"], "ready", "{ready}");
    assert_eq!(ready["projector"]["state"], "stalled", "{ready}");
    let at_restart = applied(&stack).await;
    note!("{at_restart} events folded when the new projector starts");

    let replaced = Instant::now();
    stack.add_projector("projector-2").await;
    let resumed = wait_applied_past(
        &stack,
        at_restart,
        Duration::from_mins(1),
        "after the restart",
    )
    .await;
    note!(
        "the new projector folded again after {:.1} s ({resumed} events)",
        replaced.elapsed().as_secs_f64()
    );
    traffic
        .wait_for_more(50, Duration::from_secs(30), "after the new projector")
        .await;
    wait_projection_state(&stack, "running", Duration::from_secs(30)).await;

    let outcomes = traffic.stop().await;
    stack.assert_all_running();
    let ids = all_ok(&outcomes, "while the projector was killed and replaced");
    note!("all 200: {}", summary(&outcomes));

    stack
        .assert_accounted_exactly(&ids, Duration::from_secs(90))
        .await;
    note!("test took {:.1} s", test_started.elapsed().as_secs_f64());
}
