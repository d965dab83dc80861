//! Capacity under load: when every tier that could serve is merely full, requests wait in a
//! bounded FIFO line instead of failing; only a full line or a timed-out wait answers 503, with
//! `Retry-After`; a client that hangs up while waiting leaves the line and is never sent upstream.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use claw_ledger::FallbackReason;
use claw_tests::fake_ollama::Behavior;
use claw_tests::gateway::TestGateway;
use claw_tests::prometheus::sample;
use serde_json::{json, Value};

fn ask(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hello there"}]})
}

/// A fake Ollama whose every answer takes about `each` (five chunks).
fn slow(gw: &TestGateway, each: Duration) {
    gw.ollama.set_behavior(Behavior {
        reply: "one two three four five".into(),
        chunk_delay: each / 5,
        ..Behavior::default()
    });
}

/// Polls the admin status until the local tier shows `queued` waiting requests.
async fn until_queued(gw: &TestGateway, queued: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = gw.admin_get("/claw/v1/status").await;
        let local = status["tiers"][0].clone();
        if local["load"]["queued"] == queued || Instant::now() > deadline {
            return local;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn retry_after(response: &reqwest::Response) -> u64 {
    response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn with_only_ollama_every_request_waits_its_turn_and_is_served_locally_once() {
    let gw = TestGateway::start_with(&["--ollama-max-inflight", "2"]).await;
    let (_, key) = gw.create_key("crowd", 1000, false).await;
    slow(&gw, Duration::from_millis(250));
    let requests = ["auto", "local"]
        .iter()
        .flat_map(|model| std::iter::repeat_n(*model, 8))
        .map(|model| {
            let (gw, key) = (&gw, &key);
            async move {
                let response = gw.chat(key, &ask(model)).await;
                let status = response.status().as_u16();
                let provider = response.headers()["x-nself-provider"]
                    .to_str()
                    .map(str::to_owned)
                    .ok();
                let id = response.headers()["x-request-id"]
                    .to_str()
                    .unwrap()
                    .to_owned();
                (status, provider, id)
            }
        });
    let answers = futures::future::join_all(requests).await;
    for (status, provider, _) in &answers {
        assert_eq!(
            (*status, provider.as_deref()),
            (200, Some("ollama")),
            "{answers:?}"
        );
    }
    assert_eq!(gw.ollama.chat_requests(), 16);
    assert!(
        gw.ollama.most_chats_in_flight() <= 2,
        "at most OLLAMA_MAX_INFLIGHT at once upstream, saw {}",
        gw.ollama.most_chats_in_flight()
    );
    let served = gw.wait_for_served(16).await;
    assert_eq!(served.len(), 16, "each request accounted once");
    let ids: HashSet<&str> = served.iter().map(|s| s.request_id.as_str()).collect();
    let answered: HashSet<&str> = answers.iter().map(|(_, _, id)| id.as_str()).collect();
    assert_eq!(ids, answered);
    assert!(served.iter().all(|s| s.status == 200));
    assert!(
        gw.fallbacks().await.is_empty(),
        "a request that waited and was served by the tier it waited for is no fall-through"
    );
    let metrics = gw
        .http
        .get(format!("{}/metrics", gw.url))
        .send()
        .await
        .unwrap();
    let metrics = metrics.text().await.unwrap();
    assert!(
        sample(
            &metrics,
            "claw_tier_queue_wait_seconds_count{tier=\"local\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{metrics}"
    );
    assert!(sample(&metrics, "claw_tier_queue_waiting{tier=\"local\"}").is_some());
}

#[tokio::test]
async fn a_wait_longer_than_the_queue_timeout_is_503_with_retry_after() {
    let gw =
        TestGateway::start_with(&["--ollama-max-inflight", "1", "--queue-timeout-ms", "300"]).await;
    let (_, key) = gw.create_key("impatient", 1000, false).await;
    slow(&gw, Duration::from_millis(1500));
    let first_body = ask("auto");
    let first = gw.chat(&key, &first_body);
    let second = async {
        until_queued(&gw, 0).await;
        while gw.ollama.chat_requests() < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let sent = Instant::now();
        (gw.chat(&key, &ask("auto")).await, sent.elapsed())
    };
    let (first, (second, waited)) = tokio::join!(first, second);
    assert_eq!(first.status(), 200);
    assert_eq!(second.status(), 503);
    assert!(retry_after(&second) >= 1);
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_millis(1300),
        "answered after {waited:?}, the queue timeout is 300 ms"
    );
    let body: Value = second.json().await.unwrap();
    assert_eq!(body["error"]["code"], "no_tier_available");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("CLAW_QUEUE_TIMEOUT_MS"),
        "{body}"
    );
    assert_eq!(
        gw.ollama.chat_requests(),
        1,
        "the timed-out request never went upstream"
    );
    let fallbacks = gw.fallbacks().await;
    assert_eq!(fallbacks.len(), 1, "{fallbacks:?}");
    assert_eq!(
        (fallbacks[0].reason, fallbacks[0].to_tier),
        (FallbackReason::Capacity, None)
    );
    let served = gw.wait_for_served(2).await;
    let statuses: HashSet<u16> = served.iter().map(|s| s.status).collect();
    assert_eq!(statuses, HashSet::from([200, 503]));
}

#[tokio::test]
async fn a_full_queue_refuses_the_next_request_at_once() {
    let gw = TestGateway::start_with(&["--ollama-max-inflight", "1", "--max-queue", "1"]).await;
    let (_, key) = gw.create_key("crowd", 1000, false).await;
    slow(&gw, Duration::from_secs(1));
    let first_body = ask("local");
    let first = gw.chat(&key, &first_body);
    let queued = async {
        while gw.ollama.chat_requests() < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        gw.chat(&key, &ask("local")).await
    };
    let refused = async {
        let local = until_queued(&gw, 1).await;
        assert_eq!(local["load"]["in_flight"], 1, "{local}");
        assert_eq!(local["load"]["max_queue"], 1, "{local}");
        assert!(
            local["detail"].as_str().unwrap().contains("1 queued"),
            "{local}"
        );
        let sent = Instant::now();
        (gw.chat(&key, &ask("local")).await, sent.elapsed())
    };
    let (first, queued, (refused, took)) = tokio::join!(first, queued, refused);
    assert_eq!(first.status(), 200);
    assert_eq!(queued.status(), 200, "the one in line is served");
    assert_eq!(refused.status(), 503);
    assert!(retry_after(&refused) >= 1);
    assert!(
        took < Duration::from_millis(500),
        "refused at once, took {took:?}"
    );
    let body: Value = refused.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("CLAW_MAX_QUEUE"),
        "{body}"
    );
    assert_eq!(gw.ollama.chat_requests(), 2);
}

#[tokio::test]
async fn a_client_that_hangs_up_while_queued_frees_its_place_and_is_not_sent_upstream() {
    let gw = TestGateway::start_with(&["--ollama-max-inflight", "1"]).await;
    let (_, key) = gw.create_key("quitter", 1000, false).await;
    slow(&gw, Duration::from_millis(800));
    let first_body = ask("auto");
    let first = gw.chat(&key, &first_body);
    let quitter = async {
        while gw.ollama.chat_requests() < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let gave_up = gw
            .http
            .post(format!("{}/v1/chat/completions", gw.url))
            .bearer_auth(&key)
            .json(&ask("auto"))
            .timeout(Duration::from_millis(300))
            .send()
            .await;
        assert!(gave_up.is_err(), "the client gave up while queued");
        // The line is empty again as soon as the gateway notices, not when a slot frees.
        until_queued(&gw, 0).await
    };
    let (first, after) = tokio::join!(first, quitter);
    assert_eq!(after["load"]["queued"], 0, "{after}");
    assert_eq!(first.status(), 200);
    let third = gw.chat(&key, &ask("auto")).await;
    assert_eq!(third.status(), 200);
    assert_eq!(
        gw.ollama.chat_requests(),
        2,
        "the request whose client left was never sent upstream"
    );
    let served = gw.wait_for_served(3).await;
    let mut statuses: Vec<u16> = served.iter().map(|s| s.status).collect();
    statuses.sort_unstable();
    assert_eq!(statuses, vec![200, 200, 499]);
    assert!(gw.fallbacks().await.is_empty());
}

#[tokio::test]
async fn embeddings_wait_for_local_capacity_too() {
    let gw = TestGateway::start_with(&["--ollama-max-inflight", "1"]).await;
    let (_, key) = gw.create_key("embedder", 1000, false).await;
    slow(&gw, Duration::from_millis(500));
    let first_body = ask("local");
    let chat = gw.chat(&key, &first_body);
    let embed = async {
        while gw.ollama.chat_requests() < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        gw.http
            .post(format!("{}/v1/embeddings", gw.url))
            .bearer_auth(&key)
            .json(&json!({"model": "nomic-embed-text", "input": "queued"}))
            .send()
            .await
            .unwrap()
    };
    let (chat, embed) = tokio::join!(chat, embed);
    assert_eq!(chat.status(), 200);
    assert_eq!(embed.status(), 200);
    assert_eq!(embed.headers()["x-nself-provider"], "ollama");
}
