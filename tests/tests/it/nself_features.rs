//! The nSelf features switched on by headers, as every provider receives them: the nSelf
//! expert prompt (`x-nself-app`) and admin mode (`x-nself-admin`: the operator's prompt with
//! the gateway's live state, for admin keys only, marked in the ledger).

use claw_tests::gateway::{TestGateway, Tiers};
use serde_json::{json, Value};

use crate::chat::sse_data;

const APP_PROMPT_START: &str = "You are the nSelf assistant";
const CLIENT_SYSTEM: &str = "Be brief.";

fn body(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [
        {"role": "system", "content": CLIENT_SYSTEM},
        {"role": "user", "content": "How do I revoke a key?"}
    ]})
}

/// Every system text the upstream received, in order, whatever its wire format.
fn system_texts(provider: &str, request: &Value) -> Vec<String> {
    let texts = |items: &Value, field: &str| -> Vec<String> {
        items
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p[field].as_str().map(str::to_owned))
            .collect()
    };
    match provider {
        "ollama" | "openai" => request["messages"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| m["role"] == "system")
            .filter_map(|m| m["content"].as_str().map(str::to_owned))
            .collect(),
        "anthropic" => match &request["system"] {
            Value::String(s) => vec![s.clone()],
            blocks => texts(blocks, "text"),
        },
        "gemini" => texts(&request["systemInstruction"]["parts"], "text"),
        other => panic!("unknown provider {other}"),
    }
}

/// What the last chat request to `provider` carried.
fn last_request(gw: &TestGateway, provider: &str) -> Value {
    let last = |all: Vec<Value>| all.last().cloned().expect("a request reached the upstream");
    // Chats only: the knowledge base also asks Ollama for embeddings.
    let chats = |all: Vec<Value>| {
        all.into_iter()
            .filter(|r| r.get("messages").is_some())
            .collect()
    };
    match provider {
        "ollama" => last(chats(gw.ollama.requests())),
        "openai" => last(chats(gw.openai.as_ref().expect("openai").requests())),
        "anthropic" => last(
            gw.anthropic
                .as_ref()
                .expect("anthropic")
                .requests()
                .into_iter()
                .map(|r| r.body)
                .collect(),
        ),
        "gemini" => last(
            gw.gemini
                .as_ref()
                .expect("gemini")
                .requests()
                .into_iter()
                .filter(|r| r.method.contains("enerateContent"))
                .map(|r| r.body)
                .collect(),
        ),
        other => panic!("unknown provider {other}"),
    }
}

