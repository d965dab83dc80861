//! Integration tests of the fold, the queries and the audit on the embedded backends.

use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use claw_ledger::{
    Appender, Endpoint, Envelope, Event, Frontier, KeyCreated, KeyRevoked, Position, Provider,
    Recorded, RequestServed, SqliteLedger, Tier,
};
use claw_projector::{
    audit::audit, Projector, ProjectorHandle, ReadModels, UsageFilter, EMBEDDED_SOURCE,
};

/// The frontier just past `position`.
fn past(position: Position) -> Frontier {
    let mut f = Frontier::new();
    f.pass(position);
    f
}

/// The embedded projector over `log`, running.
async fn follow(log: &Arc<SqliteLedger>, store: &ReadModels) -> ProjectorHandle {
    Projector::embedded(log.clone(), log.appended(), store.clone())
        .await
        .unwrap()
        .spawn()
        .await
        .unwrap()
}

fn created(key_id: &str, name: &str) -> Envelope {
    Envelope::new(
        key_id,
        "test",
        Event::KeyCreated(KeyCreated {
            name: name.into(),
            key_prefix: "sk-nself-abc".into(),
            key_hash: format!("sha256:{key_id:0>64}"),
            rpm_limit: 60,
            admin_allowed: false,
        }),
    )
}

fn served(
    key_id: &str,
    tier: Tier,
    model: &str,
    prompt: u64,
    completion: u64,
    cost: &str,
) -> Envelope {
    let provider = match tier {
        Tier::Local => Provider::Ollama,
        Tier::FreeGemini => Provider::Gemini,
        Tier::ApiKey => Provider::Openai,
    };
    Envelope::new(
        key_id,
        "test",
        Event::RequestServed(RequestServed {
            request_id: uuid::Uuid::now_v7().to_string(),
            endpoint: Endpoint::ChatCompletions,
            model_requested: "auto".into(),
            model_served: model.into(),
            provider,
            tier,
            stream: false,
            status: 200,
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            tokens_estimated: false,
            cost_usd: cost.parse().unwrap(),
            latency_ms: 10,
            ttft_ms: None,
            session_id: None,
            admin_mode: false,
        }),
    )
}

/// The embedded pair: the ledger and the read models in one file, folds through its writer.
async fn embedded(path: &std::path::Path) -> (Arc<SqliteLedger>, ReadModels) {
    let ledger = SqliteLedger::open(path).await.unwrap();
    let store = ReadModels::open_sqlite(path, ledger.writer())
        .await
        .unwrap();
    (Arc::new(ledger), store)
}

fn revoked(key_id: &str, reason: Option<&str>) -> Envelope {
    Envelope::new(
        key_id,
        "test",
        Event::KeyRevoked(KeyRevoked {
            reason: reason.map(str::to_owned),
        }),
    )
}

fn recorded(events: &[Envelope]) -> Vec<Recorded> {
    events
        .iter()
        .enumerate()
        .map(|(i, e)| Recorded {
            partition: 0,
            offset: i as u64,
            event: e.clone(),
        })
        .collect()
}

#[tokio::test]
async fn folding_twice_counts_once() {
    let store = ReadModels::open_scratch().await.unwrap();
    let events = vec![
        created("k1", "alpha"),
        served("k1", Tier::Local, "llama3.2", 10, 5, "0"),
        served("k1", Tier::ApiKey, "gpt-4o", 100, 50, "0.00075"),
    ];
    let batch = recorded(&events);
    let first = store.fold_batch("ledger", &batch).await.unwrap();
    assert_eq!(first.applied, 3);
    assert_eq!(first.changed_keys, ["k1".to_owned()].into());
    let again = store.fold_batch("ledger", &batch).await.unwrap();
    assert_eq!(again.applied, 0, "replayed events are skipped");

    let doc = store.usage(&UsageFilter::default()).await.unwrap();
    assert_eq!(doc.keys.len(), 1);
    let k = &doc.keys[0];
    assert_eq!(
        (
            k.requests,
            k.prompt_tokens,
            k.completion_tokens,
            k.total_tokens
        ),
        (2, 110, 55, 165)
    );
    assert!((k.cost_usd - 0.00075).abs() < 1e-12);
    assert_eq!(k.by_tier["local"].requests, 1);
    assert_eq!(k.by_tier["api_key"].total_tokens, 150);
    assert_eq!(k.by_tier["free_gemini"].requests, 0);
    assert_eq!(doc.usage.len(), 2);
    assert_eq!(doc.totals.requests, 2);
    assert_eq!(store.next_offset("ledger", 0).await.unwrap(), 3);
}

