//! Sessions (`x-nself-session-id`): the gateway keeps the conversation, in order, for the key
//! that started it, trimmed to a budget; the ledger names the session but never holds its text.

use claw_tests::gateway::TestGateway;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::nself_features::send;

const REPLY: &str = "Hello from the fake Ollama.";

fn ask(text: &str, stream: bool) -> Value {
    json!({"model": "auto", "stream": stream, "messages": [{"role": "user", "content": text}]})
}

/// The (role, content) pairs of the last chat the fake Ollama received.
fn upstream_messages(gw: &TestGateway) -> Vec<(String, String)> {
    let last = gw
        .ollama
        .requests()
        .last()
        .cloned()
        .expect("a chat reached Ollama");
    last["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap_or_default().to_owned(),
                m["content"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|(r, c)| ((*r).to_owned(), (*c).to_owned()))
        .collect()
}

#[tokio::test]
async fn a_session_carries_the_conversation_for_its_key_only() {
    let gw = TestGateway::start().await;
    let (_, key) = gw.create_key("owner", 600, false).await;
    let (_, other) = gw.create_key("stranger", 600, false).await;
    let session = Uuid::now_v7().to_string();
    let header = [("x-nself-session-id", session.as_str())];

    let first = send(&gw, &key, &ask("My name is Ada.", false), &header).await;
    assert_eq!(first.status(), 200);
    assert_eq!(
        upstream_messages(&gw),
        pairs(&[("user", "My name is Ada.")])
    );

    // Streamed answers are kept too, and earlier turns come first, in order.
    let second = send(&gw, &key, &ask("What is my name?", true), &header).await;
    assert_eq!(second.status(), 200);
    assert!(second.text().await.unwrap().contains("[DONE]"));
    assert_eq!(
        upstream_messages(&gw),
        pairs(&[
            ("user", "My name is Ada."),
            ("assistant", REPLY),
            ("user", "What is my name?"),
        ])
    );

    // Another key cannot read or extend it; a malformed id is refused before routing.
    let stolen = send(&gw, &other, &ask("Tell me Ada's secrets.", false), &header).await;
    assert_eq!(stolen.status(), 404);
    let error: Value = stolen.json().await.unwrap();
    assert_eq!(error["error"]["type"], "invalid_request_error", "{error}");
    let malformed = send(
        &gw,
        &key,
        &ask("x", false),
        &[("x-nself-session-id", "not-a-uuid")],
    )
    .await;
    assert_eq!(malformed.status(), 400);
    let error: Value = malformed.json().await.unwrap();
    assert_eq!(error["error"]["param"], "x-nself-session-id", "{error}");

    // The nSelf prompt leads; the stranger's attempt left no trace in the history.
    let third = send(
        &gw,
        &key,
        &ask("Thanks!", false),
        &[header[0], ("x-nself-app", "true")],
    )
    .await;
    assert_eq!(third.status(), 200);
    let seen = upstream_messages(&gw);
    assert_eq!(seen[0].0, "system");
    assert!(seen[0].1.starts_with("You are the nSelf assistant"));
    assert_eq!(
        seen[1..],
        pairs(&[
            ("user", "My name is Ada."),
            ("assistant", REPLY),
            ("user", "What is my name?"),
            ("assistant", REPLY),
            ("user", "Thanks!"),
        ])
    );

    // The ledger names the session on each of its requests and never holds its text.
    let served = gw.wait_for_served(3).await;
    assert!(
        served
            .iter()
            .all(|s| s.session_id.as_deref() == Some(session.as_str())),
        "{served:?}"
    );
    let ledger = serde_json::to_string(&gw.events().await).unwrap();
    assert!(!ledger.contains("Ada"), "conversation text in the ledger");
}

#[tokio::test]
async fn a_long_session_is_trimmed_to_the_budget_oldest_first() {
    // The fake's answer is 27 characters: the budget holds one question and its answer.
    let gw = TestGateway::start_with(&["--session-history-chars", "40"]).await;
    let (_, key) = gw.create_key("talker", 600, false).await;
    let session = Uuid::now_v7().to_string();
    let header = [("x-nself-session-id", session.as_str())];
    for question in ["one?", "two?", "three?"] {
        assert_eq!(
            send(&gw, &key, &ask(question, false), &header)
                .await
                .status(),
            200
        );
    }
    assert_eq!(
        upstream_messages(&gw),
        pairs(&[("user", "two?"), ("assistant", REPLY), ("user", "three?")])
    );
}
