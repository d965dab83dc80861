//! Upstream failures: Ollama down, failing, stalled; clients that hang up mid-stream. Each has
//! a defined answer and an accounted `RequestServed` (and `TierFallback` for `auto`).

use std::time::Duration;

use claw_ledger::{FallbackReason, Tier};
use claw_tests::fake_ollama::{Behavior, FakeOllama};
use claw_tests::gateway::TestGateway;
use futures::StreamExt;
use serde_json::{json, Value};

fn ask(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hello there"}]})
}

#[tokio::test]
async fn ollama_down_is_503_for_auto_with_a_fallback_event_and_502_when_forced() {
    let ollama = FakeOllama::start().await;
    let gw = TestGateway::start_in_front_of(ollama, &[]).await;
    let (_, key) = gw.create_key("app", 60, false).await;
    gw.ollama.set_behavior(Behavior {
        fail_status: Some(500),
        ..Behavior::default()
    });

    let response = gw.chat(&key, &ask("auto", false)).await;
    assert_eq!(response.status(), 503);
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "no_tier_available");

    let response = gw.chat(&key, &ask("local", true)).await;
    assert_eq!(
        response.status(),
        502,
        "a forced provider that fails is 502, even for streams"
    );
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "upstream_error");

    let served = gw.wait_for_served(2).await;
    assert_eq!((served[0].status, served[1].status), (503, 502));
    assert_eq!(served[0].request_id, request_id);
    assert_eq!(served[0].total_tokens, 0);
    let fallbacks = gw.fallbacks().await;
    assert_eq!(fallbacks.len(), 1, "only auto falls through");
    assert_eq!(fallbacks[0].request_id, request_id);
    assert_eq!(fallbacks[0].from_tier, Tier::Local);
    assert_eq!(fallbacks[0].to_tier, None);
    assert_eq!(fallbacks[0].reason, FallbackReason::UpstreamError);
}

#[tokio::test]
async fn an_unreachable_ollama_is_unavailable() {
    let gw = TestGateway::start_with(&[]).await;
    let (_, key) = gw.create_key("app", 60, false).await;
    // Point a second gateway at a port where nothing listens.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let gw2 = TestGateway::start_with(&["--ollama-base-url", &dead]).await;
    let (_, key2) = gw2.create_key("app", 60, false).await;
    assert_eq!(gw2.chat(&key2, &ask("auto", false)).await.status(), 503);
    let fallbacks = gw2.fallbacks().await;
    assert_eq!(fallbacks[0].reason, FallbackReason::Unavailable);
    assert_eq!(gw2.wait_for_served(1).await[0].status, 503);
    // The first gateway is unaffected.
    assert_eq!(gw.chat(&key, &ask("auto", false)).await.status(), 200);
}

#[tokio::test]
async fn a_stalled_upstream_times_out_before_the_first_byte() {
    let gw = TestGateway::start_with(&["--first-byte-timeout-ms", "300"]).await;
    let (_, key) = gw.create_key("app", 60, false).await;
    gw.ollama.set_behavior(Behavior {
        first_byte_delay: Duration::from_secs(5),
        ..Behavior::default()
    });
    let response = gw.chat(&key, &ask("auto", false)).await;
    assert_eq!(response.status(), 503);
    assert_eq!(gw.fallbacks().await[0].reason, FallbackReason::Timeout);
}

#[tokio::test]
async fn a_stream_that_stalls_midway_ends_with_an_error_event_and_is_accounted() {
    let gw = TestGateway::start_with(&["--first-byte-timeout-ms", "300"]).await;
    let (_, key) = gw.create_key("app", 60, false).await;
    gw.ollama.set_behavior(Behavior {
        hang_after_chunks: Some(2),
        ..Behavior::default()
    });
    let response = gw.chat(&key, &ask("auto", true)).await;
    assert_eq!(response.status(), 200, "the stream had started");
    let body = response.text().await.unwrap();
    assert!(
        !body.contains("[DONE]"),
        "an incomplete stream must not claim completion"
    );
    assert!(body.contains("upstream_error"), "{body}");
    let served = gw.wait_for_served(1).await;
    assert_eq!(served[0].status, 502);
    assert!(
        served[0].completion_tokens > 0,
        "what was generated is accounted"
    );
    assert!(served[0].tokens_estimated);
}

#[tokio::test]
async fn a_client_that_hangs_up_mid_stream_is_still_accounted() {
    let gw = TestGateway::start().await;
    let (_, key) = gw.create_key("app", 60, false).await;
    gw.ollama.set_behavior(Behavior {
        reply: "one two three four five six seven eight nine ten".into(),
        chunk_delay: Duration::from_millis(100),
        ..Behavior::default()
    });
    let response = gw.chat(&key, &ask("auto", true)).await;
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut seen = String::new();
    while !seen.contains(" two") {
        seen.push_str(&String::from_utf8_lossy(
            &body.next().await.unwrap().unwrap(),
        ));
    }
    drop(body); // the client goes away after two words
    let served = gw.wait_for_served(1).await;
    assert_eq!(served.len(), 1);
    assert_eq!(served[0].status, 499);
    assert!(
        served[0].completion_tokens >= 1 && served[0].completion_tokens < 10,
        "{:?}",
        served[0]
    );
    gw.settle().await;
    let usage = gw.admin_get("/claw/v1/usage").await;
    assert_eq!(usage["totals"]["requests"], 1);
}

#[tokio::test]
async fn auto_waits_for_local_capacity_when_no_tier_after_it_could_serve() {
    let gw = TestGateway::start_with(&["--ollama-max-inflight", "1"]).await;
    let (_, key) = gw.create_key("app", 60, false).await;
    gw.ollama.set_behavior(Behavior {
        chunk_delay: Duration::from_millis(150),
        ..Behavior::default()
    });
    let body = ask("auto", false);
    let slow = gw.chat(&key, &body);
    let second = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        gw.chat(&key, &ask("auto", false)).await
    };
    let (first, second) = tokio::join!(slow, second);
    assert_eq!(first.status(), 200);
    assert_eq!(
        second.status(),
        200,
        "nothing beyond local is configured, so the request waits for local's capacity"
    );
    assert_eq!(second.headers()["x-nself-provider"], "ollama");
    assert!(gw.fallbacks().await.is_empty());
}
