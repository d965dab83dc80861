//! Two gateways and two projectors (one consumer group) on one ledger: a key revoked through
//! one gateway is refused by the other within a second, and both gateways report the same,
//! exact usage.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::support::{all_ok, check_ledger, note, summary, Outcome, Stack};

/// Keys created (through gateway A); the first is revoked (through gateway B).
const KEYS: usize = 4;
/// Requests per key through each gateway before the revocation.
const PER_GATEWAY: usize = 10;
/// The most a revocation may take to reach the other gateway.
const PROPAGATION_LIMIT: Duration = Duration::from_secs(1);
/// How often gateway A is asked whether it still takes the revoked key.
const POLL: Duration = Duration::from_millis(20);

const A: usize = 0;
const B: usize = 1;

/// Polls gateway A with `secret` until it answers 401; returns how long that took from
/// `since` and the requests A still served meanwhile.
async fn until_refused(stack: &Stack, secret: &str, since: Instant) -> (Duration, Vec<Outcome>) {
    let mut served = Vec::new();
    loop {
        let o = stack.chat(A, secret).await;
        match o.status {
            Some(401) => return (since.elapsed(), served),
            Some(200) if o.ok() => served.push(o),
            _ => panic!("gateway A answered neither 200 nor 401 after the revocation: {o:?}"),
        }
        assert!(
            since.elapsed() < Duration::from_secs(10),
            "gateway A still serves the revoked key 10 s after the revocation ({} requests)",
            served.len()
        );
        tokio::time::sleep(POLL).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_two_projectors_revocation_within_a_second_and_exact_totals() {
    let _serial = crate::support::serial().await;
    let test_started = Instant::now();
    let mut stack = Stack::start(2, 2).await;
    let mut keys = Vec::new();
    for i in 0..KEYS {
        let name = format!("key-{i}");
        keys.push(stack.create_key(A, &name, Duration::from_mins(1)).await);
    }

    let mut outcomes = Vec::new();
    let mut per_key: HashMap<String, u64> = HashMap::new();
    for (id, secret) in &keys {
        for gateway in [A, B] {
            for _ in 0..PER_GATEWAY {
                outcomes.push(stack.chat(gateway, secret).await);
                *per_key.entry(id.clone()).or_default() += 1;
            }
        }
    }
    all_ok(&outcomes, "before the revocation");

    let (doomed_id, doomed) = &keys[0];
    let out = stack.cli(B, &["keys", "revoke", doomed_id]).await;
    let returned = Instant::now();
    assert!(
        out.status.success(),
        "keys revoke through B: {}",
        crate::support::describe(&out)
    );
    let (propagation, late) = until_refused(&stack, doomed, returned).await;
    note!(
        "gateway A refused the key {} ms after `keys revoke` through B returned ({} requests served meanwhile)",
        propagation.as_millis(),
        late.len()
    );
    *per_key.get_mut(doomed_id).expect("doomed key") += u64::try_from(late.len()).expect("few");
    outcomes.extend(late);
    assert!(
        propagation < PROPAGATION_LIMIT,
        "the revocation took {propagation:?} to reach gateway A"
    );
    let on_b = stack.chat(B, doomed).await;
    assert_eq!(
        on_b.status,
        Some(401),
        "B serves the key it revoked: {on_b:?}"
    );

    // The other keys still work on both.
    for (id, secret) in &keys[1..] {
        for gateway in [A, B] {
            outcomes.push(stack.chat(gateway, secret).await);
            *per_key.get_mut(id).expect("key") += 1;
        }
    }
    stack.assert_all_running();
    let ids: HashSet<String> = all_ok(&outcomes, "all served requests");
    note!("all 200: {}", summary(&outcomes));

    let records = stack.settle(Duration::from_mins(1)).await;
    let check = check_ledger(&records, &ids);
    note!("ledger: {check}");
    assert_eq!(check.served, ids.len());
    let total = u64::try_from(ids.len()).expect("small");
    for gateway in [A, B] {
        let name = &stack.gateways[gateway].name;
        assert_eq!(
            stack.usage_requests(gateway).await,
            total,
            "usage totals.requests on {name}"
        );
        let usage = stack.usage_by_key(gateway).await;
        for (id, n) in &per_key {
            assert_eq!(
                usage.get(id),
                Some(n),
                "usage of key {id} on {name}: {usage:?}"
            );
        }
        stack.assert_audit_clean(gateway, records.len()).await;
    }
    note!("test took {:.1} s", test_started.elapsed().as_secs_f64());
}