#[tokio::test]
async fn revocation_and_listing() {
    let store = ReadModels::open_scratch().await.unwrap();
    let events = vec![
        created("k1", "alpha"),
        created("k2", "beta"),
        Envelope::new(
            "k1",
            "test",
            Event::KeyRevoked(KeyRevoked {
                reason: Some("leaked".into()),
            }),
        ),
    ];
    store
        .fold_batch("ledger", &recorded(&events))
        .await
        .unwrap();
    let keys = store.list_keys().await.unwrap();
    assert_eq!(
        keys.iter()
            .map(|k| (k.name.as_str(), k.is_active))
            .collect::<Vec<_>>(),
        [("alpha", false), ("beta", true)]
    );
    assert!(keys[0].revoked_at.is_some());
    let by_hash = store.key_by_hash(&keys[1].key_hash).await.unwrap().unwrap();
    assert_eq!(by_hash.id, "k2");
    let json = serde_json::to_value(&keys[0]).unwrap();
    assert!(
        json.get("key_hash").is_none(),
        "the hash never leaves the read model"
    );
}

#[tokio::test]
async fn windowed_usage_counts_only_requests_in_the_window() {
    let store = ReadModels::open_scratch().await.unwrap();
    let mut old = served("k1", Tier::Local, "llama3.2", 10, 10, "0");
    old.occurred_at = Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap();
    let mut new = served("k1", Tier::Local, "llama3.2", 1, 2, "0");
    new.occurred_at = Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap();
    store
        .fold_batch(
            "ledger",
            &recorded(&[created("k1", "a"), created("k2", "b"), old, new]),
        )
        .await
        .unwrap();
    let filter = UsageFilter {
        key_id: Some("k1".into()),
        since: Some(Utc.with_ymd_and_hms(2026, 2, 1, 0, 0, 0).unwrap()),
        until: None,
    };
    let doc = store.usage(&filter).await.unwrap();
    assert_eq!(doc.keys.len(), 1, "only the filtered key");
    assert_eq!(doc.keys[0].requests, 1);
    assert_eq!(doc.keys[0].total_tokens, 3);
    assert_eq!(doc.usage.len(), 1);
    assert_eq!(doc.usage[0].day, "2026-03-01");
    let all = store.usage(&UsageFilter::default()).await.unwrap();
    assert_eq!(all.totals.requests, 2);
    assert_eq!(all.usage.len(), 2);
}

#[tokio::test]
async fn the_runner_follows_the_ledger_and_audit_finds_no_drift_then_detects_tampering() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("claw.db");
    let (log, store) = embedded(&path).await;
    let handle = follow(&log, &store).await;
    let key_changes = handle.key_changes();

    let offsets = log
        .append(vec![
            created("k1", "alpha"),
            served("k1", Tier::Local, "llama3.2", 3, 4, "0"),
        ])
        .await
        .unwrap();
    handle
        .wait_for(&past(offsets[1]), Duration::from_secs(10))
        .await
        .unwrap();
    assert!(key_changes.has_pending());
    assert_eq!(
        store
            .usage(&UsageFilter::default())
            .await
            .unwrap()
            .totals
            .total_tokens,
        7
    );

    let report = audit(log.clone(), &store, EMBEDDED_SOURCE).await.unwrap();
    assert_eq!(report.events, 2);
    assert_eq!(report.drift, 0, "{report:?}");
    assert_eq!(report.keys[0].total_tokens, 7);

    // Tamper with the live read model: the audit must notice.
    let pool = sqlx::AnyPool::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    sqlx::query("UPDATE key_totals SET total_tokens = total_tokens + 1")
        .execute(&pool)
        .await
        .unwrap();
    let report = audit(log.clone(), &store, EMBEDDED_SOURCE).await.unwrap();
    assert_eq!(report.drift, 1);
    assert!(
        report.keys[0].drift[0].starts_with("total_tokens"),
        "{:?}",
        report.keys[0].drift
    );
}

