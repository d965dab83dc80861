//! The admin API (`/claw/v1`) and the unauthenticated probes: credentials, key commands,
//! usage windows, the event stream, audits, and that nothing secret leaks.

use claw_tests::gateway::TestGateway;
use serde_json::{json, Value};

#[tokio::test]
async fn the_admin_api_needs_the_internal_token() {
    let gw = TestGateway::start().await;
    for token in [None, Some("wrong")] {
        let mut request = gw.http.get(format!("{}/claw/v1/api-keys", gw.url));
        if let Some(token) = token {
            request = request.header("x-internal-token", token);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401);
    }
    let bearer = gw
        .http
        .get(format!("{}/claw/v1/api-keys", gw.url))
        .bearer_auth(&gw.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(bearer.status(), 200, "Authorization: Bearer works too");
    // A gateway key is not an admin credential.
    let (_, key) = gw.create_key("app", 60, false).await;
    let response = gw
        .http
        .get(format!("{}/claw/v1/usage", gw.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
}

#[tokio::test]
async fn key_commands_validate_and_list_without_secrets() {
    let gw = TestGateway::start().await;
    let post = |body: Value| {
        gw.admin(reqwest::Method::POST, "/claw/v1/api-keys")
            .json(&body)
            .send()
    };
    for bad in [
        json!({"name": "x", "rpm_limit": 0}),
        json!({"name": "x", "rpm_limit": 1_000_001}),
        json!({"name": "  "}),
        json!({"rpm_limit": 5}),
    ] {
        let response = post(bad.clone()).await.unwrap();
        assert_eq!(response.status(), 400, "{bad}");
    }
    assert_eq!(
        gw.state.appender.appended().borrow().total(),
        0,
        "refused commands emit nothing"
    );

    let created: Value = post(json!({"name": "ci", "admin_allowed": true, "rpm_limit": 1_000_000}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut fields: Vec<&str> = created
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        [
            "admin_allowed",
            "created_at",
            "id",
            "key",
            "key_prefix",
            "name",
            "rpm_limit"
        ]
    );
    let secret = created["key"].as_str().unwrap();
    assert!(secret.starts_with("sk-nself-") && secret.len() >= 9 + 32);
    assert_eq!(created["key_prefix"].as_str().unwrap(), &secret[..12]);

    let list = gw.admin_get("/claw/v1/api-keys").await;
    let key = &list["keys"][0];
    let mut fields: Vec<&str> = key
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        [
            "admin_allowed",
            "created_at",
            "id",
            "is_active",
            "key_prefix",
            "last_used_at",
            "name",
            "revoked_at",
            "rpm_limit"
        ]
    );
    assert!(
        !list.to_string().contains(secret),
        "secrets never come back"
    );
    assert!(!list.to_string().contains("sha256:"), "nor their hashes");

    let unknown = gw
        .admin(reqwest::Method::DELETE, "/claw/v1/api-keys/no-such-key")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
}

#[tokio::test]
async fn usage_filters_by_key_and_time_window() {
    let gw = TestGateway::start().await;
    let (a, key_a) = gw.create_key("a", 60, false).await;
    let (_, key_b) = gw.create_key("b", 60, false).await;
    let ask = json!({"model": "auto", "messages": [{"role": "user", "content": "hi"}]});
    for key in [&key_a, &key_a, &key_b] {
        assert_eq!(gw.chat(key, &ask).await.status(), 200);
    }
    gw.wait_for_served(3).await;
    gw.settle().await;
    let all = gw.admin_get("/claw/v1/usage").await;
    assert_eq!(all["totals"]["requests"], 3);
    assert_eq!(all["keys"].as_array().unwrap().len(), 2);
    assert!(all["totals"]["cost_usd"].is_number());
    let only_a = gw.admin_get(&format!("/claw/v1/usage?key_id={a}")).await;
    assert_eq!(only_a["keys"].as_array().unwrap().len(), 1);
    assert_eq!(only_a["totals"]["requests"], 2);
    let recent = gw
        .admin_get(&format!("/claw/v1/usage?key_id={a}&since=1h"))
        .await;
    assert_eq!(recent["totals"]["requests"], 2);
    let future = gw
        .admin_get("/claw/v1/usage?since=2999-01-01T00:00:00Z")
        .await;
    assert_eq!(future["totals"]["requests"], 0);
    let bad = gw
        .admin(reqwest::Method::GET, "/claw/v1/usage?since=yesterday")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
}

#[tokio::test]
async fn events_stream_the_ledger_in_order_and_audit_finds_no_drift() {
    let gw = TestGateway::start().await;
    let (_, key) = gw.create_key("app", 60, false).await;
    gw.chat(
        &key,
        &json!({"model": "auto", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    gw.wait_for_served(1).await;
    let text = gw
        .admin(reqwest::Method::GET, "/claw/v1/events?from=0")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    // A key's events share one partition (the embedded log's only one, 0), in order.
    let partition = lines[0]["partition"].clone();
    if gw.distributed.is_none() {
        assert_eq!(partition, 0);
    }
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["partition"], partition);
        assert_eq!(line["offset"], i);
    }
    assert_eq!(lines[0]["event"]["event_type"], "KeyCreated");
    assert_eq!(lines[1]["event"]["event_type"], "RequestServed");
    assert!(
        !text.contains("sk-nself-") || !text.contains(&key),
        "no secret in the ledger"
    );

    gw.settle().await;
    let report: Value = gw
        .admin(reqwest::Method::POST, "/claw/v1/audit")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(report["drift"], 0, "{report}");
    assert_eq!(report["events"], 2);
    assert_eq!(report["keys"][0]["requests"], 1);
}

#[tokio::test]
async fn probes_need_no_auth_and_show_no_secrets() {
    let gw = TestGateway::start().await;
    let (_, key) = gw.create_key("very-secret-name", 60, false).await;
    gw.chat(
        &key,
        &json!({"model": "auto", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    for path in ["/healthz", "/readyz", "/metrics"] {
        let response = gw
            .http
            .get(format!("{}{path}", gw.url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
        assert!(response.headers().contains_key("x-request-id"));
        let text = response.text().await.unwrap();
        assert!(
            !text.contains(&key)
                && !text.contains("very-secret-name")
                && !text.contains(&gw.admin_token),
            "{path}: {text}"
        );
    }
    let metrics = gw
        .http
        .get(format!("{}/metrics", gw.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("claw_requests_total"), "{metrics}");
    // Where a durable record spent its time: queued behind a sync, then its group's sync.
    let count = |name: &str| -> f64 {
        claw_tests::prometheus::sample(&metrics, &format!("{name}_count"))
            .unwrap_or_else(|| panic!("{name} missing: {metrics}"))
    };
    let (queued, synced) = (
        count("claw_outbox_queue_seconds"),
        count("claw_outbox_sync_seconds"),
    );
    assert!(queued >= 1.0 && synced >= 1.0, "{metrics}");
    assert!(
        synced <= queued,
        "a sync covers one or more records: {metrics}"
    );
}
