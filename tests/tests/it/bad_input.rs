//! Bad input gets its contract error, OpenAI-shaped, and never reaches the ledger or the read
//! models.

use claw_tests::gateway::TestGateway;
use claw_tests::openai_schema::validate;
use serde_json::{json, Value};

/// Sends a raw body, checks status, error code/type and shape; returns the error object.
async fn refused(
    gw: &TestGateway,
    key: Option<&str>,
    body: &str,
    status: u16,
    code: &str,
) -> Value {
    let mut request = gw
        .http
        .post(format!("{}/v1/chat/completions", gw.url))
        .body(body.to_owned());
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), status, "{body}");
    assert!(response.headers().contains_key("x-request-id"));
    let error: Value = response.json().await.unwrap();
    validate("ErrorResponse", &error).unwrap();
    assert_eq!(error["error"]["code"], code, "{body}: {error}");
    if status == 400 {
        assert_eq!(error["error"]["type"], "invalid_request_error");
    }
    error
}

#[tokio::test]
async fn malformed_requests_are_400_and_leave_no_trace() {
    let gw = TestGateway::start().await;
    let (_, key) = gw.create_key("app", 1000, false).await;
    gw.settle().await;
    let head = gw.state.appender.appended().borrow().total();
    let cases = [
        ("{not json", None),
        ("", None),
        (r#"{"model":"auto"}"#, Some("messages")),
        (
            r#"{"model":"auto","messages":{"role":"user"}}"#,
            Some("messages"),
        ),
        (r#"{"model":"auto","messages":[]}"#, Some("messages")),
        (
            r#"{"model":42,"messages":[{"role":"user","content":"x"}]}"#,
            Some("model"),
        ),
        (
            r#"{"model":"auto","messages":[{"role":"user","content":"x"}],"temperature":9}"#,
            Some("temperature"),
        ),
        (
            r#"{"model":"auto","messages":[{"role":"user","content":"x"}],"stream":"yes"}"#,
            Some("stream"),
        ),
        (
            r#"{"model":"auto","messages":[{"role":"user","content":"x"}],"max_tokens":-1}"#,
            Some("max_tokens"),
        ),
        (
            r#"{"model":"auto","messages":[{"role":"user","content":"x"}],"n":3}"#,
            Some("n"),
        ),
    ];
    for (body, param) in cases {
        let error = refused(&gw, Some(&key), body, 400, "invalid_request_error").await;
        assert_eq!(error["error"]["param"].as_str(), param, "{body}: {error}");
    }
    assert_eq!(
        gw.state.appender.appended().borrow().total(),
        head,
        "nothing was written to the ledger"
    );
    assert_eq!(gw.ollama.chat_requests(), 0, "nothing reached the upstream");
}

#[tokio::test]
async fn unknown_models_are_404_model_not_found() {
    let gw = TestGateway::start().await;
    let (_, key) = gw.create_key("app", 60, false).await;
    let head = gw.state.appender.appended().borrow().total();
    let error = refused(
        &gw,
        Some(&key),
        r#"{"model":"no-such-model","messages":[{"role":"user","content":"x"}]}"#,
        404,
        "model_not_found",
    )
    .await;
    assert_eq!(error["error"]["param"], "model");
    assert_eq!(gw.state.appender.appended().borrow().total(), head);
}

#[tokio::test]
async fn bodies_over_the_limit_are_413() {
    let gw = TestGateway::start_with(&["--max-body-bytes", "1024"]).await;
    let (_, key) = gw.create_key("app", 60, false).await;
    let big = json!({"model": "auto", "messages": [{"role": "user", "content": "x".repeat(4096)}]})
        .to_string();
    refused(&gw, Some(&key), &big, 413, "request_too_large").await;
    assert!(gw.served().await.is_empty());
}

#[tokio::test]
async fn missing_unknown_and_revoked_keys_are_401() {
    let gw = TestGateway::start().await;
    let (id, key) = gw.create_key("app", 60, false).await;
    let ok = r#"{"model":"auto","messages":[{"role":"user","content":"x"}]}"#;
    refused(&gw, None, ok, 401, "invalid_api_key").await;
    refused(
        &gw,
        Some("sk-nself-thisisnotakeythisisnotakey00000"),
        ok,
        401,
        "invalid_api_key",
    )
    .await;
    refused(&gw, Some("garbage"), ok, 401, "invalid_api_key").await;

    let revoke = gw
        .admin(reqwest::Method::DELETE, &format!("/claw/v1/api-keys/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(revoke.status(), 200);
    let revoked: Value = revoke.json().await.unwrap();
    assert_eq!(revoked["is_active"], false);
    // Refused on the very next request: revoke returns only once the projection shows it.
    refused(&gw, Some(&key), ok, 401, "invalid_api_key").await;
    assert!(gw.served().await.is_empty());
}

#[tokio::test]
async fn over_the_rpm_limit_is_429_with_retry_after() {
    let gw = TestGateway::start().await;
    let (_, key) = gw.create_key("app", 2, false).await;
    let ok = json!({"model": "auto", "messages": [{"role": "user", "content": "x"}]});
    assert_eq!(gw.chat(&key, &ok).await.status(), 200);
    assert_eq!(gw.chat(&key, &ok).await.status(), 200);
    let response = gw.chat(&key, &ok).await;
    assert_eq!(response.status(), 429);
    let retry: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=30).contains(&retry),
        "2 rpm refills one request every 30 s, got {retry}"
    );
    let error: Value = response.json().await.unwrap();
    validate("ErrorResponse", &error).unwrap();
    assert_eq!(error["error"]["code"], "rate_limit_exceeded");
    assert_eq!(
        gw.wait_for_served(2).await.len(),
        2,
        "the refused request is not in the ledger"
    );
}

#[tokio::test]
async fn admin_mode_needs_an_admin_key() {
    let gw = TestGateway::start().await;
    let (_, plain) = gw.create_key("plain", 60, false).await;
    let (_, admin) = gw.create_key("admin", 60, true).await;
    let ok = json!({"model": "auto", "messages": [{"role": "user", "content": "x"}]});
    let send = |key: String| {
        gw.http
            .post(format!("{}/v1/chat/completions", gw.url))
            .bearer_auth(key)
            .header("x-nself-admin", "true")
            .json(&ok)
            .send()
    };
    let denied = send(plain).await.unwrap();
    assert_eq!(denied.status(), 403);
    let error: Value = denied.json().await.unwrap();
    assert_eq!(error["error"]["code"], "permission_denied");
    assert_eq!(send(admin).await.unwrap().status(), 200);
    assert_eq!(gw.wait_for_served(1).await.len(), 1);
}

#[tokio::test]
async fn bad_embedding_inputs_are_400() {
    let gw = TestGateway::start().await;
    let (_, key) = gw.create_key("app", 60, false).await;
    for body in [
        json!({"model": "m"}),
        json!({"model": "m", "input": []}),
        json!({"model": "m", "input": ""}),
        json!({"model": "m", "input": [1, 2, 3]}),
    ] {
        let response = gw
            .http
            .post(format!("{}/v1/embeddings", gw.url))
            .bearer_auth(&key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{body}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["param"], "input", "{body}: {error}");
    }
    assert!(gw.served().await.is_empty());
}