#[tokio::test]
async fn a_restarted_projector_resumes_from_its_offset_without_recounting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("claw.db");
    let (log, store) = embedded(&path).await;
    let first = follow(&log, &store).await;
    let o = log
        .append(vec![
            created("k1", "a"),
            served("k1", Tier::Local, "m", 1, 1, "0"),
        ])
        .await
        .unwrap();
    first
        .wait_for(&past(o[1]), Duration::from_secs(10))
        .await
        .unwrap();
    drop(first);

    let second = follow(&log, &store).await;
    assert_eq!(second.applied().next(0), 2);
    let o = log
        .append(vec![served("k1", Tier::Local, "m", 1, 1, "0")])
        .await
        .unwrap();
    second
        .wait_for(&past(o[0]), Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        store
            .usage(&UsageFilter::default())
            .await
            .unwrap()
            .totals
            .requests,
        2
    );
}

#[tokio::test]
async fn an_event_twice_in_one_batch_counts_once() {
    let store = ReadModels::open_scratch().await.unwrap();
    let served_once = served("k1", Tier::Local, "llama3.2", 10, 5, "0");
    let events = vec![created("k1", "alpha"), served_once.clone(), served_once];
    let outcome = store
        .fold_batch("ledger", &recorded(&events))
        .await
        .unwrap();
    assert_eq!(outcome.applied, 2);
    let doc = store.usage(&UsageFilter::default()).await.unwrap();
    assert_eq!(doc.totals.requests, 1);
    assert_eq!(doc.totals.total_tokens, 15);
}

#[tokio::test]
async fn the_writer_thread_and_sqlx_fold_to_the_same_read_models() {
    let mut yesterday = served("k1", Tier::FreeGemini, "gemini-1.5-flash", 7, 9, "0");
    yesterday.occurred_at -= chrono::Duration::days(1);
    let repeated = served("k2", Tier::ApiKey, "claude-3-5-haiku", 40, 60, "0.000123");
    let events = vec![
        created("k1", "alpha"),
        created("k2", "beta"),
        created("k3", "gamma"),
        served("k1", Tier::Local, "llama3.2", 10, 5, "0"),
        yesterday,
        repeated.clone(),
        repeated,
        served("k2", Tier::ApiKey, "gpt-4o", 100, 50, "0.00075"),
        revoked("k2", Some("leaked")),
        revoked("k3", None),
    ];
    let batch = recorded(&events);
    let (first, second) = batch.split_at(5);

    let scratch = ReadModels::open_scratch().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (_log, file) = embedded(&dir.path().join("claw.db")).await;
    for store in [&scratch, &file] {
        let a = store.fold_batch("ledger", first).await.unwrap();
        let b = store.fold_batch("ledger", second).await.unwrap();
        let again = store.fold_batch("ledger", &batch).await.unwrap();
        assert_eq!((a.applied, b.applied, again.applied), (5, 4, 0));
        assert_eq!(store.next_offset("ledger", 0).await.unwrap(), 10);
    }
    let doc = file.usage(&UsageFilter::default()).await.unwrap();
    assert_eq!(doc, scratch.usage(&UsageFilter::default()).await.unwrap());
    assert_eq!(doc.totals.requests, 4);
    assert_eq!(doc.usage.len(), 4, "one row per key, day, model and tier");
    let keys = file.list_keys().await.unwrap();
    assert_eq!(keys, scratch.list_keys().await.unwrap());
    let revoked: Vec<_> = keys.iter().filter(|k| k.revoked_at.is_some()).collect();
    assert_eq!(revoked.len(), 2);
    assert!(keys
        .iter()
        .all(|k| k.id != "k1" || k.last_used_at.is_some()));
}

#[tokio::test]
async fn a_failing_fold_on_the_writer_rolls_back_and_the_ledger_keeps_appending() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("claw.db");
    let (log, store) = embedded(&path).await;
    // Break the projection: the fold's requests insert now fails.
    let pool = sqlx::AnyPool::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    sqlx::query("DROP TABLE requests")
        .execute(&pool)
        .await
        .unwrap();
    let events = vec![
        created("k1", "a"),
        served("k1", Tier::Local, "m", 1, 1, "0"),
    ];
    assert!(store
        .fold_batch("ledger", &recorded(&events))
        .await
        .is_err());
    assert_eq!(
        store.next_offset("ledger", 0).await.unwrap(),
        0,
        "nothing of the failed fold is kept"
    );
    assert!(store.list_keys().await.unwrap().is_empty());
    let offsets = log.append(events).await.unwrap();
    assert_eq!(
        offsets,
        vec![Position::new(0, 0), Position::new(0, 1)],
        "the ledger does not depend on the projection"
    );
}