/// POSTs a chat completion with `key` and extra request headers.
pub async fn send(
    gw: &TestGateway,
    key: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut request = gw
        .http
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(key)
        .json(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.expect("chat request")
}

/// The response's assistant text, whole or streamed.
async fn answer(response: reqwest::Response, stream: bool) -> String {
    assert_eq!(response.status(), 200);
    let text = response.text().await.expect("body");
    if !stream {
        let v: Value = serde_json::from_str(&text).expect("JSON");
        return v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
    }
    sse_data(&text)
        .iter()
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

#[tokio::test]
async fn the_app_prompt_leads_the_system_text_on_every_provider() {
    let gw = TestGateway::start_with_tiers(Tiers::all(), &[]).await;
    let (_, key) = gw.create_key("app", 600, false).await;
    for (model, provider) in [
        ("local", "ollama"),
        ("gemini-1.5-flash", "gemini"),
        ("gpt-4o", "openai"),
        ("claude-3-5-sonnet", "anthropic"),
    ] {
        for stream in [false, true] {
            let response = send(&gw, &key, &body(model, stream), &[("x-nself-app", "true")]).await;
            assert_eq!(response.headers()["x-nself-provider"], provider);
            assert!(!answer(response, stream).await.is_empty(), "{model}");
            let system = system_texts(provider, &last_request(&gw, provider)).join("\n");
            let app = system.find(APP_PROMPT_START);
            let client = system.find(CLIENT_SYSTEM);
            assert!(
                matches!((app, client), (Some(a), Some(c)) if a < c),
                "{provider} (stream={stream}): the nSelf prompt must come first, then the client's: {system}"
            );
            assert!(
                system.contains("nself claw api keys"),
                "{provider}: the whole prompt: {system}"
            );
        }
        // Without the header, nothing is added.
        send(&gw, &key, &body(model, false), &[("x-nself-app", "false")]).await;
        let system = system_texts(provider, &last_request(&gw, provider)).join("\n");
        assert!(!system.contains(APP_PROMPT_START), "{provider}: {system}");
        assert!(system.contains(CLIENT_SYSTEM), "{provider}: {system}");
    }
}

#[tokio::test]
async fn an_operators_prompt_file_replaces_the_shipped_one() {
    let dir = tempfile::tempdir().unwrap();
    let own = dir.path().join("app.md");
    std::fs::write(&own, "You answer questions about Example Corp's backend.\n").unwrap();
    let own = own.display().to_string();
    let gw = TestGateway::start_with(&["--app-prompt-file", &own]).await;
    let (_, key) = gw.create_key("app", 60, false).await;
    let response = send(&gw, &key, &body("auto", false), &[("x-nself-app", "true")]).await;
    assert_eq!(response.status(), 200);
    let system = system_texts("ollama", &last_request(&gw, "ollama"));
    assert_eq!(
        system,
        [
            "You answer questions about Example Corp's backend.",
            CLIENT_SYSTEM
        ]
    );
}

#[tokio::test]
async fn admin_mode_is_for_admin_keys_shows_the_live_state_and_is_marked_in_the_ledger() {
    let gw = TestGateway::start().await;
    let (_, plain) = gw.create_key("plain", 600, false).await;
    let (admin_id, admin) = gw.create_key("operator", 600, true).await;

    let refused = send(
        &gw,
        &plain,
        &body("auto", false),
        &[("x-nself-admin", "true")],
    )
    .await;
    assert_eq!(refused.status(), 403);
    let error: Value = refused.json().await.unwrap();
    assert_eq!(error["error"]["code"], "permission_denied", "{error}");

    for _ in 0..2 {
        assert_eq!(
            send(&gw, &plain, &body("auto", false), &[]).await.status(),
            200
        );
    }
    gw.settle().await;

    for stream in [false, true] {
        let response = send(
            &gw,
            &admin,
            &body("auto", stream),
            &[("x-nself-admin", "true"), ("x-nself-app", "true")],
        )
        .await;
        assert!(!answer(response, stream).await.is_empty());
        let system = system_texts("ollama", &last_request(&gw, "ollama"));
        assert_eq!(system.len(), 3, "app, admin, then the client's: {system:?}");
        assert!(system[0].starts_with(APP_PROMPT_START), "{system:?}");
        let live = &system[1];
        for expected in [
            "Admin mode is on",
            "## Live gateway state",
            "- local (ollama): up",
            "- free_gemini (gemini): unconfigured",
            "Active keys: 2.",
            "Usage today (UTC): 2 requests",
        ] {
            assert!(live.contains(expected), "missing `{expected}`: {live}");
        }
        assert_eq!(system[2], CLIENT_SYSTEM);
    }

    // The ledger marks the admin-mode requests, and only them (read as JSON: the field is
    // absent from the others).
    gw.wait_for_served(4).await;
    let mut marks: Vec<(bool, Value)> = gw
        .events()
        .await
        .iter()
        .map(|e| serde_json::to_value(e).unwrap())
        .filter(|e| e["event_type"] == "RequestServed")
        .map(|e| {
            (
                e["key_id"] == admin_id.as_str(),
                e["data"]["admin_mode"].clone(),
            )
        })
        .collect();
    marks.sort_by_key(|(by_admin, _)| *by_admin);
    assert_eq!(
        marks,
        [
            (false, Value::Null),
            (false, Value::Null),
            (true, Value::Bool(true)),
            (true, Value::Bool(true))
        ]
    );
}

#[tokio::test]
async fn knowledge_passages_with_their_titles_reach_every_provider() {
    // The fake Ollama's embeddings are hashes, not meanings: with an embeddings model it does
    // not have, the knowledge base ranks with BM25.
    let gw =
        TestGateway::start_with_tiers(Tiers::all(), &["--ollama-embed-model", "absent-embedder"])
            .await;
    let (_, key) = gw.create_key("docs", 600, false).await;
    let question = |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "How do I revoke a key?"}]});
    for (model, provider) in [
        ("local", "ollama"),
        ("gemini-1.5-flash", "gemini"),
        ("gpt-4o", "openai"),
        ("claude-3-5-sonnet", "anthropic"),
    ] {
        let response = send(
            &gw,
            &key,
            &question(model),
            &[("x-nself-knowledge", "true")],
        )
        .await;
        assert_eq!(response.status(), 200, "{provider}");
        let system = system_texts(provider, &last_request(&gw, provider)).join("\n");
        assert!(
            system.contains("### ɳClaw gateway keys › How do I revoke a key?")
                && system.contains("nself claw api keys revoke <key id>"),
            "{provider}: {system}"
        );
    }
    // Without the header, no passages.
    send(&gw, &key, &question("local"), &[]).await;
    assert!(system_texts("ollama", &last_request(&gw, "ollama")).is_empty());
}

#[tokio::test]
async fn a_knowledge_directory_is_indexed_again_when_it_changes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("pets.md"),
        "# Pets\n## Feeding the cat\nThe cat eats salmon at noon.\n",
    )
    .unwrap();
    let path = dir.path().display().to_string();
    let gw = TestGateway::start_with(&["--knowledge-dir", &path]).await;
    let (_, key) = gw.create_key("docs", 600, false).await;
    let ask =
        |text: &str| json!({"model": "auto", "messages": [{"role": "user", "content": text}]});
    let knowledge = [("x-nself-knowledge", "true")];

    send(&gw, &key, &ask("What does the cat eat?"), &knowledge).await;
    let system = system_texts("ollama", &last_request(&gw, "ollama")).join("\n");
    assert!(system.contains("### Pets › Feeding the cat"), "{system}");

    std::fs::write(
        dir.path().join("garden.md"),
        "# Garden\n## Watering tomatoes\nWater the tomatoes every morning.\n",
    )
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        send(
            &gw,
            &key,
            &ask("When should I water the tomatoes?"),
            &knowledge,
        )
        .await;
        let system = system_texts("ollama", &last_request(&gw, "ollama")).join("\n");
        if system.contains("### Garden › Watering tomatoes") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new document was not indexed: {system}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn with_ollama_up_knowledge_is_ranked_by_its_embeddings() {
    let gw = TestGateway::start().await;
    let (_, key) = gw.create_key("docs", 600, false).await;
    let question = "Which proxy settings keep streams flowing?";
    let body = json!({"model": "auto", "messages": [{"role": "user", "content": question}]});
    let embedded = |input: &Value| gw.ollama.requests().iter().any(|r| r["input"] == *input);
    // The passages are embedded in the background, then each question is.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let response = send(&gw, &key, &body, &[("x-nself-knowledge", "true")]).await;
        assert_eq!(response.status(), 200);
        if embedded(&json!([question])) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the question was never embedded through Ollama"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let passages = gw
        .ollama
        .requests()
        .into_iter()
        .find(|r| r["input"].as_array().is_some_and(|a| a.len() > 3))
        .expect("the passages were embedded in batches");
    assert_eq!(passages["model"], "nomic-embed-text");
    // The chat that followed carried three passages with their titles.
    let system = system_texts("ollama", &last_request(&gw, "ollama")).join("\n");
    assert_eq!(system.matches("\n### ").count(), 3, "{system}");
}
